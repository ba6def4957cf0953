"""String identifiers: the image's running number as one word, `1234` (the tokenizer decides the pieces)."""

from __future__ import annotations

from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind, NoOptions
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["KIND", "build"]


def build(inputs: IdentifierInputs, options: NoOptions) -> IdentifierIndex:
    """Number the memorized images 0, 1, 2, ... in file order; identifier `n` as one word."""
    return IdentifierIndex("string", {image.key: [str(n)] for n, image in enumerate(inputs.images)})


KIND = IdentifierKind("string", build, description="running number as one word: `1234`")
