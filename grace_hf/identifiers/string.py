"""String identifiers: the image's running number as one word, `1234` (the tokenizer decides the pieces)."""

from __future__ import annotations

from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind, NoOptions, next_number, number_images
from grace_hf.identifiers.codebooks import Codebooks
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["KIND", "build", "extend"]


def _read(identifier: str) -> int | None:
    return int(identifier) if identifier.isdigit() and str(int(identifier)) == identifier else None


def build(inputs: IdentifierInputs, options: NoOptions) -> IdentifierIndex:
    """Number the memorized images 0, 1, 2, ... in file order; identifier `n` as one word."""
    return IdentifierIndex("string", number_images(inputs.images, 0, str))


def extend(index: IdentifierIndex, inputs: IdentifierInputs, options: NoOptions, codebooks: Codebooks | None):
    """The new images continue the numbering after the largest number of `index`."""
    return IdentifierIndex("string", {**index.images, **number_images(inputs.images, next_number(index, _read), str)})


KIND = IdentifierKind("string", build, description="running number as one word: `1234`", extend=extend)
