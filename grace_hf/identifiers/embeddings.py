"""The image embeddings that content-based identifiers (structured, rq) cluster: one source out of three.

Images added to a trained model are embedded by the same source, in the same space: pixel thumbnails are centred on
the mean saved at prepare time, an open_clip model is run again, and a features file must hold the new images,
unless it sits in a dense-baseline directory (`grace-hf baseline-clip`), whose encoder then embeds the images the
file lacks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from grace_hf.data.images import encode_images, read_rgb
from grace_hf.data.karpathy import KarpathyImage
from grace_hf.dense.directory import FEATURES_FILE, OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE, load_image_features
from grace_hf.dense.open_clip_loading import open_clip_image_encoder
from grace_hf.errors import GraceInputError
from grace_hf.outputs import final_path
from grace_hf.runtime import default_io_workers, progress_bar

__all__ = [
    "PIXEL_SIDE",
    "EmbeddingOptions",
    "Embeddings",
    "check_same_source",
    "embed",
    "embed_images",
    "embed_new_images",
    "embedding_source",
    "image_thumbnail",
    "pixel_embeddings",
    "pixel_thumbnails",
    "recorded_options",
]

PIXEL_MEAN = "pixel_mean"
PIXEL_SIDE = 16


def image_thumbnail(
    image: Image.Image, side: int = PIXEL_SIDE, resample: Image.Resampling = Image.Resampling.BOX
) -> np.ndarray:
    """(3 * side * side,) the RGB thumbnail of `image`, values in [0, 1]."""
    small = image.convert("RGB").resize((side, side), resample)
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


def pixel_thumbnails(
    paths: Sequence[str | os.PathLike], num_workers: int | None = None, side: int = PIXEL_SIDE
) -> np.ndarray:
    """(N, 3 * side * side) RGB thumbnails in [0, 1] (16x16: 768 values): colour and layout without a model."""

    def thumbnail(path: str | os.PathLike) -> np.ndarray:
        return image_thumbnail(read_rgb(path), side)

    with ThreadPoolExecutor(num_workers or default_io_workers()) as pool:
        rows = list(progress_bar(pool.map(thumbnail, paths), total=len(paths), desc="pixel features"))
    return np.stack(rows)  # (N, 3 * side * side)


def pixel_embeddings(thumbnails: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """(N, D) thumbnails centred on `mean` (1, D) (default: their own mean) and L2-normalised."""
    features = thumbnails - (thumbnails.mean(axis=0, keepdims=True) if mean is None else mean)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-8)


@dataclass
class EmbeddingOptions:
    """Where image embeddings come from: exactly one of

    - `clip_model` (+ `clip_pretrained`): an open_clip model's `encode_image`, L2-normalised (`batch_size` images at
      a time on `device`);
    - `image_features`: a features file, e.g. the dense baseline's `image_features.safetensors`;
    - `pixel_features`: `pixel_side` x `pixel_side` thumbnails, no model (offline demos; 8x8 suits the synthetic
      shapes).
    """

    clip_model: str | None = field(
        default=None, metadata={"help": "open_clip model name, config JSON or local-dir:DIR"}
    )
    clip_pretrained: str | None = field(default=None, metadata={"help": "local open_clip weights file"})
    image_features: str | None = field(
        default=None, metadata={"help": "a features file: safetensors `features` (N, d) + metadata `image_keys`"}
    )
    pixel_features: bool = field(default=False, metadata={"help": "pixel thumbnails (no model)"})
    pixel_side: int = field(default=PIXEL_SIDE, metadata={"help": "thumbnail side of --pixel-features"})
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
        if not 1 <= self.pixel_side <= 64:
            raise GraceInputError(f"--pixel-side must be in [1, 64], got {self.pixel_side}")
        if self.batch_size < 1:
            raise GraceInputError(f"--batch-size must be >= 1, got {self.batch_size}")


def embedding_source(options: EmbeddingOptions) -> str:
    """Which source `options` name: "clip_model", "image_features" or "pixel_features"."""
    if options.clip_model is not None:
        return "clip_model"
    return "image_features" if options.image_features is not None else "pixel_features"


def check_same_source(kind: str, built: EmbeddingOptions, options: EmbeddingOptions) -> None:
    """New images must be embedded by the source that `built` the codebooks; another one is a `GraceInputError`."""
    built_from, asked = embedding_source(built), embedding_source(options)
    if asked != built_from:
        raise GraceInputError(
            f"{kind} identifiers: the codebooks were built on {built_from.replace('_', '-')} embeddings; new images "
            f"must be embedded the same way, not with --{asked.replace('_', '-')}"
        )


def recorded_options(options: EmbeddingOptions) -> dict:
    """`options` as a kind's codebooks record them: files as absolute paths, so they resolve from anywhere."""
    recorded = dataclasses.asdict(options)
    for name in ("image_features", "clip_pretrained"):
        if recorded[name]:
            recorded[name] = os.path.abspath(recorded[name])
    if recorded["clip_model"] and recorded["clip_model"].endswith(".json"):
        recorded["clip_model"] = os.path.abspath(recorded["clip_model"])
    return recorded


def _found(path: str | None) -> str | None:
    """A recorded file, or the same file under its final name when it was recorded inside an output that was still
    being built and has since been completed (`final_path`: the demo prepares from `.OUT.grace-partial/dense-clip/`,
    which becomes `OUT/dense-clip/`); the path as given when neither exists (its reader names it)."""
    if path is None or os.path.exists(path):
        return path
    final = final_path(path)
    return os.fspath(final) if final.exists() else path


@dataclass
class Embeddings:
    """Embeddings of some images, and what embedding more images in the same space needs (`tensors`, saved with a
    kind's codebooks: the pixel source's centring mean `pixel_mean` (1, D))."""

    features: np.ndarray  # (N, d) float32
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def _clip_features(
    options: EmbeddingOptions, clip_model: str, clip_pretrained: str | None, paths: list[Path], num_workers: int | None
) -> np.ndarray:
    model, transform = open_clip_image_encoder(clip_model, clip_pretrained)
    model.to(options.device)
    features = encode_images(
        paths, transform, model.encode_image, options.batch_size, options.device, num_workers, desc="CLIP features"
    )
    return features.numpy()


def _file_features(options: EmbeddingOptions, images: list[KarpathyImage], num_workers: int | None) -> np.ndarray:
    """Rows of the features file for `images`; those it lacks from the encoder of its dense-baseline directory."""
    path = Path(options.image_features)
    features, keys = load_image_features(path)
    row = {key: i for i, key in enumerate(keys)}
    missing = [image for image in images if image.key not in row]
    found = features[[row[image.key] for image in images if image.key in row]].numpy().astype(np.float32)
    if not missing:
        return found
    encoder = path if path.is_dir() else path.parent
    if not (encoder / OPEN_CLIP_CONFIG_FILE).is_file() or not (encoder / OPEN_CLIP_WEIGHTS_FILE).is_file():
        raise GraceInputError(
            f"{path}: no features for image {missing[0].key!r} ({len(missing)} images missing); pass a features file "
            f"that holds them, or a dense-baseline directory (its {OPEN_CLIP_CONFIG_FILE} and "
            f"{OPEN_CLIP_WEIGHTS_FILE} embed the images its {FEATURES_FILE} lacks)"
        )
    new = _clip_features(
        options,
        os.fspath(encoder / OPEN_CLIP_CONFIG_FILE),
        os.fspath(encoder / OPEN_CLIP_WEIGHTS_FILE),
        [image.path for image in missing],
        num_workers,
    )
    if new.shape[1] != features.shape[1]:
        raise GraceInputError(
            f"{encoder}: its encoder embeds in {new.shape[1]} dimensions, {path} holds {features.shape[1]}"
        )
    result = np.empty((len(images), features.shape[1]), dtype=np.float32)  # (N, d)
    is_missing = np.array([image.key not in row for image in images])
    result[~is_missing], result[is_missing] = found, new
    return result


def embed(
    options: EmbeddingOptions,
    images: list[KarpathyImage],
    num_workers: int | None = None,
    saved: Mapping[str, np.ndarray] | None = None,
) -> Embeddings:
    """Embeddings of `images`, in their order, from the source `options` name; `saved`: the `tensors` of an earlier
    call, to embed more images in its space."""
    clip_model = _found(options.clip_model) if (options.clip_model or "").endswith(".json") else options.clip_model
    options = dataclasses.replace(
        options,
        image_features=_found(options.image_features),
        clip_model=clip_model,
        clip_pretrained=_found(options.clip_pretrained),
    )
    if options.image_features is not None:
        return Embeddings(_file_features(options, images, num_workers))
    paths = [image.path for image in images]
    if options.pixel_features:
        thumbnails = pixel_thumbnails(paths, num_workers, options.pixel_side)  # (N, 3 * side * side)
        mean = saved[PIXEL_MEAN] if saved and PIXEL_MEAN in saved else thumbnails.mean(axis=0, keepdims=True)
        return Embeddings(pixel_embeddings(thumbnails, mean), {PIXEL_MEAN: mean})
    return Embeddings(_clip_features(options, options.clip_model, options.clip_pretrained, paths, num_workers))


def embed_new_images(
    kind: str,
    options: EmbeddingOptions,
    images: list[KarpathyImage],
    num_workers: int | None,
    saved: Mapping[str, np.ndarray],
    width: int,
    what: str,
) -> Embeddings:
    """Embeddings of images added to a `kind` index, in the space of its saved codebooks (`saved`: their tensors);
    a `GraceInputError` unless they are `width` wide, as the saved arrays (`what`) are."""
    embeddings = embed(options, images, num_workers, saved=saved)
    if embeddings.features.shape[1] != width:
        raise GraceInputError(
            f"{kind} identifiers: the new images' embeddings have {embeddings.features.shape[1]} dimensions, {what} "
            f"{width}"
        )
    return embeddings


def embed_images(options: EmbeddingOptions, images: list[KarpathyImage], num_workers: int | None = None) -> np.ndarray:
    """(N, d) float32 embeddings of `images`, in their order, from the source `options` names."""
    return embed(options, images, num_workers).features
