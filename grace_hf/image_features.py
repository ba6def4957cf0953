"""Image embeddings for identifiers and the dense baseline: opening images, open_clip configs and weights, batched
encoding, 16x16 pixel thumbnails, and the features file.

The features file is safetensors with one tensor `features` (N, d) and the metadata `image_keys` (a JSON list of
the N image keys, in row order); the dense baseline writes it (`image_features.safetensors`) and structured
identifiers read it (`--image-features`).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import read_json
from grace_hf.runtime import progress_bar

__all__ = [
    "FEATURES_FILE",
    "OPEN_CLIP_CONFIG_FILE",
    "OPEN_CLIP_WEIGHTS_FILE",
    "encode_images",
    "load_image_features",
    "open_clip_image_encoder",
    "pixel_embeddings",
    "pixel_thumbnails",
    "read_open_clip_config",
    "read_rgb",
    "save_image_features",
]

FEATURES_FILE = "image_features.safetensors"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
PIXEL_SIDE = 16


def default_workers() -> int:
    """Threads that read image files (I/O and decoding release the GIL)."""
    return min(8, (os.cpu_count() or 1) * 2)


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as RGB (gray, palette and RGBA images converted)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def encode_images(
    paths: Sequence[str | os.PathLike],
    transform: Callable[[Image.Image], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    desc: str = "image features",
) -> torch.Tensor:
    """L2-normalised embeddings (N, d) of the images at `paths`, in order: files read by threads, `transform` per
    image, `encode` per batch of (B, C, H, W) pixels, with a progress bar."""
    chunks = []
    with torch.inference_mode(), ThreadPoolExecutor(num_workers or default_workers()) as pool:
        for start in progress_bar(range(0, len(paths), batch_size), desc=desc):
            batch = paths[start : start + batch_size]
            pixels = torch.stack(list(pool.map(lambda path: transform(read_rgb(path)), batch)))  # (B, C, H, W)
            chunks.append(F.normalize(encode(pixels.to(device)).float(), dim=-1).cpu())  # (B, d)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def pixel_thumbnails(
    paths: Sequence[str | os.PathLike], num_workers: int | None = None, side: int = PIXEL_SIDE
) -> np.ndarray:
    """(N, 3 * side * side) RGB thumbnails in [0, 1] (16x16: 768 values): colour and layout without a model."""

    def thumbnail(path: str | os.PathLike) -> np.ndarray:
        small = read_rgb(path).resize((side, side), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0

    with ThreadPoolExecutor(num_workers or default_workers()) as pool:
        rows = list(progress_bar(pool.map(thumbnail, paths), total=len(paths), desc="pixel features"))
    return np.stack(rows)  # (N, 3 * side * side)


def pixel_embeddings(thumbnails: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """(N, D) thumbnails centred on `mean` (1, D) (default: their own mean) and L2-normalised."""
    features = thumbnails - (thumbnails.mean(axis=0, keepdims=True) if mean is None else mean)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-8)


def read_open_clip_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(model_cfg, preprocess_cfg)` of an open_clip config JSON: bare (`embed_dim`, `vision_cfg`, `text_cfg`) or as
    open_clip and the dense baseline save it (`{"model_cfg": ..., "preprocess_cfg": ...}`)."""
    config = read_json(path, "open_clip model config")
    model_cfg = config.get("model_cfg", config) if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= model_cfg.keys():
        raise GraceInputError(f"{path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    preprocess = config.get("preprocess_cfg", {}) if "model_cfg" in config else {}
    return model_cfg, preprocess if isinstance(preprocess, dict) else {}


def _register_config(path: str) -> tuple[str, dict[str, Any]]:
    """Register a config JSON with open_clip under the file's stem; return that name and preprocessing overrides."""
    model_cfg, preprocess = read_open_clip_config(path)
    name = Path(path).stem
    with tempfile.TemporaryDirectory() as tmp:  # open_clip registers configs from files, read at once
        (Path(tmp) / f"{name}.json").write_text(json.dumps(model_cfg), encoding="utf-8")
        open_clip.add_model_config(Path(tmp) / f"{name}.json")
    return name, {f"image_{k}": preprocess[k] for k in ("mean", "std", "interpolation") if k in preprocess}


def open_clip_image_encoder(clip_model: str, clip_pretrained: str | None) -> tuple[torch.nn.Module, Callable]:
    """An open_clip model in eval mode and its eval-time transform.

    `clip_model`: a built-in name (`ViT-L-14`), a config JSON file, or `local-dir:DIR`; `clip_pretrained`: a local
    weights file (needed unless `local-dir:`), e.g. the dense baseline's `open_clip_model.safetensors`.
    """
    name, overrides = clip_model, {}
    if clip_model.endswith(".json"):
        name, overrides = _register_config(clip_model)
    if not name.startswith("local-dir:"):
        if not clip_pretrained:
            raise GraceInputError(f"--clip-model {clip_model}: needs --clip-pretrained FILE (a local weights file)")
        if not Path(clip_pretrained).is_file():
            raise GraceInputError(f"{clip_pretrained}: CLIP weights file not found")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=clip_pretrained, **overrides)
    except (
        RuntimeError,
        ValueError,
        OSError,
        KeyError,
        TypeError,
        EOFError,
        pickle.UnpicklingError,
        SafetensorError,
    ) as err:
        # a corrupt or foreign weights file
        raise GraceInputError(
            f"--clip-model {clip_model} --clip-pretrained {clip_pretrained}: cannot load: {type(err).__name__}: {err}"
        ) from None
    return model.eval(), preprocess


def save_image_features(path: str | os.PathLike, features: torch.Tensor, image_keys: Sequence[str]) -> None:
    """Write `features` (N, d) with the metadata `image_keys` (row order) as safetensors."""
    if features.shape[0] != len(image_keys):
        raise ValueError(f"{features.shape[0]} feature rows for {len(image_keys)} image keys")
    save_file(
        {"features": features.float().contiguous()},
        os.fspath(path),
        metadata={"image_keys": json.dumps(list(image_keys), ensure_ascii=False)},
    )


def load_image_features(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """`(features (N, d), image_keys)` of a features file (or of `DIR/image_features.safetensors`)."""
    path = Path(path)
    if path.is_dir():
        path = path / FEATURES_FILE
    if not path.is_file():
        raise GraceInputError(f"{path}: image features file not found")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if "features" not in f.keys():
                raise GraceInputError(f"{path}: no tensor 'features'")
            features = f.get_tensor("features")
    except (SafetensorError, OSError) as err:
        raise GraceInputError(f"{path}: not a safetensors file: {err}") from None
    try:
        image_keys = json.loads(metadata["image_keys"])
    except (KeyError, json.JSONDecodeError):
        raise GraceInputError(f"{path}: metadata 'image_keys' must be a JSON list of image keys") from None
    if features.ndim != 2 or not isinstance(image_keys, list) or features.shape[0] != len(image_keys):
        raise GraceInputError(f"{path}: 'features' must be (N, d) with N = len(image_keys)")
    return features, image_keys
