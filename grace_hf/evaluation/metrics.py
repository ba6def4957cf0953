"""Recall@K of ranked retrieval results: every query counts, including those that returned nothing."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["METRICS_FILE", "recall_at_k", "recall_curve"]

METRICS_FILE = "metrics.json"  # the scores every run writes: a model, an evaluation, the dense baseline, the demo


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
