"""Loading an open_clip image encoder: a built-in name, a config JSON file or `local-dir:DIR`, with local weights."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch

from grace_hf.dense.directory import read_open_clip_config
from grace_hf.errors import GraceInputError

__all__ = ["open_clip_image_encoder"]


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
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        raise GraceInputError(f"--clip-model {clip_model} --clip-pretrained {clip_pretrained}: {err}") from None
    return model.eval(), preprocess
