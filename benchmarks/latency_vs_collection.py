"""Query latency of constrained generative retrieval as the collection grows, beside brute-force dense scoring.

GRACE's efficiency claim: beam search over an identifier trie costs about the same whatever the collection size
(it grows with the identifier length, ~log N), while a dense retriever scores every image vector. This measures
both on this machine: the tiny Flamingo preset (random weights: latency does not depend on training) with numeric
identifiers, `GraceRetriever.retrieve` at batch 1 with 10 beams, against `query @ vectors.T` + top-10 over as many
`--dim`-dimensional vectors (768 = CLIP ViT-L/14; the query encoder's cost is left out of the dense column).

    python benchmarks/latency_vs_collection.py [--sizes 1000 10000 100000] [--queries 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python benchmarks/<name>.py`
from benchmarks.common import median_seconds
from benchmarks.tiny_model import random_flamingo
from grace_hf.identifiers import IdentifierIndex
from grace_hf.retrieval import GraceRetriever

QUERIES = [
    "a red circle on a blue background",
    "two small green squares",
    "a yellow triangle next to a purple star",
    "an orange ring",
    "three black dots in a row",
    "a large white square on gray",
    "a pink heart and a blue moon",
    "stripes of red and green",
]


def median_ms(fn, inputs: list) -> float:
    """Median wall time (ms) of `fn(x)` over `inputs`, after one warm-up call on the first."""
    calls = itertools.cycle(inputs)
    return 1e3 * median_seconds(lambda: fn(next(calls)), len(inputs))[0]


def dense_top10(vectors: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Brute force: score every vector (D, N) against the query (1, D), keep the best 10."""
    return (query @ vectors).topk(10, dim=-1).indices  # (1, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 3_000, 10_000, 30_000, 100_000])
    parser.add_argument("--queries", type=int, default=8, help="queries timed one by one (median)")
    parser.add_argument("--num-beams", type=int, default=10)
    parser.add_argument("--dim", type=int, default=768, help="dense vector width")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    identifiers = [f"id {' '.join(str(n))}" for n in range(2000)]
    model, processor = random_flamingo(QUERIES + identifiers)
    queries = (QUERIES * (args.queries // len(QUERIES) + 1))[: args.queries]
    print(f"torch threads: {args.threads}; tiny Flamingo, {args.num_beams} beams, batch 1; dense dim {args.dim}\n")
    header = (
        f"{'images':>8} | {'id tokens':>9} | {'index build':>11} | {'trie MB':>7} | "
        f"{'GRACE ms/query':>14} | {'dense ms/query':>14} | {'GRACE / dense':>13}"
    )
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        keys = [f"{n}.jpg" for n in range(size)]
        index = IdentifierIndex("numeric", {key: [" ".join(str(n))] for n, key in enumerate(keys)}, [], keys)
        start = time.perf_counter()
        retriever = GraceRetriever(model, processor, index, num_beams=args.num_beams)
        build = time.perf_counter() - start
        grace_ms = median_ms(retriever.retrieve, [[query] for query in queries])
        vectors = torch.nn.functional.normalize(torch.randn(size, args.dim), dim=-1).T.contiguous()  # (D, N)
        query_vectors = torch.nn.functional.normalize(torch.randn(args.queries, 1, args.dim), dim=-1)  # (Q, 1, D)
        dense_ms = median_ms(functools.partial(dense_top10, vectors), list(query_vectors))
        print(
            f"{size:>8,} | {retriever.trie.max_depth:>9} | {build:>10.2f}s | {retriever.trie.nbytes / 2**20:>7.2f} | "
            f"{grace_ms:>14.1f} | {dense_ms:>14.2f} | {grace_ms / dense_ms:>12.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
