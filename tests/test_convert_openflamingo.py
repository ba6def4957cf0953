"""convert-openflamingo on a tiny checkpoint written in the OpenFlamingo / MosaicGPT / open_clip key layouts."""

import pytest
import torch
from open_clip.model import CLIP
from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler
from safetensors.torch import save_file

from grace_hf.commands.cli import main as cli_main
from grace_hf.commands.convert_openflamingo import main
from grace_hf.errors import GraceInputError
from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor
from grace_hf.models.flamingo.tokenization import train_tokenizer

VOCAB = 300


def tiny_config() -> FlamingoConfig:
    return FlamingoConfig.from_preset("tiny", text_config={"vocab_size": VOCAB})


def openflamingo_sources(config: FlamingoConfig) -> tuple[dict, dict, dict, dict]:
    """(checkpoint.pt dict, MosaicGPT dict, open_clip dict, the reference modules) with random weights."""
    torch.manual_seed(0)
    d, dv, text = config.text_config.d_model, config.vision_width, config.text_config
    perceiver = PerceiverResampler(
        dim=dv,
        depth=config.perceiver_depth,
        dim_head=config.perceiver_head_dim,
        heads=config.perceiver_heads,
        num_latents=config.perceiver_num_latents,
        ff_mult=config.perceiver_ff_mult,
    )
    blocks = {
        j: GatedCrossAttentionBlock(
            dim=d, dim_visual=dv, dim_head=config.cross_attn_head_dim, heads=config.cross_attn_heads, ff_mult=2
        )
        for j in range(text.n_layers)
        if (j + 1) % config.cross_attn_every_n_layers == 0
    }
    checkpoint = {f"perceiver.{k}": v for k, v in perceiver.state_dict().items()}
    for j, block in blocks.items():
        with torch.no_grad():
            block.attn_gate.fill_(0.3)
            block.ff_gate.fill_(-0.2)
        for k, v in block.state_dict().items():
            checkpoint[f"lang_encoder.transformer.blocks.{j}.gated_cross_attn_layer.{k}"] = v
            checkpoint[f"lang_encoder.gated_cross_attn_layers.{j}.{k}"] = v  # OpenFlamingo's shared-module twin
    checkpoint["lang_encoder.transformer.wte.weight"] = torch.randn(VOCAB, d)

    mpt = {"transformer.wte.weight": torch.randn(VOCAB + 20, d), "transformer.ln_f.weight": torch.rand(d)}
    for j in range(text.n_layers):
        prefix = f"transformer.blocks.{j}."
        mpt.update(
            {
                prefix + "ln_1.weight": torch.rand(d),
                prefix + "attn.Wqkv.weight": torch.randn(3 * d, d),
                prefix + "attn.q_ln.weight": torch.rand(d),
                prefix + "attn.k_ln.weight": torch.rand(d),
                prefix + "attn.out_proj.weight": torch.randn(d, d),
                prefix + "ln_2.weight": torch.rand(d),
                prefix + "mlp.mlp_up.weight": torch.randn(4 * d, d),
                prefix + "mlp.mlp_down.weight": torch.randn(d, 4 * d),
            }
        )
    text_cfg = {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}
    clip = CLIP(embed_dim=16, vision_cfg=dict(config.vision_config), text_cfg=text_cfg).state_dict()
    return checkpoint, mpt, clip, {"perceiver": perceiver, "blocks": blocks}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("openflamingo")
    config = tiny_config()
    checkpoint, mpt, clip, reference = openflamingo_sources(config)
    torch.save(checkpoint, root / "checkpoint.pt")
    (root / "mpt").mkdir()
    save_file(mpt, root / "mpt" / "model.safetensors")
    torch.save(clip, root / "clip.pt")
    config.save_pretrained(root / "config")
    train_tokenizer(["a dog runs", "id 1 2 3"], vocab_size=280).save_pretrained(root / "tokenizer")
    return root, checkpoint, mpt, clip, reference


def convert_args(root, output, mpt="mpt", config="config/config.json"):
    return [
        "--openflamingo-checkpoint",
        str(root / "checkpoint.pt"),
        "--mpt-weights",
        str(root / mpt),
        "--clip-weights",
        str(root / "clip.pt"),
        "--model-config",
        str(root / config),
        "--output-dir",
        str(output),
    ]


def test_converts_and_loads_with_no_key_left_over(sources, tmp_path):
    root, checkpoint, mpt, clip, reference = sources
    output = tmp_path / "converted"
    assert main([*convert_args(root, output), "--tokenizer", str(root / "tokenizer")]) == 0
    model, info = FlamingoForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    layers = model.model.layers
    assert torch.equal(layers[1].gated_cross_attn.attn.q_proj.weight, reference["blocks"][1].attn.to_q.weight)
    assert torch.equal(layers[3].gated_cross_attn.ff.down_proj.weight, reference["blocks"][3].ff[3].weight)
    assert torch.equal(layers[1].gated_cross_attn.attn_gate, torch.tensor([0.3]))
    assert torch.equal(
        model.model.perceiver.layers[1].attn.kv_proj.weight, reference["perceiver"].layers[1][0].to_kv.weight
    )
    assert torch.equal(layers[2].self_attn.qkv_proj.weight, mpt["transformer.blocks.2.attn.Wqkv.weight"])
    assert torch.equal(layers[0].self_attn.k_layernorm.weight, mpt["transformer.blocks.0.attn.k_ln.weight"])
    assert torch.equal(model.model.vision_model.conv1.weight, clip["visual.conv1.weight"])
    # the checkpoint's (resized) embedding wins over the MPT one, and the head stays tied to it
    assert torch.equal(model.model.embed_tokens.weight, checkpoint["lang_encoder.transformer.wte.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    processor = FlamingoProcessor.from_pretrained(output)
    assert processor.media_token_id == model.config.media_token_id
    assert model.generation_config.eos_token_id == model.config.end_of_chunk_token_id


def _write_broken(root, name, mpt, change):
    broken = dict(mpt)
    change(broken)
    (root / name).mkdir(exist_ok=True)
    save_file(broken, root / name / "model.safetensors")


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (
            "wrong_shape",
            lambda sd: sd.__setitem__("transformer.blocks.0.attn.Wqkv.weight", torch.zeros(5, 5)),
            r"mis-shaped.*transformer\.blocks\.0\.attn\.Wqkv\.weight has shape \(5, 5\)",
        ),
        (
            "missing",
            lambda sd: sd.pop("transformer.blocks.2.ln_2.weight"),
            r"missing keys: model\.layers\.2\.post_attention_layernorm\.weight",
        ),
        (
            "unexpected",
            lambda sd: sd.__setitem__("transformer.blocks.0.attn.Wqkv.bias", torch.zeros(3)),
            r"unexpected keys: .*transformer\.blocks\.0\.attn\.Wqkv\.bias.*no_bias=false",
        ),
    ],
)
def test_bad_keys_are_named_and_nothing_is_written(sources, tmp_path, name, change, message):
    root, _, mpt, _, _ = sources
    _write_broken(root, name, mpt, change)
    output = tmp_path / "converted"
    with pytest.raises(GraceInputError, match=message):
        main(convert_args(root, output, mpt=name))
    assert not output.exists()
    assert cli_main(["convert-openflamingo", *convert_args(root, output, mpt=name)]) == 2
