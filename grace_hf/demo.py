"""The demo: GRACE end to end on the built-in synthetic data, no GPU and no downloads (`grace-hf demo`).

Stages: synthetic data -> dense open_clip baseline (its image embeddings also feed the structured and rq
identifiers) -> prepare -> train the tiny Flamingo with `recipes/synthetic/<kind>.yaml` -> evaluate ->
retrieve example queries -> `metrics.json`, `gallery.html`, `recall.png` and `comparison.md` in the output folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from grace_hf.compare import comparison_table
from grace_hf.data.synthetic import PSEUDO_QUERIES_JSON, SYNTHETIC_JSON, check_synthetic_size, write_synthetic
from grace_hf.dense.train import DenseTrainingArgs, run_baseline
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import get_identifier_kind
from grace_hf.identifiers.embeddings import EmbeddingOptions
from grace_hf.image_features import FEATURES_FILE
from grace_hf.io_utils import atomic_write_json, atomic_write_text, read_json
from grace_hf.outputs import DEMO, finish_output_dir, open_output_dir
from grace_hf.prepare import prepare
from grace_hf.retrieval.evaluate import evaluate_model, load_eval_queries
from grace_hf.retrieval.gallery import GalleryEntry, folder_image_loader, write_gallery
from grace_hf.retrieval.model_dir import METRICS_FILE
from grace_hf.retrieval.plots import write_recall_plot
from grace_hf.retrieval.retriever import GraceRetriever
from grace_hf.training.args import parse_args
from grace_hf.training.train import train

__all__ = ["DEFAULT_KIND", "RECIPES", "run_demo"]

RECIPES = Path(__file__).resolve().parent / "recipes" / "synthetic"  # shipped inside the package
DEFAULT_KIND = "structured"
NUM_GALLERY_QUERIES = 8


def _log(message: str) -> None:
    print(f"\n==> [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _recipe(kind: str) -> Path:
    path = RECIPES / f"{kind}.yaml"
    if not path.is_file():
        raise GraceInputError(f"{path}: no synthetic recipe for identifier kind {kind!r}")
    return path


def _train_kind(kind: str, out: Path, data: Path, dense_dir: Path, max_steps: int | None) -> Path:
    """Prepare the data for one identifier kind and train the tiny Flamingo on it; return the model directory."""
    prepared = out / f"prepared-{kind}"
    options: dict[str, Any] = {}
    if issubclass(get_identifier_kind(kind).options, EmbeddingOptions):  # structured, rq: cluster embeddings
        options["image_features"] = str(dense_dir / FEATURES_FILE)
    _log(f"prepare {kind} identifiers -> {prepared}")
    prepare(data / SYNTHETIC_JSON, data, kind, prepared, pseudo_queries=data / PSEUDO_QUERIES_JSON, **options)

    model_dir = out / f"model-{kind}"
    _log(f"train the tiny Flamingo on {kind} identifiers (recipe {_recipe(kind)}) -> {model_dir}")
    argv = ["--config", str(_recipe(kind)), "--data", str(prepared), "--output-dir", str(model_dir)]
    argv += ["--eval-num-queries", "0", "--report-to", "none", "--save-steps", "0"]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    train(*parse_args(argv), command="grace-hf train " + " ".join(argv))
    return model_dir


def _evaluate(model_dir: Path, prepared: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[float]]:
    queries, gold, candidates = load_eval_queries(prepared)
    retriever = GraceRetriever.from_pretrained(model_dir, candidates=candidates)
    metrics, records, curve = evaluate_model(retriever, queries, gold, distributed=False)
    train_metrics = read_json(model_dir / METRICS_FILE, "metrics")
    metrics.update(identifier_kind=train_metrics.get("identifier_kind"), train_seconds=train_metrics["train_seconds"])
    metrics["recall_curve"] = curve
    atomic_write_json(model_dir / METRICS_FILE, train_metrics | metrics)
    return metrics, records, curve


def _gallery(out: Path, model_dir: Path, data: Path, records: list[dict[str, Any]]) -> Path:
    """Retrieve a few test captions again through the public API and show them with their images."""
    first_per_image = list({record["gold"]: record for record in reversed(records)}.values())[::-1]
    picked = first_per_image[:: max(1, len(first_per_image) // NUM_GALLERY_QUERIES)][:NUM_GALLERY_QUERIES]
    retriever = GraceRetriever.from_pretrained(model_dir)
    results = retriever.retrieve([r["query"] for r in picked], top_k=5)
    entries = [GalleryEntry(r["query"], hits, r["gold"]) for r, hits in zip(picked, results)]
    return write_gallery(out / "gallery.html", entries, load_image=folder_image_loader(data), title="grace_hf demo")


def run_demo(
    output_dir: str | os.PathLike,
    kinds: list[str],
    num_images: int = 500,
    seed: int = 0,
    max_steps: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run every stage into `output_dir` (replacing an earlier demo there); return the first kind's metrics."""
    check_synthetic_size(num_images)
    for kind in kinds:
        _recipe(kind)
    out = open_output_dir(output_dir, DEMO, overwrite=overwrite, command="grace-hf demo")
    data = out / "data"
    _log(f"write {num_images} synthetic images with captions and pseudo-queries -> {data}")
    write_synthetic(data, num_images, seed)

    dense_dir = out / "dense-clip"
    _log(f"train the dense open_clip baseline -> {dense_dir}")
    dense = run_baseline(
        data / SYNTHETIC_JSON, data, dense_dir, data / PSEUDO_QUERIES_JSON, args=DenseTrainingArgs(seed=seed)
    )

    curves: dict[str, list[float]] = {"dense-clip": dense["recall_curve"]}
    runs, first = [], None
    for kind in kinds:
        model_dir = _train_kind(kind, out, data, dense_dir, max_steps)
        _log(f"evaluate {kind}: Recall@K over every test caption")
        metrics, records, curves[kind] = _evaluate(model_dir, out / f"prepared-{kind}")
        runs.append(model_dir)
        if first is None:
            first = metrics
            atomic_write_json(out / "metrics.json", metrics)
            lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            atomic_write_text(out / "queries.jsonl", lines)
            _log("retrieve example queries -> gallery.html")
            _gallery(out, model_dir, data, records)

    write_recall_plot(out / "recall.png", curves, title=f"synthetic, {num_images} images")
    table = comparison_table([*runs, dense_dir])
    atomic_write_text(out / "comparison.md", table)
    _log(f"done\n\n{table}")
    for name in ("metrics.json", "gallery.html", "recall.png", "comparison.md", "queries.jsonl"):
        print(f"  {out / name}")
    serve = f"grace-hf serve --model {runs[0]} --image-root {data} --queries {out / 'queries.jsonl'}"
    print(f"\nSearch the model in the browser (the `app` extra: pip install -e '.[app]'):\n  {serve}")
    finish_output_dir(out, DEMO)
    return first
