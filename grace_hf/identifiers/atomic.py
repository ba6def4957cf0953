"""Atomic identifiers: one new vocabulary token per image, `<img_1234>`.

The original trained these as a classifier head initialised with CLIP image embeddings; writing one new token is
the same thing in generative form. Images added to a trained model get the next numbers; their tokens start from the
mean embedding of their captions' tokens (`grace_hf.training.modeling.initialize_token_embeddings`).
"""

from __future__ import annotations

import re

from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind, NoOptions, next_number, number_images
from grace_hf.identifiers.codebooks import Codebooks
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["KIND", "build", "extend"]

_TOKEN = re.compile(r"^<img_(0|[1-9]\d*)>$")


def _spell(number: int) -> str:
    return f"<img_{number}>"


def _read(identifier: str) -> int | None:
    match = _TOKEN.match(identifier)
    return int(match.group(1)) if match else None


def _index(images: dict[str, list[str]]) -> IdentifierIndex:
    return IdentifierIndex("atomic", images, new_tokens=[ids[0] for ids in images.values()])


def build(inputs: IdentifierInputs, options: NoOptions) -> IdentifierIndex:
    """Number the memorized images 0, 1, 2, ... in file order; identifier and new token `<img_{n}>`."""
    return _index(number_images(inputs.images, 0, _spell))


def extend(index: IdentifierIndex, inputs: IdentifierInputs, options: NoOptions, codebooks: Codebooks | None):
    """The new images get the next numbers, each a new token."""
    return _index({**index.images, **number_images(inputs.images, next_number(index, _read), _spell)})


KIND = IdentifierKind("atomic", build, description="one new token per image: `<img_1234>`", extend=extend)
