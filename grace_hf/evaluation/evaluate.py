"""Recall@K of a GRACE model over the evaluation queries of a prepared dataset, with and without re-ranking.

Candidates are the dataset's collection (its test images), or for the val split the val images; every query counts
in the denominator, including queries whose beams spell no identifier. Under `accelerate launch` every process
searches a shard of the queries. The re-ranking weight is fitted on the val split only
(`grace_hf.retrieval.rerank.fit_or_load`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grace_hf.evaluation.metrics import METRICS_FILE, recall_at_k, recall_curve
from grace_hf.evaluation.plots import RECALL_PLOT_FILE, RERANKED_SUFFIX, write_recall_plot
from grace_hf.io_utils import atomic_write_json, atomic_write_text
from grace_hf.retrieval.results import RetrievedImage
from grace_hf.retrieval.retriever import GraceRetriever

__all__ = [
    "KS",
    "METRICS_FILE",
    "QUERIES_FILE",
    "evaluate_model",
    "write_evaluation",
]

KS = (1, 5, 10)
QUERIES_FILE = "queries.jsonl"


def evaluate_model(
    retriever: GraceRetriever,
    queries: Sequence[str],
    gold: Sequence[str],
    batch_size: int | None = None,
    distributed: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[float]]:
    """Retrieve for every query; return the metrics, one record per query, and the Recall@K curve (K = 1..10).

    With a reranker on the retriever, the metrics are those of the beams' own ranking, and `metrics["rerank"]` holds
    the re-ranked Recall@K (and its curve, weight and beams) of the same search; each record has both rankings.
    """
    reranker = retriever.reranker
    start = time.perf_counter()
    top_k = max(KS) if reranker is None else retriever.num_beams
    results = retriever.retrieve(
        list(queries), top_k=top_k, batch_size=batch_size, distributed=distributed, rerank=False
    )
    seconds = time.perf_counter() - start
    rankings = [[hit.image_key for hit in hits[: max(KS)]] for hits in results]
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
    records = [_record(query, key, hits[: max(KS)]) for query, key, hits in zip(queries, gold, results)]
    if reranker is not None:
        start = time.perf_counter()
        reranked = [hits[: max(KS)] for hits in reranker.rerank(list(queries), results)]
        rerank_seconds = time.perf_counter() - start
        reranked_keys = [[hit.image_key for hit in hits] for hits in reranked]
        metrics["rerank"] = {
            **recall_at_k(reranked_keys, list(gold), KS),
            "recall_curve": recall_curve(reranked_keys, list(gold), max(KS)),
            "weight": reranker.weight,
            "num_beams": reranker.num_beams,
            "dense": reranker.scorer.directory,
            "dense_fingerprint": reranker.scorer.fingerprint,
            "query_latency_ms": 1000.0 * (seconds + rerank_seconds) / len(queries),
            "rerank_seconds": rerank_seconds,
        }
        for record, hits in zip(records, reranked):
            reranked_record = _record(record["query"], record["gold"], hits)
            record["reranked"] = {key: reranked_record[key] for key in ("gold_rank", "image_keys", "scores")}
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
    curves = {name: curve}
    if "rerank" in metrics:
        curves[f"{name}{RERANKED_SUFFIX}"] = metrics["rerank"]["recall_curve"]
    write_recall_plot(directory / RECALL_PLOT_FILE, curves, "Recall@K")


if __name__ == "__main__":  # the module was the command's entry point before `grace-hf evaluate`
    print(
        "`-m grace_hf.evaluation.evaluate` is now `-m grace_hf evaluate` (`accelerate launch -m grace_hf evaluate ...`)"
    )
    raise SystemExit(2)
