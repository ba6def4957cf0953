"""Recall@K of ranked retrieval results: every query counts, including those that returned nothing."""

from __future__ import annotations

import functools
from collections.abc import Sequence

__all__ = ["RecallAtK", "recall_at_k", "recall_curve"]  # noqa: F822 (RecallAtK is made on first use, below)


def _first_distinct(ranking: Sequence[str], k: int) -> list[str]:
    """The first `k` distinct entries of `ranking`, in order."""
    return list(dict.fromkeys(ranking))[:k]


def recall_curve(rankings: Sequence[Sequence[str]], gold: Sequence[str], max_k: int = 10) -> list[float]:
    """Recall@K for K = 1 .. `max_k`: the share of queries whose gold item is among their first K distinct items."""
    if len(rankings) != len(gold):
        raise ValueError(f"got {len(rankings)} rankings for {len(gold)} gold items")
    if not gold:
        raise ValueError("recall needs at least one query")
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    hits_at = [0] * (max_k + 1)  # hits_at[r]: queries whose gold item is at rank r (1-based)
    for ranking, target in zip(rankings, gold):
        top = _first_distinct(ranking, max_k)
        if target in top:
            hits_at[top.index(target) + 1] += 1
    curve, found = [], 0
    for k in range(1, max_k + 1):
        found += hits_at[k]
        curve.append(found / len(gold))
    return curve


def recall_at_k(rankings: Sequence[Sequence[str]], gold: Sequence[str], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """`{"recall@K": share}` for each K in `ks` (shares in [0, 1]); queries with an empty ranking count as misses.

    Example:
        >>> recall_at_k([["a", "b"], [], ["c", "c", "d"]], ["b", "x", "d"], ks=(1, 2))
        {'recall@1': 0.0, 'recall@2': 0.6666666666666666}
    """
    curve = recall_curve(rankings, gold, max(ks))
    return {f"recall@{k}": curve[k - 1] for k in ks}


@functools.cache
def _recall_metric_class() -> type:
    import datasets
    import evaluate

    class RecallAtK(evaluate.Metric):
        """Recall@K as an `evaluate` metric (works offline: no Hub script is loaded).

        Example:
            >>> RecallAtK().compute(predictions=[["a", "b"], ["c"]], references=["b", "c"], ks=[1, 2])
            {'recall@1': 0.5, 'recall@2': 1.0}
        """

        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description="Share of queries whose gold item is among the first K distinct retrieved items.",
                citation="",
                inputs_description=(
                    "predictions: one ranked list of item keys per query (best first; may be empty); "
                    "references: the gold item key of each query; ks: the cut-offs (default 1, 5, 10)."
                ),
                features=datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("string")),
                        "references": datasets.Value("string"),
                    }
                ),
            )

        def _compute(self, predictions, references, ks: Sequence[int] = (1, 5, 10)) -> dict:
            return recall_at_k(predictions, references, ks)

    return RecallAtK


def __getattr__(name: str):
    # `RecallAtK` subclasses `evaluate.Metric`, and importing `evaluate` takes seconds (it loads transformers'
    # pipelines): the class is made on first use, so `recall_at_k` stays a light import for training.
    if name == "RecallAtK":
        return _recall_metric_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
