"""GPU smoke run of the OpenFlamingo-3B shape: random bf16 weights, 20 training steps, one 10-beam generate
constrained to a trie of identifiers; prints tokens/s and peak memory.

    python benchmarks/gpu_3b_smoke.py                   # 3B preset on cuda, bf16
    python benchmarks/gpu_3b_smoke.py --preset tiny     # the same script in seconds on a CPU
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python benchmarks/<name>.py`
from benchmarks.common import sync
from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration
from grace_hf.retrieval.trie import IdentifierTrie


def build_model(preset: str, device: torch.device, dtype: torch.dtype) -> FlamingoForConditionalGeneration:
    """Random weights built directly on the device in `dtype` (no fp32 copy of 3B parameters on the host)."""
    config = FlamingoConfig.from_preset(preset)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = FlamingoForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():  # open the gates so the images matter, as after training
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.5)
    return model


def random_identifiers(
    num_identifiers: int, length: int, vocab_size: int, end_id: int, seed: int = 0
) -> list[list[int]]:
    """Random identifier token sequences, each ending with `end_id`."""
    generator = torch.Generator().manual_seed(seed)
    sequences = torch.randint(3, vocab_size, (num_identifiers, length), generator=generator).tolist()
    return [[*sequence, end_id] for sequence in sequences]


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="openflamingo-3b-vitl-mpt1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 on cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--num-beams", type=int, default=10)
    parser.add_argument("--queries", type=int, default=4)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)

    start = time.perf_counter()
    model = build_model(args.preset, device, dtype)
    config = model.config
    vocab, size = config.text_config.vocab_size, config.vision_config["image_size"]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"preset {args.preset}: {params / 1e9:.3f}B parameters, {dtype}, {device}, built in {time.perf_counter() - start:.1f}s"
    )

    # training: t2id-like samples, loss on the tokens after <image>
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    input_ids = torch.randint(3, vocab, (args.batch, args.length), device=device)
    image_at = args.length // 2
    input_ids[:, image_at] = config.media_token_id
    labels = input_ids.clone()
    labels[:, : image_at + 1] = -100
    pixel_values = torch.randn(args.batch, 1, 1, 3, size, size, device=device, dtype=dtype)
    losses = []
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    sync(device)
    train_seconds = time.perf_counter() - start
    train_tokens = args.steps * args.batch * args.length
    print(
        f"train: {args.steps} steps of {args.batch}x{args.length} in {train_seconds:.2f}s -> "
        f"{train_tokens / train_seconds:,.0f} tokens/s; loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"peak memory {peak_memory_gib(device):.2f} GiB"
    )
    if not all(torch.isfinite(torch.tensor(losses))):
        raise SystemExit("non-finite training loss")

    # retrieval: left-padded prompts, beam search constrained to an identifier trie
    del optimizer
    model.eval()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trie = IdentifierTrie(random_identifiers(1000, 6, vocab, config.end_of_chunk_token_id))
    prompt = torch.randint(3, vocab, (args.queries, 12), device=device)
    prompt[:, -1] = config.media_token_id
    prompt[0, :3] = config.pad_token_id
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    prompt_pixels = torch.randn(args.queries, 1, 1, 3, size, size, device=device, dtype=dtype)
    prompt_length = prompt.shape[1]

    sync(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=prompt,
        attention_mask=mask,
        pixel_values=prompt_pixels,
        num_beams=args.num_beams,
        num_return_sequences=args.num_beams,
        max_new_tokens=7,
        logits_processor=[trie.logits_processor(prompt_length)],
        eos_token_id=config.end_of_chunk_token_id,
        pad_token_id=config.pad_token_id,
        length_penalty=-2.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    sync(device)
    generate_seconds = time.perf_counter() - start
    generated = out.sequences[:, prompt_length:]
    valid = int((trie.lookup(generated, end_token_id=config.end_of_chunk_token_id) >= 0).sum())
    new_tokens = generated.numel()
    print(
        f"generate: {args.queries} queries x {args.num_beams} beams in {generate_seconds:.2f}s -> "
        f"{args.queries / generate_seconds:.2f} queries/s, {new_tokens / generate_seconds:,.0f} beam tokens/s; "
        f"{valid}/{len(generated)} beams spell an identifier; peak memory {peak_memory_gib(device):.2f} GiB"
    )
    if valid != len(generated):
        raise SystemExit("constrained generation left the trie")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
