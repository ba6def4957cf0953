"""The dense-baseline directory (a `grace-hf baseline-clip` output): its files, the open_clip config and weights,
`metrics.json` and the image features file; its check and readers.

The features file is safetensors with one tensor `features` (N, d) and the metadata `image_keys` (a JSON list of
the N image keys, in row order); the dense baseline writes it (`image_features.safetensors`) and structured
identifiers read it (`--image-features`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import read_json

__all__ = [
    "DENSE_FILES",
    "FEATURES_FILE",
    "OPEN_CLIP_CONFIG_FILE",
    "OPEN_CLIP_WEIGHTS_FILE",
    "check_dense_directory",
    "load_image_features",
    "read_open_clip_config",
    "save_image_features",
]

FEATURES_FILE = "image_features.safetensors"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
DENSE_FILES = (OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE, FEATURES_FILE)  # a `grace-hf baseline-clip` output's


def check_dense_directory(directory: str | os.PathLike) -> Path:
    """`directory` as a path if it holds a `grace-hf baseline-clip` output's files; a `GraceInputError` otherwise."""
    path = Path(directory)
    missing = [name for name in DENSE_FILES if not (path / name).is_file()]
    if missing:
        raise GraceInputError(
            f"{directory}: not a `grace-hf baseline-clip` directory (no {', '.join(missing)}); --rerank takes "
            "the output directory of `grace-hf baseline-clip`"
        )
    return path


def read_open_clip_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(model_cfg, preprocess_cfg)` of an open_clip config JSON: bare (`embed_dim`, `vision_cfg`, `text_cfg`) or as
    open_clip and the dense baseline save it (`{"model_cfg": ..., "preprocess_cfg": ...}`)."""
    config = read_json(path, "open_clip model config")
    model_cfg = config.get("model_cfg", config) if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= model_cfg.keys():
        raise GraceInputError(f"{path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    preprocess = config.get("preprocess_cfg", {}) if "model_cfg" in config else {}
    return model_cfg, preprocess if isinstance(preprocess, dict) else {}


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
