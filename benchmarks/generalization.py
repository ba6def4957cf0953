"""GRACE against the dense baseline it re-ranks with, on the demo data and on a held-out synthetic collection.

    python benchmarks/generalization.py --work-dir runs/generalization

Two collections, written by `grace-hf synthetic`:
- `demo`: the demo's data (500 images, seed 0, 64x64 RGB PNG in one folder, 10% val, 10% test). The synthetic
  recipes' settings were chosen on val captions only (of this collection and of a 2,000-image one, seed 1).
- `check`: 2,500 images, seed 7, sides 48-128, PNG and JPEG, RGB, gray and RGBA, five sub-folders, 8% val, 10% test,
  the extended caption templates. Nothing was chosen on it: it is run once, with the defaults as they are.

Per collection: the dense baseline (`baseline-clip` defaults), then per method the demo's path (prepare, train with
`recipes/synthetic/<kind>.yaml`, fit the re-ranking weight on the val captions, evaluate the test captions alone and
re-ranked by that dense baseline). Every figure is a test caption ranking the collection's test images. The goals
checked: the best method alone reaches the dense baseline's R@1; re-ranked, 5 points above it. One torch thread.
`--reuse` keeps finished stages of an earlier run in the same work directory.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grace_hf.commands.demo import evaluate_kind, train_kind
from grace_hf.data.synthetic import PSEUDO_QUERIES_JSON, SYNTHETIC_JSON, SyntheticStyle, write_synthetic
from grace_hf.dense.directory import FEATURES_FILE
from grace_hf.dense.training import run_baseline
from grace_hf.errors import GraceInputError
from grace_hf.model_dir import METRICS_FILE
from grace_hf.outputs import BENCHMARK, finish_output_dir, is_complete_output, open_output_dir


@dataclass
class Collection:
    num_images: int
    seed: int
    style: SyntheticStyle = field(default_factory=SyntheticStyle)


COLLECTIONS = {
    "demo": Collection(500, 0),
    "check": Collection(
        2500,
        7,
        SyntheticStyle(
            image_sizes=(48, 64, 96, 128),
            formats=("png", "jpeg"),
            modes=("RGB", "RGB", "RGB", "L", "RGBA"),
            subfolders=5,
            val_fraction=0.08,
            test_fraction=0.1,
            caption_style="extended",
        ),
    ),
}
# method -> (identifier kind, prepare options: None = the demo's; "dense" = the dense baseline's image embeddings)
METHODS: dict[str, tuple[str, str | None]] = {
    "rq-pixels": ("rq", None),
    "rq-dense": ("rq", "dense"),
    "structured-pixels": ("structured", None),
}
DEFAULT_METHODS = ("rq-pixels", "rq-dense")


def _log(message: str) -> None:
    print(f"==> [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _figures(metrics: dict[str, Any]) -> str:
    return " | ".join(f"{100 * metrics[f'recall@{k}']:.1f}" for k in (1, 5, 10))


def run_collection(name: str, work: Path, methods: list[str], reuse: bool) -> tuple[list[str], str]:
    """Every stage for one collection; its table rows (markdown) and the goals' verdict."""
    spec, out = COLLECTIONS[name], work / name
    out.mkdir(parents=True, exist_ok=True)
    data, dense_dir = out / "data", out / "dense-clip"
    if not (reuse and is_complete_output(data)):
        _log(f"{name}: {spec.num_images} synthetic images -> {data}")
        write_synthetic(data, spec.num_images, spec.seed, overwrite=True, style=spec.style)
    if not (reuse and is_complete_output(dense_dir)):
        _log(f"{name}: dense baseline -> {dense_dir}")
        run_baseline(data / SYNTHETIC_JSON, data, dense_dir, data / PSEUDO_QUERIES_JSON, overwrite=True)
    dense = json.loads((dense_dir / METRICS_FILE).read_text())
    rows = [f"| {name} | dense baseline (`baseline-clip`) | {_figures(dense)} | {dense['train_seconds']:.0f} |"]
    alone, reranked = [], []
    for method in methods:
        kind, source = METHODS[method]
        options = {"image_features": str(dense_dir / FEATURES_FILE)} if source == "dense" else None
        model_dir = out / f"model-{method}"
        if not (reuse and is_complete_output(model_dir)):
            _log(f"{name}: {method}")
            train_kind(kind, out, data, options=options, name=method)
        metrics = json.loads((model_dir / METRICS_FILE).read_text())
        if "rerank" not in metrics:
            metrics, _ = evaluate_kind(model_dir, out / f"prepared-{method}", dense_dir)
        seconds, rerank = metrics["train_seconds"], metrics["rerank"]
        rows.append(f"| {name} | {method} alone | {_figures(metrics)} | {seconds:.0f} |")
        rows.append(
            f"| {name} | {method} + re-ranking (weight {rerank['weight']:.2f}, fitted on val) | {_figures(rerank)} "
            f"| {seconds + dense['train_seconds']:.0f} |"
        )
        alone.append(metrics["recall@1"])
        reranked.append(rerank["recall@1"])
    baseline = dense["recall@1"]
    verdict = (
        f"{name}: best alone {100 * max(alone):.1f} R@1 vs dense {100 * baseline:.1f} "
        f"({'met' if max(alone) >= baseline else 'missed'}); best re-ranked {100 * max(reranked):.1f} vs dense + 5 "
        f"({'met' if max(reranked) >= baseline + 0.05 else 'missed'})"
    )
    return rows, verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="runs/generalization", help="data, models and results go here")
    parser.add_argument("--collections", nargs="+", default=list(COLLECTIONS), choices=list(COLLECTIONS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--reuse", action="store_true", help="keep finished stages of an earlier run here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:  # the output policy: never the working directory, home or a folder this script did not write
        work = open_output_dir(
            args.work_dir, BENCHMARK, resume=args.reuse, command=shlex.join(sys.argv), flag="--work-dir"
        ).resolve()
    except GraceInputError as error:
        parser.error(str(error))
    results = [run_collection(name, work, args.methods, args.reuse) for name in args.collections]
    header = ["| collection | method | R@1 | R@5 | R@10 | train s |", "| --- | --- | --- | --- | --- | --- |"]
    table = "\n".join([*header, *(row for rows, _ in results for row in rows)])
    goals = "\n".join(f"- {verdict}" for _, verdict in results)
    (work / "generalization.md").write_text(f"{table}\n\n{goals}\n")
    print(f"\nTest captions ranking each collection's test images (one torch thread):\n\n{table}\n\nGoals:\n{goals}")
    finish_output_dir(work, BENCHMARK, shlex.join(sys.argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
