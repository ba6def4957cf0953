"""Atomic identifiers: one new vocabulary token per image, `<img_1234>`.

The original trained these as a classifier head initialised with CLIP image embeddings; writing one
new token is the same thing in generative form (DESIGN.md §3).
"""

from __future__ import annotations

from grace_hf.data.karpathy import KarpathyImage
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["build"]


def build(images: list[KarpathyImage]) -> IdentifierIndex:
    """Number the memorized images 0, 1, 2, ... in file order; identifier and new token `<img_{n}>`."""
    tokens = [f"<img_{n}>" for n in range(len(images))]
    return IdentifierIndex("atomic", {image.key: [token] for image, token in zip(images, tokens)}, new_tokens=tokens)
