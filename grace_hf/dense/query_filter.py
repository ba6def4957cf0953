"""Keeping the pseudo-queries that the dense model finds closest to their image.

BLIP's CapFilt in small: the captioner proposes more queries per image than are kept (its beams and top-k samples),
and the dense dual encoder (`grace-hf baseline-clip`, trained on the train images' captions only) keeps, for each
image, the `keep` queries whose text embedding has the highest cosine with that image's embedding. The captioner
often names a shape the pixels do not show; the dense model, which reads the pixels with its own image tower,
drops most of those.

    queries = caption_splits(model, processor, corpus, ["val", "test"], **filtered_captioning("runs/dense-clip"))

The demo writes its pseudo-queries this way (`filtered_captioning`: 5 beams and 20 top-3 samples proposed, 5 kept;
chosen on the demo's val captions, three seeds: docs/results.md), as do `add-images --captioner-filter` and
`pseudo-queries --filter`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from grace_hf.data.karpathy import KarpathyImage
from grace_hf.dense.model import DualEncoder, load_dual_encoder
from grace_hf.errors import GraceInputError

__all__ = ["PROPOSED_SAMPLES", "PROPOSED_TOP_K", "DenseQueryFilter", "filtered_captioning"]

PROPOSED_SAMPLES = 20  # queries per image drawn by top-k sampling beside the beams, for the filter to choose from
PROPOSED_TOP_K = 3


@dataclass
class DenseQueryFilter:
    """Keeps each image's `keep` queries closest to it under `encoder` (a `grace_hf.dense.DualEncoder`)."""

    encoder: DualEncoder
    keep: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise GraceInputError(f"the pseudo-query filter keeps a whole number >= 1 of queries, got {self.keep!r}")

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, keep: int = 5) -> DenseQueryFilter:
        """The dual encoder of a `grace-hf baseline-clip` output directory."""
        return cls(load_dual_encoder(directory), keep)

    @torch.no_grad()
    def __call__(self, images: Sequence[KarpathyImage], queries: Mapping[str, list[str]]) -> dict[str, list[str]]:
        """`{image_key: queries}` with each image's `keep` best queries, closest first (ties: in the given order)."""
        pictures = self.encoder.encode_images([image.path for image in images])  # (N, D)
        kept: dict[str, list[str]] = {}
        for image, picture in zip(images, pictures):
            texts = queries.get(image.key, [])
            if not texts:
                kept[image.key] = []
                continue
            cosines = self.encoder.encode_texts(texts) @ picture  # (T,)
            order = sorted(range(len(texts)), key=lambda i: -float(cosines[i]))  # stable: ties keep their order
            kept[image.key] = [texts[i] for i in order[: self.keep]]
        return kept


def filtered_captioning(directory: str | os.PathLike, keep: int = 5) -> dict[str, Any]:
    """`caption_splits` options for filtered pseudo-queries: the beams and `PROPOSED_SAMPLES` top-`PROPOSED_TOP_K`
    samples proposed, the `keep` closest to their image under the dense model in `directory` kept."""
    return {
        "num_sampled": PROPOSED_SAMPLES,
        "top_k": PROPOSED_TOP_K,
        "query_filter": DenseQueryFilter.from_directory(directory, keep),
    }
