"""String identifiers: the image's running number as one word, `1234` (the tokenizer decides the pieces)."""

from __future__ import annotations

from grace_hf.data.karpathy import KarpathyImage
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["build"]


def build(images: list[KarpathyImage]) -> IdentifierIndex:
    """Number the memorized images 0, 1, 2, ... in file order; identifier `n` as one word."""
    return IdentifierIndex("string", {image.key: [str(n)] for n, image in enumerate(images)})
