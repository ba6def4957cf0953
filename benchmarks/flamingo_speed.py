"""Speed of grace_hf's Flamingo against the `open-flamingo` reference on the same small shape, in one run.

    python benchmarks/flamingo_speed.py                 # defaults: CPU, 1 thread
    python benchmarks/flamingo_speed.py --device cuda --threads 8 --repeats 10

The reference is `open_flamingo.src.flamingo.Flamingo` wrapped around transformers' `MptForCausalLM` of the same
shape (as OpenFlamingo's factory does, without downloading anything), with an open_clip ViT of the same shape.
Both train the same parameters (everything but the vision tower). Measured: one training step (forward, backward,
AdamW) and one beam-search `generate()` (ours: images encoded once, KV cache; the reference: its own generate,
which encodes the images once per beam).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from transformers import MptConfig, MptForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python benchmarks/<name>.py`
from benchmarks.common import median_seconds
from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration

MEDIA, EOC, PAD = 1, 0, 2
VISION = {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8, "mlp_ratio": 4.0}
# the reference hard-codes its perceiver (depth 6, 8 x 64 heads, 64 latents) and cross-attention (8 x 64, ff x4)
SHAPE = {
    "vision_config": VISION,
    "vision_quick_gelu": False,
    "text_config": {"vocab_size": 2000, "d_model": 512, "n_layers": 8, "n_heads": 8, "qk_ln": False},
    "cross_attn_every_n_layers": 2,
    "media_token_id": MEDIA,
    "end_of_chunk_token_id": EOC,
    "pad_token_id": PAD,
}


def build_ours(device: torch.device) -> FlamingoForConditionalGeneration:
    return FlamingoForConditionalGeneration(FlamingoConfig(**SHAPE)).to(device)


def build_reference(config: FlamingoConfig) -> Flamingo:
    """open-flamingo's `Flamingo` of `config`'s shape: an open_clip ViT and transformers' `MptForCausalLM`, joined as
    OpenFlamingo's factory joins them (its perceiver and cross-attention shapes are fixed: those of the presets)."""
    vision, text = config.vision_config, config.text_config
    clip = open_clip.model.CLIP(
        embed_dim=vision["width"],
        vision_cfg=vision,
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1},
        quick_gelu=config.vision_quick_gelu,
    )
    clip.visual.output_tokens = True
    lang = MptForCausalLM(
        MptConfig(
            d_model=text.d_model,
            n_heads=text.n_heads,
            n_layers=text.n_layers,
            expansion_ratio=text.expansion_ratio,
            vocab_size=text.vocab_size,
            max_seq_len=2048,
            attn_config={"alibi": True, "alibi_bias_max": text.alibi_bias_max},
        )
    )
    extend_instance(lang, FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("transformer.blocks")
    return Flamingo(
        clip,
        lang,
        config.end_of_chunk_token_id,
        config.media_token_id,
        vis_dim=vision["width"],
        cross_attn_every_n_layers=config.cross_attn_every_n_layers,
    )


def make_batch(batch: int, length: int, image_position: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, SHAPE["text_config"]["vocab_size"], (batch, length), generator=generator)
    input_ids[:, image_position] = MEDIA
    size = VISION["image_size"]
    pixel_values = torch.randn(batch, 1, 1, 3, size, size, generator=generator)
    return input_ids.to(device), torch.ones_like(input_ids).to(device), pixel_values.to(device)


def train_step_fn(model, forward: Callable, device: torch.device) -> Callable[[], None]:
    params = [p for name, p in model.named_parameters() if "vision" not in name]
    for name, param in model.named_parameters():
        param.requires_grad_("vision" not in name)
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        forward().loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a busy machine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-length", type=int, default=32)
    parser.add_argument("--gen-batch", type=int, default=2)
    parser.add_argument("--num-beams", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours, reference = build_ours(device).train(), build_reference(FlamingoConfig(**SHAPE)).to(device).train()

    ids, mask, pixels = make_batch(args.train_batch, args.train_length, 8, device)
    labels = ids.clone()
    labels[:, :9] = -100
    train = {
        "grace_hf": median_seconds(
            train_step_fn(
                ours, lambda: ours(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels), device
            ),
            args.repeats,
            device,
        ),
        "open-flamingo": median_seconds(
            train_step_fn(reference, lambda: reference(pixels, ids, attention_mask=mask, labels=labels), device),
            args.repeats,
            device,
        ),
    }

    ours.eval()
    reference.eval()
    prompt, prompt_mask, prompt_pixels = make_batch(args.gen_batch, 12, 11, device, seed=1)
    # left-padded retrieval prompts (an all-ones mask would be dropped by generate, which the reference can't take)
    prompt[-1, :2], prompt_mask[-1, :2] = PAD, 0
    common = dict(num_beams=args.num_beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    with torch.no_grad():
        generate = {
            "grace_hf": median_seconds(
                lambda: ours.generate(
                    input_ids=prompt,
                    attention_mask=prompt_mask,
                    pixel_values=prompt_pixels,
                    pad_token_id=PAD,
                    eos_token_id=EOC,
                    **common,
                ),
                args.repeats,
                device,
            ),
            "open-flamingo": median_seconds(
                lambda: reference.generate(
                    prompt_pixels, prompt, attention_mask=prompt_mask, pad_token_id=PAD, **common
                ),
                args.repeats,
                device,
            ),
        }

    text = SHAPE["text_config"]
    print(
        f"shape: ViT {VISION['layers']}x{VISION['width']} @ {VISION['image_size']}px/{VISION['patch_size']}, "
        f"perceiver 6x(8x64), MPT {text['n_layers']}x{text['d_model']} (vocab {text['vocab_size']}), "
        f"cross-attn every {SHAPE['cross_attn_every_n_layers']}; device {device}, threads {args.threads}, "
        f"median of {args.repeats}"
    )
    rows = [
        (f"train step (batch {args.train_batch} x {args.train_length})", train),
        (f"generate (batch {args.gen_batch}, {args.num_beams} beams, {args.new_tokens} new)", generate),
    ]
    print(f"{'measure':<40} {'grace_hf s':>11} {'open-flamingo s':>16} {'speed-up':>9}")
    for name, result in rows:
        ours, theirs = result["grace_hf"][0], result["open-flamingo"][0]
        print(f"{name:<40} {ours:>11.4f} {theirs:>16.4f} {theirs / ours:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
