"""Loading an open_clip image encoder: a built-in name, a config JSON file or `local-dir:DIR`, with local weights;
and its visual weights as the starting point of a Flamingo vision tower (`vision_tower` in a recipe)."""

from __future__ import annotations

import json
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError

from grace_hf.dense.directory import OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE, read_open_clip_config
from grace_hf.errors import GraceInputError

__all__ = ["load_open_clip_vision_tower", "open_clip_image_encoder"]


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


# open_clip's pooling head, which Flamingo does not use (it reads the patch tokens before `ln_post`)
_UNUSED_VISION_KEYS = ("ln_post.weight", "ln_post.bias", "proj")


def load_open_clip_vision_tower(
    source: str, weights: str | None = None
) -> tuple[dict[str, Any], bool, dict[str, torch.Tensor]]:
    """`(vision_cfg, quick_gelu, state_dict)` of an open_clip image encoder, for a Flamingo vision tower.

    `source`: a `baseline-clip` output directory (its `open_clip_config.json` and `open_clip_model.safetensors`), or
    an open_clip config (a JSON file or a built-in name) whose weights file is `weights`. The state dict holds the
    `visual.*` weights without the prefix and without the pooling head (`ln_post`, `proj`).
    """
    directory = Path(source)
    if directory.is_dir():
        if weights is not None:
            raise GraceInputError(
                f"vision_tower {source}: a directory brings its own weights; drop vision_tower_weights"
            )
        source, weights = str(directory / OPEN_CLIP_CONFIG_FILE), str(directory / OPEN_CLIP_WEIGHTS_FILE)
        if not Path(source).is_file():
            raise GraceInputError(
                f"vision_tower {directory}: not a `baseline-clip` directory (no {OPEN_CLIP_CONFIG_FILE})"
            )
    elif not Path(source).is_file() and open_clip.get_model_config(source) is None:
        raise GraceInputError(
            f"vision_tower {source}: neither a `baseline-clip` directory, an open_clip config file nor a built-in "
            "open_clip model name"
        )
    if weights is None or not Path(weights).is_file():
        raise GraceInputError(
            f"vision_tower {source}: needs its weights, vision_tower_weights FILE (not found: {weights})"
        )
    clip, _ = open_clip_image_encoder(source, weights)
    model_cfg = read_open_clip_config(source)[0] if source.endswith(".json") else open_clip.get_model_config(source)
    vision_cfg = dict(model_cfg["vision_cfg"])
    state = {key: value for key, value in clip.visual.state_dict().items() if key not in _UNUSED_VISION_KEYS}
    return vision_cfg, bool(model_cfg.get("quick_gelu", False)), state
