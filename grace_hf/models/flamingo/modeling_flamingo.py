"""Flamingo on transformers: open_clip vision tower -> perceiver resampler -> MPT decoder with gated cross-attention.

The perceiver and the gated cross-attention follow `open_flamingo/src/helpers.py` (itself after lucidrains'
flamingo-pytorch) in math, with HF-style module names; the decoder is MPT/MosaicGPT (ALiBi, optional QK LayerNorm,
weight-only LayerNorms, no biases). Vision features are explicit inputs (`pixel_values` or `image_features`), never
state kept on modules, so the model works under ZeRO-3, gradient checkpointing and beam reordering.
"""

from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_flamingo import FlamingoConfig, FlamingoTextConfig

__all__ = [
    "FlamingoForConditionalGeneration",
    "FlamingoModel",
    "FlamingoPreTrainedModel",
    "build_alibi_slopes",
    "media_index_from_input_ids",
]


def media_index_from_input_ids(input_ids: torch.LongTensor, media_token_id: int) -> torch.LongTensor:
    """For each token, the 1-based index of the latest `<image>` at or before it (0: no image yet). (B, T)"""
    return (input_ids == media_token_id).cumsum(dim=-1)


def build_alibi_slopes(num_heads: int, alibi_bias_max: int = 8, device: torch.device | None = None) -> torch.Tensor:
    """MPT's ALiBi slopes, one per head (as MosaicGPT and transformers' `build_mpt_alibi_tensor`). (H,)"""
    num_heads_pow2 = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, num_heads_pow2 + 1, dtype=torch.float32, device=device) * (
        alibi_bias_max / num_heads_pow2
    )
    slopes = 1.0 / torch.pow(2, exponents)
    if num_heads_pow2 != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def build_self_attention_bias(
    slopes: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int | torch.Tensor,
    dtype: torch.dtype,
    key_length: int | None = None,
) -> torch.Tensor:
    """ALiBi + causal + padding as one additive SDPA bias. (B or 1, H, T_q, T_k)

    ALiBi is `slope * (key_pos - query_pos)`: MPT uses `slope * (key_pos - last_pos)`, which differs by a constant
    per query row and so gives the same softmax, but only the relative form stays right with a KV cache.
    `past_length` may be a 0-d tensor (a static cache's fill level, never read on the host); `key_length` is the
    number of keys attended to (default `past_length + query_length`; a static cache's full length, whose unwritten
    tail is masked as the future). `attention_mask` (B, <= T_k) covers the first keys; keys past its end are real.
    """
    device = slopes.device
    if key_length is None:
        key_length = past_length + query_length
    query_pos = torch.arange(query_length, device=device) + past_length  # (T_q,)
    key_pos = torch.arange(key_length, device=device)  # (T_k,)
    relative = (key_pos[None, :] - query_pos[:, None]).to(torch.float32)  # (T_q, T_k)
    bias = slopes[:, None, None] * relative[None]  # (H, T_q, T_k)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]  # (1, 1, T_q, T_k)
    if attention_mask is not None:
        mask = attention_mask[:, -key_length:].bool()  # (B, <= T_k)
        if mask.shape[1] < key_length:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], key_length - mask.shape[1])], dim=1)  # (B, T_k)
        allowed = allowed & mask[:, None, None, :]  # (B, 1, T_q, T_k)
    # the dtype's minimum rather than -inf keeps fully masked rows (left padding) finite
    return bias[None].to(dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def check_media_count(media_index: torch.LongTensor, num_images: int) -> None:
    """Refuse text with more `<image>` tokens than images (a host sync: reads the largest index)."""
    most = int(media_index.max()) if media_index.numel() else 0
    if most > num_images:
        raise ValueError(f"the text has {most} <image> tokens but only {num_images} images")


class FlamingoFeedForward(nn.Module):
    """LayerNorm -> up -> GELU -> down (open_flamingo `FeedForward`; reference indices 0, 1, 3)."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up_proj = nn.Linear(dim, dim * mult, bias=False)
        self.act = nn.GELU()
        self.down_proj = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(self.norm(hidden_states))))


class FlamingoPerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents) (open_flamingo `PerceiverAttention`)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # media (B, N, V, D), latents (B, N, L, D)
        batch, num_media, num_latents = latents.shape[:3]
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        query = self.q_proj(latents)  # (B, N, L, inner)
        key, value = self.kv_proj(torch.cat([media, latents], dim=-2)).chunk(2, dim=-1)  # (B, N, V + L, inner)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)  # (B, N, H, S, d)

        out = F.scaled_dot_product_attention(split(query), split(key), split(value))  # (B, N, H, L, d)
        return self.o_proj(out.transpose(-3, -2).reshape(batch, num_media, num_latents, -1))


class FlamingoPerceiverLayer(nn.Module):
    def __init__(self, config: FlamingoConfig):
        super().__init__()
        dim = config.vision_width
        self.attn = FlamingoPerceiverAttention(dim, config.perceiver_heads, config.perceiver_head_dim)
        self.ff = FlamingoFeedForward(dim, config.perceiver_ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.attn(media, latents) + latents
        return self.ff(latents) + latents


class FlamingoPerceiverResampler(nn.Module):
    """Resamples each image's patch tokens to `num_latents` tokens (no time/frame embeddings, as OpenFlamingo)."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.perceiver_num_latents, config.vision_width))
        self.layers = nn.ModuleList(FlamingoPerceiverLayer(config) for _ in range(config.perceiver_depth))
        self.norm = nn.LayerNorm(config.vision_width)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        # media (B, N, F * V, D) -> (B, N, L, D)
        latents = self.latents.expand(*media.shape[:2], *self.latents.shape)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


class FlamingoMaskedCrossAttention(nn.Module):
    """Text tokens attend to the latents of their most recent preceding image (open_flamingo `MaskedCrossAttention`
    with `only_attend_immediate_media=True`); tokens with no preceding image get a zero output."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        dim = config.text_config.d_model
        self.heads = config.cross_attn_heads
        self.head_dim = config.cross_attn_head_dim
        inner = self.heads * self.head_dim
        self.norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.kv_proj = nn.Linear(config.vision_width, 2 * inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, image_features: torch.Tensor, media_index: torch.LongTensor
    ) -> torch.Tensor:
        # hidden_states (B, T, D), image_features (B, N, L, Dv), media_index (B, T)
        batch, length = hidden_states.shape[:2]
        num_media, num_latents = image_features.shape[1:3]
        query = self.q_proj(self.norm(hidden_states))  # (B, T, inner)
        key, value = self.kv_proj(image_features.flatten(1, 2)).chunk(2, dim=-1)  # (B, N * L, inner)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, S, d)

        media_of_key = torch.arange(1, num_media + 1, device=media_index.device).repeat_interleave(num_latents)
        has_media = media_index > 0  # (B, T)
        # a token with no image may attend anywhere; its output is zeroed below (no all-masked rows, no NaN)
        allowed = (media_index[:, :, None] == media_of_key) | ~has_media[:, :, None]  # (B, T, N * L)
        out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=allowed[:, None])
        out = out.transpose(1, 2).reshape(batch, length, -1) * has_media[:, :, None].to(out.dtype)  # (B, T, inner)
        return self.o_proj(out)


class FlamingoGatedCrossAttentionBlock(nn.Module):
    """tanh-gated cross-attention and feed-forward residuals (gates start at 0, so the LM starts unchanged)."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        self.attn = FlamingoMaskedCrossAttention(config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FlamingoFeedForward(config.text_config.d_model, config.cross_attn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, hidden_states: torch.Tensor, image_features: torch.Tensor, media_index: torch.LongTensor
    ) -> torch.Tensor:
        hidden_states = self.attn(hidden_states, image_features, media_index) * self.attn_gate.tanh() + hidden_states
        return self.ff(hidden_states) * self.ff_gate.tanh() + hidden_states


def decoder_layer_norm(config: FlamingoTextConfig) -> nn.LayerNorm:
    """MPT's LayerNorm: weight-only unless the checkpoint has biases."""
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=not config.no_bias)


class FlamingoMptAttention(nn.Module):
    """MPT self-attention: fused qkv, optional QK LayerNorm over the full width before the head split, SDPA."""

    def __init__(self, config: FlamingoTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.n_heads
        self.head_dim = config.head_dim
        dim, bias = config.d_model, not config.no_bias
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=bias)
        if config.qk_ln:
            self.q_layernorm = decoder_layer_norm(config)
            self.k_layernorm = decoder_layer_norm(config)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        batch, length = hidden_states.shape[:2]
        query, key, value = self.qkv_proj(hidden_states).chunk(3, dim=-1)  # (B, T, D) each
        if self.q_layernorm is not None:
            query, key = self.q_layernorm(query), self.k_layernorm(key)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)

        query, key, value = split(query), split(key), split(value)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, H, T_k, d)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias)  # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FlamingoMptMLP(nn.Module):
    def __init__(self, config: FlamingoTextConfig):
        super().__init__()
        inner, bias = config.expansion_ratio * config.d_model, not config.no_bias
        self.up_proj = nn.Linear(config.d_model, inner, bias=bias)
        self.act = nn.GELU(approximate="none")
        self.down_proj = nn.Linear(inner, config.d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))


class FlamingoDecoderLayer(GradientCheckpointingLayer):
    """An optional gated cross-attention block followed by an MPT block (OpenFlamingo's `FlamingoLayer`)."""

    def __init__(self, config: FlamingoConfig, layer_idx: int):
        super().__init__()
        text_config = config.text_config
        has_cross_attn = (layer_idx + 1) % config.cross_attn_every_n_layers == 0
        self.gated_cross_attn = FlamingoGatedCrossAttentionBlock(config) if has_cross_attn else None
        self.input_layernorm = decoder_layer_norm(text_config)
        self.self_attn = FlamingoMptAttention(text_config, layer_idx)
        self.post_attention_layernorm = decoder_layer_norm(text_config)
        self.mlp = FlamingoMptMLP(text_config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        image_features: torch.Tensor | None,
        media_index: torch.LongTensor | None,
        attention_bias: torch.Tensor,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        if self.gated_cross_attn is not None and image_features is not None:
            hidden_states = self.gated_cross_attn(hidden_states, image_features, media_index)
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_bias, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FlamingoPreTrainedModel(PreTrainedModel):
    config: FlamingoConfig
    config_class = FlamingoConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlamingoDecoderLayer", "FlamingoPerceiverLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, VisionTransformer):
            # open_clip's own scale for the class and position embeddings
            scale = module.transformer.width**-0.5
            init.normal_(module.class_embedding, std=scale)
            init.normal_(module.positional_embedding, std=scale)
        elif isinstance(module, FlamingoPerceiverResampler):
            init.normal_(module.latents, std=1.0)  # torch.randn, as OpenFlamingo
        elif isinstance(module, FlamingoGatedCrossAttentionBlock):
            # zero gates: the decoder starts as the plain LM
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for module in model.modules():
            if isinstance(module, FlamingoModel):
                module.freeze_vision_tower()
        return loaded


def build_vision_tower(config: FlamingoConfig) -> VisionTransformer:
    """An open_clip ViT whose `forward` returns `(class token, patch tokens)` with the patch tokens taken before
    `ln_post`: open_clip >= 2.23 applies `ln_post` to the tokens inside `_pool`, but OpenFlamingo was trained on tokens
    without it (open_clip <= 2.22), so `ln_post` is replaced by the identity (and the unused projection dropped)."""
    vision_cfg = {**config.vision_config, "output_tokens": True}
    # open_clip has no public builder for the vision tower alone; `_build_vision_tower` is what `CLIP` itself calls
    visual = open_clip.model._build_vision_tower(
        embed_dim=config.vision_width, vision_cfg=vision_cfg, quick_gelu=config.vision_quick_gelu
    )
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
        raise ValueError(f"vision_config must describe a plain open_clip ViT with class-token pooling: {vision_cfg}")
    visual.ln_post = nn.Identity()
    visual.proj = None
    return visual


class FlamingoModel(FlamingoPreTrainedModel):
    """Vision tower, perceiver and decoder; returns the last hidden states (no LM head)."""

    def __init__(self, config: FlamingoConfig):
        super().__init__(config)
        text_config = config.text_config
        self.vision_model = build_vision_tower(config)
        self.perceiver = FlamingoPerceiverResampler(config)
        self.embed_tokens = nn.Embedding(text_config.vocab_size, text_config.d_model)
        self.layers = nn.ModuleList(FlamingoDecoderLayer(config, j) for j in range(text_config.n_layers))
        self.norm = decoder_layer_norm(text_config)
        self.gradient_checkpointing = False
        self.post_init()
        self.freeze_vision_tower()

    def freeze_vision_tower(self) -> None:
        """Apply `config.freeze_vision` (weight loading recreates parameters, so `from_pretrained` calls it again)."""
        if self.config.freeze_vision:
            self.vision_model.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens -> perceiver latents. pixel_values (B, N, F, C, H, W) -> (B, N, num_latents, vision_width)"""
        if pixel_values.ndim != 6:
            raise ValueError(
                f"pixel_values must be (batch, images, frames, C, H, W), got shape {tuple(pixel_values.shape)}"
            )
        batch, num_media, num_frames = pixel_values.shape[:3]
        images = pixel_values.flatten(0, 2).to(self.vision_model.conv1.weight.dtype)  # (B * N * F, C, H, W)
        if batch * num_media > 1 and bool((images == images[:1]).all()):
            # one picture repeated (the t2id pad image of every sample): encode it once, share its latents
            return self.get_image_features(pixel_values[:1, :1]).expand(batch, num_media, -1, -1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision):
            # through the module's own forward, so ZeRO-3 gathers its direct parameters (class/position embeddings)
            tokens = self.vision_model(images)[1]  # (B * N * F, V, Dv), before ln_post (see build_vision_tower)
        tokens = tokens.reshape(batch, num_media, num_frames * tokens.shape[1], tokens.shape[-1])  # (B, N, F * V, Dv)
        return self.perceiver(tokens)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        media_index: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPast:
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass either pixel_values or image_features, not both")
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(f"cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}")
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        query_length = input_ids.shape[1]
        # a static cache reports its fill level as a 0-d tensor and attends over its full length
        past_length = cache.get_seq_length() if use_cache else 0
        key_length = cache.get_mask_sizes(query_length, 0)[0] if use_cache else query_length

        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        if image_features is not None:
            if media_index is None:
                if not isinstance(past_length, int) or past_length > 0:
                    raise ValueError("with a non-empty cache, pass media_index computed from the full input_ids")
                media_index = media_index_from_input_ids(input_ids, self.config.media_token_id)
                if self.training:  # the collator writes one <image> per image; a host sync every step costs more
                    torch._assert_async(
                        media_index.max() <= image_features.shape[1], "more <image> tokens than images"
                    )
                else:
                    check_media_count(media_index, image_features.shape[1])
            if media_index.shape != input_ids.shape:
                raise ValueError(f"media_index shape {tuple(media_index.shape)} != input_ids {tuple(input_ids.shape)}")
            image_features = image_features.to(self.embed_tokens.weight.dtype)

        hidden_states = self.embed_tokens(input_ids)  # (B, T, D)
        text_config = self.config.text_config
        slopes = build_alibi_slopes(text_config.n_heads, text_config.alibi_bias_max, device=hidden_states.device)
        attention_bias = build_self_attention_bias(
            slopes, attention_mask, query_length, past_length, hidden_states.dtype, key_length
        )  # (B or 1, H, T, T_k)
        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states, image_features, media_index, attention_bias, cache=cache if use_cache else None
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache if use_cache else None, hidden_states=all_hidden_states
        )


class FlamingoForConditionalGeneration(FlamingoPreTrainedModel, GenerationMixin):
    """Flamingo with a tied LM head; `generate()` encodes the images once and reuses the features at every step.

    Example:
        >>> config = FlamingoConfig.from_preset("tiny")
        >>> model = FlamingoForConditionalGeneration(config)
        >>> pixel_values = torch.randn(1, 1, 1, 3, 32, 32)
        >>> input_ids = torch.tensor([[config.media_token_id, 5, 6]])
        >>> model(input_ids=input_ids, pixel_values=pixel_values).logits.shape
        torch.Size([1, 3, 512])
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FlamingoConfig):
        super().__init__(config)
        self.model = FlamingoModel(config)
        self.lm_head = nn.Linear(config.text_config.d_model, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, N, F, C, H, W) -> perceiver latents (B, N, num_latents, vision_width)."""
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        media_index: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): token ids; with a cache, only the new tokens.
            attention_mask (`torch.Tensor` of shape `(B, past + T)`, *optional*): 1 for real tokens, 0 for padding.
            pixel_values (`torch.Tensor` of shape `(B, N, F, C, H, W)`, *optional*): images, encoded in this call.
            image_features (`torch.Tensor` of shape `(B, N, L, Dv)`, *optional*): already encoded images (from
                `get_image_features`). With neither `pixel_values` nor `image_features` the cross-attention blocks are
                skipped (a text-only forward).
            media_index (`torch.LongTensor` of shape `(B, T)`, *optional*): for each token, the 1-based index of the
                most recent `<image>` at or before it in the FULL sequence (0: none). Derived from `input_ids` when
                omitted, which is only right without a cache; `prepare_inputs_for_generation` supplies it.
            cache (`Cache`, *optional*): a `DynamicCache` of earlier steps, or a `StaticCache` (fixed shapes for
                `torch.compile` and CUDA graphs: the keys span its full length, `attention_mask` may then cover
                it all); `past_key_values` is an alias.
            labels (`torch.LongTensor` of shape `(B, T)`, *optional*): next-token targets, -100 ignored; shifted here.
            logits_to_keep (`int`): if > 0, only the logits of the last `logits_to_keep` positions are computed.
        """
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("pass either cache or past_key_values, not both")
            cache = past_key_values
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_features=image_features,
            media_index=media_index,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, image_features=None, **kwargs):
        """Adds `media_index` of the positions fed this step, computed from the full `input_ids`."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, image_features=image_features, **kwargs)
        if image_features is not None:
            step_length = model_inputs["input_ids"].shape[1]
            model_inputs["media_index"] = media_index_from_input_ids(input_ids, self.config.media_token_id)[
                :, -step_length:
            ]
        return model_inputs

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
        """`generate` turns the 2D mask into a 4D one for a static cache; the forward builds its own ALiBi bias from
        the 2D mask, so it is kept."""
        return attention_mask

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **generate_kwargs,
    ):
        """`GenerationMixin.generate` with the images encoded once (generate repeats the features per beam).

        pixel_values (B, N, F, C, H, W) or image_features (B, N, L, Dv); neither gives text-only generation.
        """
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("pass either pixel_values or image_features, not both")
            image_features = self.get_image_features(pixel_values)
        if image_features is not None:
            if input_ids is not None:  # once here: the steps get `media_index` and skip the check
                check_media_count(
                    media_index_from_input_ids(input_ids, self.config.media_token_id), image_features.shape[1]
                )
            generate_kwargs["image_features"] = image_features
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
