"""The image embeddings that content-based identifiers (structured) cluster: one source out of three."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from grace_hf.data.karpathy import KarpathyImage
from grace_hf.errors import GraceInputError
from grace_hf.image_features import encode_images, open_clip_image_encoder, pixel_embeddings, select_features

__all__ = ["EmbeddingOptions", "embed_images"]


@dataclass
class EmbeddingOptions:
    """Where image embeddings come from: exactly one of

    - `clip_model` (+ `clip_pretrained`): an open_clip model's `encode_image`, L2-normalised (`batch_size` images at
      a time on `device`);
    - `image_features`: a features file, e.g. the dense baseline's `image_features.safetensors`;
    - `pixel_features`: 16x16 thumbnails, no model (offline demos).
    """

    clip_model: str | None = field(
        default=None, metadata={"help": "open_clip model name, config JSON or local-dir:DIR"}
    )
    clip_pretrained: str | None = field(default=None, metadata={"help": "local open_clip weights file"})
    image_features: str | None = field(
        default=None, metadata={"help": "a features file: safetensors `features` (N, d) + metadata `image_keys`"}
    )
    pixel_features: bool = field(default=False, metadata={"help": "16x16 pixel thumbnails (no model)"})
    batch_size: int = field(default=64, metadata={"help": "images per CLIP batch"})
    device: str = field(default="cpu", metadata={"help": "CLIP device"})

    def __post_init__(self) -> None:
        sources = [self.clip_model is not None, self.image_features is not None, bool(self.pixel_features)]
        if sum(sources) != 1:
            raise GraceInputError(
                "content-based identifiers need exactly one embedding source: --clip-model NAME --clip-pretrained "
                "FILE, --image-features FILE or --pixel-features"
            )
        if self.clip_pretrained is not None and self.clip_model is None:
            raise GraceInputError("--clip-pretrained goes with --clip-model")
        if self.batch_size < 1:
            raise GraceInputError(f"--batch-size must be >= 1, got {self.batch_size}")


def embed_images(options: EmbeddingOptions, images: list[KarpathyImage], num_workers: int | None = None) -> np.ndarray:
    """(N, d) float32 embeddings of `images`, in their order, from the source `options` names."""
    if options.image_features is not None:
        return select_features(options.image_features, [image.key for image in images])
    paths = [image.path for image in images]
    if options.pixel_features:
        return pixel_embeddings(paths, num_workers)
    model, transform = open_clip_image_encoder(options.clip_model, options.clip_pretrained)
    model.to(options.device)
    features = encode_images(
        paths, transform, model.encode_image, options.batch_size, options.device, num_workers, desc="CLIP features"
    )
    return features.numpy()
