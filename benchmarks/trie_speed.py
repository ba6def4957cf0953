"""The identifier trie as tensors vs the original's nested-dict trie behind `prefix_allowed_tokens_fn`.

For 10k / 100k / 1M numeric identifiers (`id 1 2 3<|endofchunk|>`, one token per digit) it measures, side by side:
build time, memory held by the trie, and the time of one masking step for 32 queries x 10 beams: the project's
`TrieLogitsProcessor` (in place, as the retriever runs it under beam search) vs transformers' `PrefixConstrainedLogitsProcessor` over a nested-dict trie. A step is timed
at every depth of a decode (rows = prefixes of random identifiers) and averaged; scores cover a vocabulary of
`--vocab` tokens (50280 = OpenFlamingo's tokenizer; the tiny preset's is 512).

    python benchmarks/trie_speed.py [--sizes 10000 100000 1000000] [--vocab 50280 512] [--threads 1]
    python benchmarks/trie_speed.py --device cuda --vocab 50280      # the masking step on a GPU
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from pathlib import Path

import torch
from transformers import PrefixConstrainedLogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python benchmarks/<name>.py`
from benchmarks.common import sync
from benchmarks.dict_trie import NestedDictTrie
from grace_hf.retrieval.trie import IdentifierTrie

ID_TOKEN, END_TOKEN, PAD_TOKEN, FIRST_DIGIT = 3, 0, 2, 10  # ids like the tiny tokenizer's


def numeric_identifiers(count: int) -> list[list[int]]:
    """Token ids of `id <n><|endofchunk|>` for n = 0 .. count - 1, one token per digit."""
    return [[ID_TOKEN, *(FIRST_DIGIT + int(d) for d in str(n)), END_TOKEN] for n in range(count)]


def timed(fn, *args, repeats: int = 1, warmup: bool = False) -> tuple[float, object]:
    """Best wall time (seconds) of `repeats` back-to-back calls `fn(*args)`, after an optional warm-up call, and
    the last result. Best-of: on a shared machine the noise only ever adds time."""
    gc.collect()
    result = fn(*args) if warmup else None
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn(*args)
        sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def held_memory(build, *args) -> int:
    """Bytes still allocated (as traced by tracemalloc) after `build(*args)` returns, while its result is alive."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    result = build(*args)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del result
    return held


def masking_step_times(trie, reference, sequences, vocab: int, rows: int, num_beams: int, repeats: int, device):
    """Mean time (s) of one masking step over the depths of a decode, ours and transformers'."""
    rng = random.Random(0)
    depth = max(map(len, sequences))
    longest = [s for s in sequences if len(s) == depth]  # most identifiers: a decode goes through every depth
    picked = [longest[rng.randrange(len(longest))] for _ in range(rows)]
    prompt_length = 4
    ours_total = theirs_total = 0.0
    for step in range(depth):
        input_ids = torch.tensor(
            [[PAD_TOKEN] * prompt_length + s[:step] for s in picked], device=device
        )  # (R, P+step)
        scores = torch.randn(rows, vocab, device=device).log_softmax(-1)  # (R, V)
        ours = trie.logits_processor(prompt_length, inplace=True)  # as the retriever runs it under beam search
        theirs = PrefixConstrainedLogitsProcessor(
            reference.prefix_allowed_tokens_fn(prompt_length, PAD_TOKEN), num_beams
        )
        theirs_time, theirs_out = timed(theirs, input_ids, scores, repeats=repeats, warmup=True)
        ours_time, ours_out = timed(ours, input_ids, scores.clone(), repeats=repeats, warmup=True)
        assert torch.equal(ours_out, theirs_out), "the two processors disagree"
        ours_total, theirs_total = ours_total + ours_time, theirs_total + theirs_time
    return ours_total / depth, theirs_total / depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--vocab", type=int, nargs="+", default=[50280, 512])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--beams", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10, help="masking calls per depth (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings on a busy box)")
    parser.add_argument("--device", default="cpu", help="where the scores live: cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = args.queries * args.beams
    print(
        f"device {args.device}, torch threads: {torch.get_num_threads()}; masking step: {args.queries} queries x {args.beams} beams\n"
    )
    header = (
        f"{'identifiers':>11} | {'build ours':>10} | {'build dict':>10} | {'memory ours':>11} | {'memory dict':>11} | "
        + " | ".join(f"{f'mask ours V={v}':>16} | {f'mask HF V={v}':>16} | {'speedup':>7}" for v in args.vocab)
    )
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        sequences = numeric_identifiers(size)
        build_ours, trie = timed(IdentifierTrie, sequences)
        build_dict, reference = timed(NestedDictTrie, sequences)
        memory_ours = held_memory(IdentifierTrie, sequences)
        memory_dict = held_memory(NestedDictTrie, sequences)
        cells = [
            f"{size:>11,}",
            f"{build_ours:>9.2f}s",
            f"{build_dict:>9.2f}s",
            f"{memory_ours / 2**20:>8.1f} MB",
            f"{memory_dict / 2**20:>8.1f} MB",
        ]
        for vocab in args.vocab:
            ours, theirs = masking_step_times(
                trie, reference, sequences, vocab, rows, args.beams, args.repeats, torch.device(args.device)
            )
            cells += [f"{1e3 * ours:>13.2f} ms", f"{1e3 * theirs:>13.2f} ms", f"{theirs / ours:>6.1f}x"]
        print(" | ".join(cells), flush=True)
        del trie, reference


if __name__ == "__main__":
    main()
