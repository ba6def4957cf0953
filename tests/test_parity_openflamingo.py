"""Numerical parity with the reference modules: open-flamingo's perceiver and gated cross-attention, and
transformers' MptForCausalLM for the decoder without QK LayerNorm."""

import re

import torch
from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler
from transformers import MptConfig, MptForCausalLM

from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration
from grace_hf.models.flamingo.convert_openflamingo import OPENFLAMINGO_RENAMES, rename_key
from grace_hf.models.flamingo.modeling_flamingo import (
    FlamingoGatedCrossAttentionBlock,
    FlamingoPerceiverResampler,
    media_index_from_input_ids,
)

MEDIA = 1


def load_renamed(module: torch.nn.Module, reference_state: dict, source_prefix: str, target_prefix: str) -> None:
    """Load reference weights through the converter's rename table (so the table is checked too)."""
    renamed = {}
    for key, value in reference_state.items():
        target = rename_key(source_prefix + key, OPENFLAMINGO_RENAMES)
        assert target is not None and target.startswith(target_prefix), (key, target)
        renamed[target.removeprefix(target_prefix)] = value
    module.load_state_dict(renamed, strict=True)


def test_perceiver_matches_open_flamingo():
    config = FlamingoConfig.from_preset("tiny")
    torch.manual_seed(0)
    reference = PerceiverResampler(
        dim=config.vision_width,
        depth=config.perceiver_depth,
        dim_head=config.perceiver_head_dim,
        heads=config.perceiver_heads,
        num_latents=config.perceiver_num_latents,
        ff_mult=config.perceiver_ff_mult,
    ).eval()
    ours = FlamingoPerceiverResampler(config).eval()
    load_renamed(ours, reference.state_dict(), "perceiver.", "model.perceiver.")
    media = torch.randn(2, 3, 1, 17, config.vision_width)  # (B, T_img, F, V, D)
    with torch.no_grad():
        expected = reference(media)
        got = ours(media.flatten(2, 3))
    assert got.shape == expected.shape == (2, 3, config.perceiver_num_latents, config.vision_width)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gated_cross_attention_matches_open_flamingo():
    config = FlamingoConfig.from_preset("tiny")
    torch.manual_seed(0)
    d, dv = config.text_config.d_model, config.vision_width
    reference = GatedCrossAttentionBlock(
        dim=d,
        dim_visual=dv,
        dim_head=config.cross_attn_head_dim,
        heads=config.cross_attn_heads,
        ff_mult=config.cross_attn_ff_mult,
    ).eval()
    with torch.no_grad():
        reference.attn_gate.fill_(0.8)
        reference.ff_gate.fill_(-0.5)
    ours = FlamingoGatedCrossAttentionBlock(config).eval()
    prefix = "lang_encoder.transformer.blocks.0.gated_cross_attn_layer."
    load_renamed(ours, reference.state_dict(), prefix, "model.layers.0.gated_cross_attn.")

    input_ids = torch.tensor([[5, 6, MEDIA, 7, 8, MEDIA, 9, 10], [MEDIA, 5, 6, 7, 8, 9, MEDIA, 10]])
    hidden = torch.randn(2, 8, d)
    media = torch.randn(2, 2, config.perceiver_num_latents, dv)
    media_index = media_index_from_input_ids(input_ids, MEDIA)
    with torch.no_grad():
        expected = reference(hidden, media, media_locations=input_ids == MEDIA)
        got = ours(hidden, media, media_index)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # a decoding step: the reference's "cached media" mode attends to the last image of the prefix
        step = torch.randn(2, 1, d)
        expected_step = reference(step, media, media_locations=input_ids == MEDIA, use_cached_media=True)
        got_step = ours(step, media, media_index[:, -1:])
        torch.testing.assert_close(got_step, expected_step, atol=1e-5, rtol=1e-5)


MPT_TO_OURS = [
    (r"^transformer\.wte\.", "model.embed_tokens."),
    (r"^transformer\.blocks\.(\d+)\.norm_1\.", r"model.layers.\1.input_layernorm."),
    (r"^transformer\.blocks\.(\d+)\.attn\.Wqkv\.", r"model.layers.\1.self_attn.qkv_proj."),
    (r"^transformer\.blocks\.(\d+)\.attn\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^transformer\.blocks\.(\d+)\.norm_2\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^transformer\.blocks\.(\d+)\.ffn\.(up|down)_proj\.", r"model.layers.\1.mlp.\2_proj."),
    (r"^transformer\.norm_f\.", "model.norm."),
    (r"^lm_head\.", "lm_head."),
]


def test_decoder_without_qk_layernorm_matches_transformers_mpt():
    # 6 heads: a head count that is not a power of two takes MPT's interleaved-slope branch
    text = {"vocab_size": 80, "d_model": 96, "n_layers": 3, "n_heads": 6, "qk_ln": False}
    config = FlamingoConfig.from_preset("tiny", text_config=text)
    mpt_config = MptConfig(
        d_model=96,
        n_heads=6,
        n_layers=3,
        expansion_ratio=4,
        max_seq_len=32,
        vocab_size=80,
        attn_config={"alibi": True, "alibi_bias_max": 8},
    )
    torch.manual_seed(0)
    reference = MptForCausalLM(mpt_config).eval()
    ours = FlamingoForConditionalGeneration(config).eval()
    renamed = {}
    for key, value in reference.state_dict().items():
        target = next(re.sub(p, r, key) for p, r in MPT_TO_OURS if re.search(p, key))
        renamed[target] = value
    missing, unexpected = ours.load_state_dict(renamed, strict=False)
    # everything of the decoder is loaded; only the image side (unused in a text-only forward) is left
    assert unexpected == []
    assert all(k.startswith(("model.vision_model.", "model.perceiver.")) or ".gated_cross_attn." in k for k in missing)

    input_ids = torch.randint(3, 80, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        got = ours(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=2, eos_token_id=None)
    torch.testing.assert_close(
        ours.generate(input_ids=input_ids[:1], **kwargs), reference.generate(input_ids=input_ids[:1], **kwargs)
    )
