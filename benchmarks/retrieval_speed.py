"""Retrieval speed at batch 1, 8, 32 and 128: the fast path beside the eager path and the original way, in one run.

Each row decodes the same random queries the way `GraceRetriever` does (10 beams, every beam returned with its
score, `--prompt-tokens`-token text-only prompts, identifiers of `--id-tokens` random tokens + the end token), after
one warm-up call, median of `--repeats` calls, identifiers and scores brought back to the host:

- fast: `TrieBeamSearch` (static cache, prompt encoded once per query, each beam's trie node carried along, no host
  sync inside; on CUDA the whole call replays one CUDA graph); `--compile` adds a row with its step compiled;
- eager: `generate` + `TrieLogitsProcessor` (the retriever's path on a CPU);
- original: `generate(prefix_allowed_tokens_fn=...)` over the original's nested-dict trie (transformers'
  `PrefixConstrainedLogitsProcessor`).

A second table times one trie step per decoding step (mean over the depths of a decode, rows = prefixes of random
identifiers): the fast path's mask + node advance, the eager path's processor (walk + mask), the original's
processor. On CUDA each is captured in a CUDA graph and replayed, so the figure is GPU time, not launch overhead.

    python benchmarks/retrieval_speed.py --preset tiny        # CPU: the tiny model, 2,000 identifiers, seconds
    python benchmarks/retrieval_speed.py                      # GPU: OpenFlamingo-3B shape, bf16, 100k identifiers
    python benchmarks/retrieval_speed.py --preset tiny --dtype float32 --compile   # GPU: do all paths agree?
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from dict_trie import NestedDictTrie
from gpu_3b_smoke import build_model
from transformers import PrefixConstrainedLogitsProcessor

from grace_hf.retrieval import IdentifierTrie, TrieBeamSearch
from grace_hf.retrieval.decoding import beam_generation_config

PRESETS = {  # name -> (model preset, identifiers)
    "tiny": ("tiny", 2_000),
    "3b": ("openflamingo-3b-vitl-mpt1b", 100_000),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time of `fn` over `repeats` calls after one warm-up call (compilation, graph capture), and what
    the warm-up call returned."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def ordinary_tokens(vocab: int, specials: set[int]) -> torch.Tensor:
    """Token ids that are not special: what random prompts and identifiers are drawn from."""
    return torch.tensor(sorted(set(range(3, vocab)) - specials))


def random_sequences(count: int, length: int, tokens: torch.Tensor, seed: int) -> torch.Tensor:
    """(count, length) tokens drawn uniformly from `tokens`."""
    generator = torch.Generator().manual_seed(seed)
    return tokens[torch.randint(len(tokens), (count, length), generator=generator)]


def ranked(identifiers: torch.Tensor, scores: torch.Tensor) -> list[list[int]]:
    """Each query's finished identifiers, best first (filler beams dropped), as the retriever ranks them."""
    return [
        [i for i, s in zip(row, row_scores) if i >= 0 and s > -1e8]
        for row, row_scores in zip(identifiers.tolist(), scores.float().tolist())
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: 3b on CUDA, tiny on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--num-beams", type=int, default=10)
    parser.add_argument("--identifiers", type=int, default=None, help="default: the preset's (2,000 / 100,000)")
    parser.add_argument("--id-tokens", type=int, default=7, help="tokens per identifier, before the end token")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rows", nargs="+", default=["fast", "eager", "original"], choices=["fast", "eager", "original"]
    )
    parser.add_argument("--compile", action="store_true", help="add a row with the fast path's step compiled")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset, default_count = PRESETS[args.preset or ("3b" if device.type == "cuda" else "tiny")]
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)

    started = time.perf_counter()
    model = build_model(preset, device, dtype).eval()
    config = model.config
    vocab, eos, pad = config.text_config.vocab_size, config.end_of_chunk_token_id, config.pad_token_id
    ordinary = ordinary_tokens(vocab, {eos, pad, config.media_token_id})
    count = args.identifiers or default_count
    sequences = [s + [eos] for s in random_sequences(count, args.id_tokens, ordinary, seed=0).tolist()]
    trie, reference = IdentifierTrie(sequences), NestedDictTrie(sequences)
    beams = args.num_beams
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {args.threads} thread(s)'}; "
        f"preset {preset} ({dtype}), {count:,} identifiers x {args.id_tokens} tokens + end, {beams} beams, "
        f"{args.prompt_tokens}-token text-only prompts; median of {args.repeats} after a warm-up; "
        f"built in {time.perf_counter() - started:.0f}s\n"
    )

    generation_config = beam_generation_config(beams, trie.max_depth, 0.0, eos, pad)
    searches = {"fast": TrieBeamSearch(model, trie, beams, eos, pad)}
    if args.compile:
        searches["fast compiled"] = TrieBeamSearch(model, trie, beams, eos, pad, compile=True)

    def run(row: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        if row in searches:
            output = searches[row](input_ids, attention_mask)
            return ranked(output.identifiers, output.scores)
        prompt_length = input_ids.shape[1]
        constraint = (
            {"logits_processor": [trie.logits_processor(prompt_length, pad, inplace=True)]}
            if row == "eager"
            else {"prefix_allowed_tokens_fn": reference.prefix_allowed_tokens_fn(prompt_length, pad)}
        )
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config, **constraint
            )
        found = trie.lookup(output.sequences[:, prompt_length:], end_token_id=eos)
        return ranked(found.view(-1, beams), output.sequences_scores.view(-1, beams))

    rows = [*searches, *(row for row in args.rows if row != "fast")] if "fast" in args.rows else args.rows
    print(
        "| batch | "
        + " | ".join(f"{row} ms | {row} q/s" for row in rows)
        + f" | {rows[0]} faster than | same ranking |"
    )
    print("| --- | " + " | ".join("--- | ---" for _ in rows) + " | --- | --- |")
    for batch in args.batches:
        input_ids = random_sequences(batch, args.prompt_tokens, ordinary, seed=batch).to(device)
        attention_mask = torch.ones_like(input_ids)
        seconds, results = {}, {}
        for row in rows:
            call = functools.partial(run, row, input_ids, attention_mask)
            seconds[row], results[row] = median_seconds(call, args.repeats, device)
        cells = [f"{1e3 * seconds[row]:.1f} | {batch / seconds[row]:,.1f}" for row in rows]
        baseline = rows[0]
        ratios = ", ".join(f"{seconds[row] / seconds[baseline]:.1f}x {row}" for row in rows[1:])
        agree = ", ".join(
            f"{sum(a == b for a, b in zip(results[baseline], results[row]))}/{batch} vs {row}" for row in rows[1:]
        )
        print(f"| {batch} | " + " | ".join(cells) + f" | {ratios} | {agree} |", flush=True)

    print(
        "\ntrie step (mean over the depths of a decode; "
        + ("CUDA graph replays" if device.type == "cuda" else "eager")
        + ")"
    )
    print("| batch | rows | fast: mask + advance ms | eager: walk + mask ms | original ms | fast vs original |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in args.batches:
        times = trie_step_times(trie, reference, sequences, batch, beams, vocab, pad, device)
        print(
            f"| {batch} | {batch * beams} | {times['fast']:.4f} | {times['eager']:.4f} | {times['original']:.3f} "
            f"| {times['original'] / times['fast']:.0f}x |",
            flush=True,
        )
    return 0


def time_step(fn: Callable[[], object], device: torch.device, repeats: int = 50, graph: bool = True) -> float:
    """Mean milliseconds of `fn`: on CUDA (with `graph`) the GPU time of a captured graph replayed `repeats` times."""
    fn()
    if device.type != "cuda" or not graph:
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        return 1e3 * (time.perf_counter() - start) / repeats
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def trie_step_times(trie, reference, sequences, batch, beams, vocab, pad, device) -> dict[str, float]:
    """Mean ms of one masking step at each depth of a decode, for `batch` x `beams` rows, three ways (the original
    reads every row on the host, so it runs eagerly)."""
    generator = torch.Generator().manual_seed(0)
    rows = batch * beams
    picked = torch.tensor(sequences)[torch.randint(len(sequences), (rows,), generator=generator)].to(device)
    prompt = torch.full((rows, 4), pad, device=device)
    processor = trie.logits_processor(prompt.shape[1], pad, inplace=True)
    original = PrefixConstrainedLogitsProcessor(reference.prefix_allowed_tokens_fn(prompt.shape[1], pad), beams)
    totals = {"fast": 0.0, "eager": 0.0, "original": 0.0}
    for depth in range(trie.max_depth):
        input_ids = torch.cat([prompt, picked[:, :depth]], 1)  # (R, 4 + depth)
        node = trie.walk(picked[:, :depth])  # (R,) what the fast path carries
        scores = torch.randn(rows, vocab, device=device).log_softmax(-1)  # (R, V)
        parents = node.view(batch, beams).repeat(1, 2).flatten()  # (B * 2K,) the candidates' beams
        tokens = picked[:, depth].repeat(2)

        def fast(node=node, scores=scores, depth=depth, parents=parents, tokens=tokens):
            trie.mask_scores(node, scores, pad, depth, inplace=True)
            trie.advance(parents, tokens)

        totals["fast"] += time_step(fast, device)
        totals["eager"] += time_step(lambda i=input_ids, s=scores: processor(i, s), device)
        totals["original"] += time_step(lambda i=input_ids, s=scores: original(i, s), device, repeats=3, graph=False)
    return {name: total / trie.max_depth for name, total in totals.items()}


if __name__ == "__main__":
    raise SystemExit(main())
