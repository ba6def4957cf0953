"""Numeric identifiers: the image's running number written digit by digit, `1 2 3 4` (one token per digit)."""

from __future__ import annotations

from grace_hf.data.karpathy import KarpathyImage
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["build"]


def build(images: list[KarpathyImage]) -> IdentifierIndex:
    """Number the memorized images 0, 1, 2, ... in file order; identifier `n` digit by digit with spaces."""
    return IdentifierIndex("numeric", {image.key: [" ".join(str(n))] for n, image in enumerate(images)})
