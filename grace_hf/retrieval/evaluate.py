"""Recall@K of a GRACE model over the evaluation queries of a prepared dataset.

Candidates are the dataset's collection (its test images); every query counts in the denominator, including
queries whose beams spell no identifier. Under `accelerate launch` every process searches a shard of the queries.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grace_hf.data.prepared import load_prepared, prepared_file
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IDENTIFIERS_FILE, IdentifierIndex
from grace_hf.io_utils import atomic_write_json, atomic_write_text
from grace_hf.retrieval.metrics import recall_at_k, recall_curve
from grace_hf.retrieval.plots import write_recall_plot
from grace_hf.retrieval.retriever import GraceRetriever, RetrievedImage

__all__ = [
    "KS",
    "METRICS_FILE",
    "QUERIES_FILE",
    "RECALL_PLOT_FILE",
    "evaluate_model",
    "load_eval_queries",
    "write_evaluation",
]

KS = (1, 5, 10)
METRICS_FILE = "metrics.json"
QUERIES_FILE = "queries.jsonl"
RECALL_PLOT_FILE = "recall.png"


def load_eval_queries(data: str | os.PathLike, limit: int | None = None) -> tuple[list[str], list[str], list[str]]:
    """`(queries, gold image keys, candidate image keys)` of a prepared dataset (a `prepare` directory or a Hub
    dataset repo); every gold image must be a candidate."""
    split = load_prepared(data)["queries"]
    if limit is not None:
        split = split.select(range(min(limit, split.num_rows)))
    queries, gold = list(split["query"]), list(split["image_key"])
    if not queries:
        raise GraceInputError(f"{data}: the 'queries' split is empty")
    identifiers_path = prepared_file(data, IDENTIFIERS_FILE)
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
        query_latency_ms=1000.0 * seconds / len(queries),
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


def write_evaluation(
    directory: str | os.PathLike, metrics: dict[str, Any], records: list[dict[str, Any]], curve: list[float], name: str
) -> None:
    """Write `metrics.json`, `queries.jsonl` (one ranking per query) and `recall.png` into `directory`."""
    directory = Path(directory)
    atomic_write_json(directory / METRICS_FILE, {**metrics, "recall_curve": curve})
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write_text(directory / QUERIES_FILE, lines)
    write_recall_plot(directory / RECALL_PLOT_FILE, {name: curve}, "Recall@K")


if __name__ == "__main__":  # the module was the command's entry point before `grace-hf evaluate`
    print(
        "`-m grace_hf.retrieval.evaluate` is now `-m grace_hf evaluate` (`accelerate launch -m grace_hf evaluate ...`)"
    )
    raise SystemExit(2)
