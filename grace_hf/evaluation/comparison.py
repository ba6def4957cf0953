"""One Markdown table of Recall@K, training time and query latency across runs.

Each run directory holds a `metrics.json`: a generative run's (written by `grace-hf evaluate`,
keys `recall@1/5/10`, `num_queries`, `queries_per_second`, optional `train_seconds` and
`identifier_kind`) or the dense baseline's (`grace-hf baseline-clip`, `method: dense-clip`,
`query_latency_ms`). Missing optional values show as "-". A run evaluated with `--rerank` (its metrics hold a
`rerank` object: the re-ranked Recall@K of the same search) gets a second row, `<run> + rerank`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grace_hf.errors import GraceInputError
from grace_hf.evaluation.metrics import METRICS_FILE
from grace_hf.io_utils import read_json

TABLE_FILE = "comparison.md"
COLUMNS = ("run", "method", "R@1", "R@5", "R@10", "queries", "train time (s)", "latency (ms/query)")


def load_run_metrics(run: str | os.PathLike) -> dict[str, Any]:
    """The metrics of a run: `run/metrics.json`, or `run` itself when it is a JSON file."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise GraceInputError(f"{run}: no metrics.json (not an evaluated run directory)")
    metrics = read_json(path, "metrics file")
    if not isinstance(metrics, dict):
        raise GraceInputError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    if "recall@1" not in metrics:
        raise GraceInputError(f"{path}: not the metrics of an evaluated run (no recall@1)")
    _check_recalls(path, metrics, "")
    if isinstance(metrics.get("rerank"), dict):
        _check_recalls(path, metrics["rerank"], "rerank.")
    return metrics


def _is_recall(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _check_recalls(path: Path, metrics: Mapping[str, Any], prefix: str) -> None:
    """Every `recall@K` a number in [0, 1] and `recall_curve`, when given, a list of them."""
    for key, value in metrics.items():
        if key.startswith("recall@") and not _is_recall(value):
            raise GraceInputError(f"{path}: {prefix}{key} must be a recall between 0 and 1, got {value!r}")
    curve = metrics.get("recall_curve")
    if curve is not None and not (isinstance(curve, list) and curve and all(_is_recall(r) for r in curve)):
        raise GraceInputError(f"{path}: {prefix}recall_curve must be a list of recalls between 0 and 1")


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_row(name: str, metrics: Mapping[str, Any]) -> list[str]:
    """One table row: recalls in percent; latency from `query_latency_ms`, else 1000 / `queries_per_second`."""
    method = metrics.get("identifier_kind") or metrics.get("method") or "-"
    latency = _number(metrics, "query_latency_ms")
    qps = _number(metrics, "queries_per_second")
    if latency is None and qps:
        latency = 1000.0 / qps
    recalls = [_number(metrics, f"recall@{k}") for k in (1, 5, 10)]
    num_queries = _number(metrics, "num_queries")
    return [
        name,
        str(method),
        *(_cell(None if r is None else 100.0 * r, ".1f") for r in recalls),
        _cell(num_queries, ".0f"),
        _cell(_number(metrics, "train_seconds"), ".1f"),
        _cell(latency, ".2f"),
    ]


def run_name(run: str | os.PathLike) -> str:
    path = Path(run).resolve()
    return path.parent.name if path.suffix == ".json" else path.name


def reranked_metrics(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The metrics of a run's re-ranked evaluation as a row of their own, or None when it was not re-ranked."""
    rerank = metrics.get("rerank")
    if not isinstance(rerank, dict) or _number(rerank, "recall@1") is None:
        return None
    method = metrics.get("identifier_kind") or metrics.get("method")
    weight, beams = _number(rerank, "weight"), _number(rerank, "num_beams")
    details = ", ".join(
        part
        for part in (
            None if weight is None else f"weight {weight:.2f}",
            None if beams is None else f"{beams:.0f} beams",
        )
        if part
    )
    return {
        **metrics,
        **rerank,
        "identifier_kind": (f"{method} + rerank" if method else "rerank") + (f" ({details})" if details else ""),
        "queries_per_second": None,
    }


def comparison_rows(run_dirs: Sequence[str | os.PathLike]) -> list[tuple[str, dict[str, Any]]]:
    """`(row name, metrics)` per table row: each run, then its re-ranked evaluation where it has one."""
    rows = []
    for run_dir in run_dirs:
        metrics = load_run_metrics(run_dir)
        rows.append((run_name(run_dir), metrics))
        reranked = reranked_metrics(metrics)
        if reranked is not None:
            rows.append((f"{run_name(run_dir)} + rerank", reranked))
    return rows


def comparison_table(run_dirs: Sequence[str | os.PathLike]) -> str:
    """A Markdown table with one row per run directory, in the given order (and one per re-ranked evaluation)."""
    rows = [table_row(name, metrics) for name, metrics in comparison_rows(run_dirs)]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
