"""`grace-hf evaluate`: Recall@1/5/10 of a GRACE model over the `queries` split of a prepared dataset.

Candidates are the dataset's collection (its test images); every query counts in the denominator, including
queries whose beams spell no identifier. Multi-process (each process takes a shard of the queries):

    accelerate launch --config_file accelerate_configs/cpu.yaml --num_processes 2 -m grace_hf.retrieval.evaluate \\
        --model runs/synthetic-structured --data data/synthetic/prepared --output runs/eval/metrics.json

With `--config_file accelerate_configs/deepspeed_zero3.yaml` the model is sharded across the processes (ZeRO-3).
Writes `metrics.json` (`--output`), `<stem>_queries.jsonl` (one line per query: its ranking and the gold rank) and
`<stem>_recall.png` (Recall@K for K = 1..10) beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IDENTIFIERS_FILE, IdentifierIndex
from grace_hf.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text
from grace_hf.retrieval.metrics import recall_at_k, recall_curve
from grace_hf.retrieval.retriever import GraceRetriever, RetrievedImage

__all__ = ["evaluate_model", "load_eval_queries", "main"]

KS = (1, 5, 10)


def load_eval_queries(data: str | os.PathLike, limit: int | None = None) -> tuple[list[str], list[str], list[str]]:
    """`(queries, gold image keys, candidate image keys)` of a prepared dataset (a `prepare` directory or a Hub
    dataset repo); every gold image must be a candidate."""
    from grace_hf.data.build import load_prepared

    try:
        dataset = load_prepared(data)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise GraceInputError(f"{data}: not a prepared dataset ({err})") from None
    if "queries" not in dataset:
        raise GraceInputError(f"{data}: no 'queries' split (was it written by `grace-hf prepare`?)")
    split = dataset["queries"]
    if limit is not None:
        split = split.select(range(min(limit, split.num_rows)))
    queries, gold = list(split["query"]), list(split["image_key"])
    if not queries:
        raise GraceInputError(f"{data}: the 'queries' split is empty")
    identifiers_path = Path(data) / IDENTIFIERS_FILE
    if not Path(data).is_dir():  # a Hub dataset repo keeps identifiers.json beside the splits
        from huggingface_hub import hf_hub_download

        identifiers_path = Path(hf_hub_download(str(data), IDENTIFIERS_FILE, repo_type="dataset"))
    candidates = IdentifierIndex.load(identifiers_path).collection
    if not candidates:
        raise GraceInputError(f"{identifiers_path}: empty collection (no test images to rank)")
    candidate_set = set(candidates)
    for position, (query, key) in enumerate(zip(queries, gold)):
        if key not in candidate_set:
            raise GraceInputError(f"{data}: queries[{position}] ({query!r}): gold image {key!r} is not a candidate")
    return queries, gold, candidates


def evaluate_model(
    retriever: GraceRetriever,
    queries: Sequence[str],
    gold: Sequence[str],
    batch_size: int | None = None,
    distributed: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[float]]:
    """Retrieve for every query; return the metrics, one record per query, and the Recall@K curve (K = 1..10)."""
    start = time.perf_counter()
    results = retriever.retrieve(list(queries), top_k=max(KS), batch_size=batch_size, distributed=distributed)
    seconds = time.perf_counter() - start
    rankings = [[hit.image_key for hit in hits] for hits in results]
    metrics: dict[str, Any] = recall_at_k(rankings, list(gold), KS)
    metrics.update(
        num_queries=len(queries),
        num_candidates=len(retriever.candidates),
        queries_per_second=len(queries) / seconds,
        num_queries_without_results=sum(not hits for hits in results),
        num_beams=retriever.num_beams,
        length_penalty=retriever.length_penalty,
        query_image=retriever.query_image,
        seconds=seconds,
    )
    records = [_record(query, key, hits) for query, key, hits in zip(queries, gold, results)]
    return metrics, records, recall_curve(rankings, list(gold), max(KS))


def _record(query: str, gold: str, hits: list[RetrievedImage]) -> dict[str, Any]:
    keys = [hit.image_key for hit in hits]
    return {
        "query": query,
        "gold": gold,
        "gold_rank": keys.index(gold) + 1 if gold in keys else None,
        "image_keys": keys,
        "identifiers": [hit.identifier for hit in hits],
        "scores": [hit.score for hit in hits],
    }


def write_recall_plot(path: str | os.PathLike, curves: Mapping[str, Sequence[float]], title: str) -> None:
    """Recall@K against K, one line per named curve, as a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), [100 * r for r in curve], marker="o", label=name)
    max_k = max(len(curve) for curve in curves.values())
    ax.set(xlabel="K", ylabel="Recall@K (%)", title=title, ylim=(0, 100), xticks=list(range(1, max_k + 1)))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grace-hf evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="Also writes <stem>_queries.jsonl and <stem>_recall.png next to --output.",
    )
    parser.add_argument("--model", required=True, help="trained model directory or Hub id")
    parser.add_argument("--data", required=True, help="prepared dataset directory (`grace-hf prepare`) or Hub id")
    parser.add_argument("--output", required=True, help="metrics JSON file to write")
    parser.add_argument("--num-beams", type=int, default=10, help="beams = ranked identifiers per query (10)")
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="beam score = log-prob / length**penalty; 0 ranks by probability (default), the paper used -2.0",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="queries per generate call, per process")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")
    return parser


def launched_accelerator() -> Any:
    """An `Accelerator` when run by `accelerate launch` with several processes or DeepSpeed, else None (a plain
    process needs none). CPU processes talk over gloo (DESIGN.md §7: without it Accelerate counts one process)."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not deepspeed:
        return None
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true"
    return Accelerator(
        cpu=on_cpu and not deepspeed,  # `cpu=True` makes several CPU processes one MULTI_CPU group
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo" if on_cpu else "nccl")],
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from accelerate import PartialState

    accelerator = launched_accelerator()
    queries, gold, candidates = load_eval_queries(args.data, args.limit)
    retriever = GraceRetriever.from_pretrained(
        args.model,
        accelerator=accelerator,
        dtype=args.dtype,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        batch_size=args.batch_size,
        candidates=candidates,
    )
    metrics, records, curve = evaluate_model(retriever, queries, gold, args.batch_size)
    state = PartialState()
    metrics.update(
        model=str(args.model),
        data=str(args.data),
        num_processes=state.num_processes,
        distributed_type=str(state.distributed_type).split(".")[-1],
    )
    if state.is_main_process:
        output = Path(args.output)
        atomic_write_json(output, metrics)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        atomic_write_text(output.with_name(f"{output.stem}_queries.jsonl"), lines)
        write_recall_plot(output.with_name(f"{output.stem}_recall.png"), {Path(args.model).name: curve}, "Recall@K")
        summary = ", ".join(f"R@{k} {100 * metrics[f'recall@{k}']:.1f}" for k in KS)
        print(
            f"evaluate: {summary} on {metrics['num_queries']} queries, {metrics['num_candidates']} candidates "
            f"({metrics['queries_per_second']:.1f} queries/s); wrote {output}"
        )
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
