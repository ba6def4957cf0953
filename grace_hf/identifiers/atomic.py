"""Atomic identifiers: one new vocabulary token per image, `<img_1234>`.

The original trained these as a classifier head initialised with CLIP image embeddings; writing one new token is
the same thing in generative form.
"""

from __future__ import annotations

from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind, NoOptions
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["KIND", "build"]


def build(inputs: IdentifierInputs, options: NoOptions) -> IdentifierIndex:
    """Number the memorized images 0, 1, 2, ... in file order; identifier and new token `<img_{n}>`."""
    tokens = [f"<img_{n}>" for n in range(len(inputs.images))]
    images = {image.key: [token] for image, token in zip(inputs.images, tokens)}
    return IdentifierIndex("atomic", images, new_tokens=tokens)


KIND = IdentifierKind("atomic", build, description="one new token per image: `<img_1234>`")
