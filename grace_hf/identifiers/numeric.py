"""Numeric identifiers: the image's running number written digit by digit, `1 2 3 4` (one token per digit)."""

from __future__ import annotations

from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind, NoOptions
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["KIND", "build"]


def build(inputs: IdentifierInputs, options: NoOptions) -> IdentifierIndex:
    """Number the memorized images 0, 1, 2, ... in file order; identifier `n` digit by digit with spaces."""
    return IdentifierIndex("numeric", {image.key: [" ".join(str(n))] for n, image in enumerate(inputs.images)})


KIND = IdentifierKind("numeric", build, description="running number, digit by digit: `1 2 3 4`")
