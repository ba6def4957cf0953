"""A small open_clip dual encoder: model presets, embedding images and texts, saving and loading.

The dual encoder is open_clip's own `CLIP` class built from a small config (no pretrained weights,
nothing downloaded) and open_clip's `SimpleTokenizer`, whose BPE vocabulary ships inside the
package. A trained encoder directory holds `open_clip_config.json` (model config, tokenizer and
image preprocessing) and `open_clip_model.safetensors`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image
from safetensors.torch import load_model, save_model

from grace_hf.data.images import encode_images, read_rgb
from grace_hf.dense.directory import OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE, read_open_clip_config
from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_json

_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer vocabulary, bundled with the package

# open_clip model configs (the `model_cfg` of open_clip's JSON files) sized for 64x64 images on a CPU. `tiny` trains
# on 400 synthetic images in about a minute on 2 cores; `small` costs about 8x as much per step, for more data or time.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": _VOCAB_SIZE, "width": 64, "heads": 2, "layers": 2},
    },
    "small": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 4, "width": 128, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": _VOCAB_SIZE, "width": 128, "heads": 4, "layers": 4},
    },
}


def resolve_model_config(spec: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """An open_clip model config from a preset name (`tiny`, `small`), a JSON file or a dict.

    A JSON file holds the same keys as a preset (`embed_dim`, `vision_cfg`, `text_cfg`), bare or under `model_cfg`;
    the text tower's `vocab_size` must be the SimpleTokenizer's (49408) and is filled in when absent.
    """
    if isinstance(spec, dict):
        config, source = copy.deepcopy(spec), "config"
    elif str(spec) in PRESETS:
        return copy.deepcopy(PRESETS[str(spec)])
    elif Path(spec).is_file():
        config, source = read_open_clip_config(spec)[0], str(spec)
    else:
        raise GraceInputError(f"--model-config {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= config.keys():
        raise GraceInputError(f"{source}: an open_clip model config is an object with embed_dim, vision_cfg, text_cfg")
    text_cfg = config["text_cfg"]
    text_cfg.setdefault("vocab_size", _VOCAB_SIZE)
    if text_cfg["vocab_size"] != _VOCAB_SIZE:
        raise GraceInputError(f"{source}: text_cfg.vocab_size must be {_VOCAB_SIZE} (open_clip's SimpleTokenizer)")
    return config


@dataclass
class DualEncoder:
    """An open_clip `CLIP` with its tokenizer and eval-time image transform.

    Example:
        >>> encoder = DualEncoder.from_config("tiny")
        >>> encoder.encode_texts(["a red circle"]).shape
        torch.Size([1, 64])
    """

    model: open_clip.CLIP
    config: dict[str, Any]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    transform: Callable[[Image.Image], torch.Tensor]

    @classmethod
    def from_config(cls, spec: str | os.PathLike | dict[str, Any]) -> DualEncoder:
        """A freshly initialised encoder (seed torch first for a reproducible init)."""
        config = resolve_model_config(spec)
        model = open_clip.CLIP(**config)
        context_length = config["text_cfg"].get("context_length", 77)
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        # Resize + center crop + OpenAI CLIP mean/std; no random augmentation (captions may name positions).
        transform = open_clip.image_transform(config["vision_cfg"]["image_size"], is_train=False)
        return cls(model=model, config=config, tokenizer=tokenizer, transform=transform)

    @property
    def embed_dim(self) -> int:
        return self.config["embed_dim"]

    def pixel_values(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Load and preprocess images into one (N, 3, H, W) batch."""
        return torch.stack([self.transform(read_rgb(path)) for path in paths])

    def encode_images(self, paths: Sequence[str | os.PathLike], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), in the order of `paths`."""
        self.model.eval()
        return encode_images(paths, self.transform, self.model.encode_image, batch_size, desc="dense image features")

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """L2-normalised text embeddings (N, D), in the order of `texts`."""
        self.model.eval()
        chunks = [
            self.model.encode_text(self.tokenizer(list(texts[i : i + batch_size])), normalize=True)
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `open_clip_config.json` and `open_clip_model.safetensors` into `directory`."""
        directory = Path(directory)
        atomic_write_json(
            directory / OPEN_CLIP_CONFIG_FILE,
            {
                "model_cfg": self.config,
                "tokenizer": {
                    "class": "open_clip.SimpleTokenizer",
                    "context_length": self.config["text_cfg"].get("context_length", 77),
                },
                "preprocess_cfg": {
                    "size": self.config["vision_cfg"]["image_size"],
                    "mean": list(open_clip.OPENAI_DATASET_MEAN),
                    "std": list(open_clip.OPENAI_DATASET_STD),
                    "interpolation": "bicubic",
                    "resize_mode": "shortest",
                },
            },
        )
        save_model(self.model, str(directory / OPEN_CLIP_WEIGHTS_FILE))


def load_dual_encoder(directory: str | os.PathLike) -> DualEncoder:
    """The encoder saved in `directory` by `DualEncoder.save` (e.g. a `grace-hf baseline-clip` output)."""
    directory = Path(directory)
    config_path = directory / OPEN_CLIP_CONFIG_FILE
    if not config_path.is_file() or not (directory / OPEN_CLIP_WEIGHTS_FILE).is_file():
        raise GraceInputError(
            f"{directory}: not a dual encoder directory (needs {OPEN_CLIP_CONFIG_FILE} and {OPEN_CLIP_WEIGHTS_FILE})"
        )
    encoder = DualEncoder.from_config(read_open_clip_config(config_path)[0])
    load_model(encoder.model, str(directory / OPEN_CLIP_WEIGHTS_FILE))
    encoder.model.eval()
    return encoder
