"""Numeric identifiers: the image's running number written digit by digit, `1 2 3 4` (one token per digit)."""

from __future__ import annotations

from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind, NoOptions, next_number, number_images
from grace_hf.identifiers.codebooks import Codebooks
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["KIND", "build", "extend"]


def _spell(number: int) -> str:
    return " ".join(str(number))


def _read(identifier: str) -> int | None:
    digits = identifier.replace(" ", "")
    return int(digits) if digits.isdigit() and _spell(int(digits)) == identifier else None


def build(inputs: IdentifierInputs, options: NoOptions) -> IdentifierIndex:
    """Number the memorized images 0, 1, 2, ... in file order; identifier `n` digit by digit with spaces."""
    return IdentifierIndex("numeric", number_images(inputs.images, 0, _spell))


def extend(index: IdentifierIndex, inputs: IdentifierInputs, options: NoOptions, codebooks: Codebooks | None):
    """The new images continue the numbering after the largest number of `index`."""
    new = number_images(inputs.images, next_number(index, _read), _spell)
    return IdentifierIndex("numeric", {**index.images, **new})


KIND = IdentifierKind("numeric", build, description="running number, digit by digit: `1 2 3 4`", extend=extend)
