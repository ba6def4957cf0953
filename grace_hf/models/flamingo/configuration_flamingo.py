"""Configuration of the Flamingo model: an open_clip vision tower, a perceiver resampler, and an MPT decoder with
gated cross-attention blocks (OpenFlamingo's architecture)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import open_clip
from open_clip.model import CLIPVisionCfg
from transformers import PreTrainedConfig

__all__ = ["FlamingoConfig", "FlamingoTextConfig", "FLAMINGO_PRESETS"]


class FlamingoTextConfig(PreTrainedConfig):
    r"""The MPT (MosaicGPT) decoder of a Flamingo model.

    Args:
        vocab_size (`int`, defaults to 50280): rows of the (tied) token embedding.
        d_model (`int`, defaults to 2048): hidden width.
        n_layers (`int`, defaults to 24): decoder blocks.
        n_heads (`int`, defaults to 16): attention heads (head dim = d_model / n_heads).
        expansion_ratio (`int`, defaults to 4): MLP width = expansion_ratio * d_model.
        alibi_bias_max (`int`, defaults to 8): ALiBi slope parameter (MPT's `alibi_bias_max`).
        qk_ln (`bool`, defaults to True): LayerNorm on queries and keys over the full width, before the head split.
        no_bias (`bool`, defaults to True): no biases in the decoder's linear layers and LayerNorms (MPT's
            `no_bias`); set False for MosaicGPT weights that carry biases.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the weight-only LayerNorms.
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights.
        tie_word_embeddings (`bool`, defaults to True): the LM head reuses the token embedding.

    Example:
        >>> FlamingoTextConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=1000).head_dim
        16
    """

    model_type = "grace_flamingo_text"
    base_config_key = "text_config"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    vocab_size: int = 50280
    d_model: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    expansion_ratio: int = 4
    alibi_bias_max: int = 8
    qk_ln: bool = True
    no_bias: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


_VISION_FIELDS = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
_VIT_L_14 = {"image_size": 224, "layers": 24, "width": 1024, "head_width": 64, "patch_size": 14, "mlp_ratio": 4.0}

FLAMINGO_PRESETS: dict[str, dict[str, Any]] = {
    "openflamingo-3b-vitl-mpt1b": {
        "vision_config": _VIT_L_14,
        "vision_quick_gelu": True,
        "text_config": {"vocab_size": 50280, "d_model": 2048, "n_layers": 24, "n_heads": 16, "qk_ln": True},
        "cross_attn_every_n_layers": 1,
        "media_token_id": 50278,
        "end_of_chunk_token_id": 50277,
        "pad_token_id": 50279,
    },
    "openflamingo-9b-vitl-mpt7b": {
        "vision_config": _VIT_L_14,
        "vision_quick_gelu": True,
        "text_config": {"vocab_size": 50280, "d_model": 4096, "n_layers": 32, "n_heads": 32, "qk_ln": False},
        "cross_attn_every_n_layers": 4,
        "media_token_id": 50278,
        "end_of_chunk_token_id": 50277,
        "pad_token_id": 50279,
    },
    "tiny": {
        "vision_config": {
            "image_size": 32,
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "patch_size": 8,
            "mlp_ratio": 2.0,
        },
        "vision_quick_gelu": False,
        "text_config": {"vocab_size": 512, "d_model": 64, "n_layers": 4, "n_heads": 4, "qk_ln": True},
        "perceiver_depth": 2,
        "perceiver_heads": 2,
        "perceiver_head_dim": 16,
        "perceiver_num_latents": 8,
        "perceiver_ff_mult": 2,
        "cross_attn_every_n_layers": 2,
        "cross_attn_heads": 2,
        "cross_attn_head_dim": 16,
        "cross_attn_ff_mult": 2,
        "media_token_id": 1,
        "end_of_chunk_token_id": 0,
        "pad_token_id": 2,
    },
}


class FlamingoConfig(PreTrainedConfig):
    r"""Configuration of [`FlamingoForConditionalGeneration`]. Defaults are OpenFlamingo-3B-vitl-mpt1b.

    Args:
        vision_config (`dict` or `str`, defaults to ViT-L/14): an open_clip `CLIPVisionCfg` as a dict (`image_size`,
            `layers`, `width`, `head_width`, `patch_size`, `mlp_ratio`, ...), or the name of an open_clip model config
            (e.g. `"ViT-L-14"`), which is resolved to its `vision_cfg` dict.
        vision_quick_gelu (`bool`, defaults to True): QuickGELU in the vision tower (OpenAI CLIP weights need it).
        freeze_vision (`bool`, defaults to True): vision tower parameters get `requires_grad=False`.
        text_config (`FlamingoTextConfig` or `dict`, *optional*): the MPT decoder.
        perceiver_depth (`int`, defaults to 6): perceiver resampler layers.
        perceiver_heads (`int`, defaults to 8) / perceiver_head_dim (`int`, defaults to 64): perceiver attention shape.
        perceiver_num_latents (`int`, defaults to 64): visual tokens per image after resampling.
        perceiver_ff_mult (`int`, defaults to 4): perceiver feed-forward width multiplier.
        cross_attn_every_n_layers (`int`, defaults to 1): a gated cross-attention block runs before decoder block
            `j` when `(j + 1) % cross_attn_every_n_layers == 0` (OpenFlamingo's convention).
        cross_attn_heads (`int`, defaults to 8) / cross_attn_head_dim (`int`, defaults to 64): cross-attention shape.
        cross_attn_ff_mult (`int`, defaults to 4): gated feed-forward width multiplier.
        media_token_id (`int`, defaults to 50278): id of `<image>`.
        end_of_chunk_token_id (`int`, defaults to 50277): id of `<|endofchunk|>` (also the EOS of generation).
        pad_token_id (`int`, defaults to 50279): id of `<PAD>`.
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear weights outside the decoder.

    Example:
        >>> config = FlamingoConfig.from_preset("tiny")
        >>> config.vision_config["image_size"], config.text_config.d_model
        (32, 64)
    """

    model_type = "grace_flamingo"
    sub_configs_defaults = {"text_config": FlamingoTextConfig}

    vision_config: dict | str | None = None
    vision_quick_gelu: bool = True
    freeze_vision: bool = True
    text_config: dict | FlamingoTextConfig | None = None
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_head_dim: int = 64
    perceiver_num_latents: int = 64
    perceiver_ff_mult: int = 4
    cross_attn_every_n_layers: int = 1
    cross_attn_heads: int = 8
    cross_attn_head_dim: int = 64
    cross_attn_ff_mult: int = 4
    media_token_id: int = 50278
    end_of_chunk_token_id: int = 50277
    pad_token_id: int | None = 50279
    eos_token_id: int | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = dict(_VIT_L_14)
        elif isinstance(self.vision_config, str):
            model_config = open_clip.get_model_config(self.vision_config)
            if model_config is None:
                raise ValueError(f"unknown open_clip model config {self.vision_config!r}")
            self.vision_config = dict(model_config["vision_cfg"])
        if self.eos_token_id is None:
            self.eos_token_id = self.end_of_chunk_token_id
        super().__post_init__(**kwargs)

    @property
    def vision_width(self) -> int:
        """Width of the vision tower's patch tokens (the perceiver and cross-attention key/value width)."""
        return self.vision_config["width"]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> FlamingoConfig:
        """Build a named preset (`"tiny"`, `"openflamingo-3b-vitl-mpt1b"`, `"openflamingo-9b-vitl-mpt7b"`);
        keyword overrides replace top-level fields, and a `text_config`/`vision_config` dict is merged into the
        preset's. An unknown preset or field is a `ValueError` that names it."""
        if name not in FLAMINGO_PRESETS:
            raise ValueError(f"unknown Flamingo preset {name!r}; choose one of {sorted(FLAMINGO_PRESETS)}")
        unknown = sorted(set(overrides) - set(cls.__annotations__))
        nested = {"text_config": FlamingoTextConfig.__annotations__, "vision_config": _VISION_FIELDS}
        for key, fields in nested.items():
            if isinstance(overrides.get(key), dict):
                unknown += [f"{key}.{field}" for field in overrides[key] if field not in fields]
        if unknown:
            raise ValueError(f"unknown FlamingoConfig field(s) {unknown}")
        kwargs = copy.deepcopy(FLAMINGO_PRESETS[name])
        for key in ("text_config", "vision_config"):
            if isinstance(overrides.get(key), dict):
                kwargs[key].update(overrides.pop(key))
        kwargs.update(overrides)
        return cls(**kwargs)
