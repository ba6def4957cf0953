"""`grace-hf demo` (`make demo`): GRACE end to end on the built-in synthetic data, no GPU and no downloads.

grace-hf demo --output-dir demo_output                          # the best kind, ~5 min on 2 cores
grace-hf demo --output-dir demo_output --identifier-kind all    # every identifier kind beside the dense baseline

Stages: synthetic data -> dense open_clip baseline -> prepare (rq and structured identifiers over 8x8 pixel
thumbnails) -> train the tiny Flamingo with `recipes/synthetic/<kind>.yaml` -> fit the re-ranking weight on the val
captions -> evaluate on the test captions, alone and re-ranked by the dense baseline -> retrieve example queries ->
`metrics.json`, `gallery.html`, `recall.png` and `comparison.md` in the output folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from grace_hf.commands.common import add_num_threads, add_overwrite, command_parser, setup_threads
from grace_hf.data.synthetic import PSEUDO_QUERIES_JSON, SYNTHETIC_JSON, check_synthetic_size, write_synthetic
from grace_hf.dense.training import DenseTrainingArgs, run_baseline
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.compare import comparison_table
from grace_hf.evaluation.evaluate import evaluate_model, fit_rerank_on_val, load_eval_queries
from grace_hf.evaluation.plots import RERANKED_SUFFIX, write_recall_plot
from grace_hf.identifiers import IDENTIFIER_KINDS, get_identifier_kind
from grace_hf.io_utils import atomic_write_json, atomic_write_text, read_json
from grace_hf.model_dir import METRICS_FILE, write_rerank_config
from grace_hf.outputs import DEMO, finish_output_dir, open_output_dir
from grace_hf.retrieval.rerank import DEFAULT_RERANK_BEAMS, DenseScorer, Reranker
from grace_hf.retrieval.retriever import GraceRetriever
from grace_hf.serving.gallery import GalleryEntry, folder_image_loader, write_gallery
from grace_hf.training.args import parse_args
from grace_hf.training.loop import train
from grace_hf.training.preparation import prepare

__all__ = ["DEFAULT_KIND", "PREPARE_OPTIONS", "RECIPES", "evaluate_kind", "run_demo", "train_kind"]

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "synthetic"  # shipped inside the package
DEFAULT_KIND = "rq"
# Content-based identifiers from 8x8 thumbnails, not from the dense baseline's embeddings: identifiers built from the
# dense model's view make the generative model agree with it, and re-ranking by it then adds nothing.
PREPARE_OPTIONS: dict[str, dict[str, Any]] = {
    "rq": {"pixel_features": True, "pixel_side": 8},
    "structured": {"pixel_features": True, "pixel_side": 8, "k": 10, "leaf_size": 10},
}
NUM_GALLERY_QUERIES = 8


def _log(message: str) -> None:
    print(f"\n==> [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _recipe(kind: str) -> Path:
    path = RECIPES / f"{kind}.yaml"
    if not path.is_file():
        raise GraceInputError(f"{path}: no synthetic recipe for identifier kind {kind!r}")
    return path


def train_kind(
    kind: str,
    out: Path,
    data: Path,
    max_steps: int | None = None,
    options: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Prepare `data` for one identifier kind (`options`: its prepare options, default `PREPARE_OPTIONS`) into
    `out/prepared-<name>` and train the tiny Flamingo on it into `out/model-<name>` (`name` default: the kind);
    return the model directory."""
    name = name or kind
    prepared = out / f"prepared-{name}"
    options = PREPARE_OPTIONS.get(kind, {}) if options is None else options
    _log(f"prepare {kind} identifiers -> {prepared}")
    prepare(data / SYNTHETIC_JSON, data, kind, prepared, pseudo_queries=data / PSEUDO_QUERIES_JSON, **options)

    model_dir = out / f"model-{name}"
    _log(f"train the tiny Flamingo on {kind} identifiers (recipe {_recipe(kind)}) -> {model_dir}")
    argv = ["--config", str(_recipe(kind)), "--data", str(prepared), "--output-dir", str(model_dir)]
    argv += ["--eval-num-queries", "0", "--report-to", "none", "--save-steps", "0"]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    train(*parse_args(argv), command="grace-hf train " + " ".join(argv))
    return model_dir


def evaluate_kind(model_dir: Path, prepared: Path, dense_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fit the re-ranking weight on the val captions (saved as the model's `rerank.json`), then Recall@K of the test
    captions alone and re-ranked (`metrics["rerank"]`), saved into the model's `metrics.json`; the per-query
    records."""
    scorer = DenseScorer.from_directory(dense_dir)
    queries, gold, candidates = load_eval_queries(prepared)
    retriever = GraceRetriever.from_pretrained(model_dir, candidates=candidates)
    _log(f"fit the re-ranking weight on the val captions ({DEFAULT_RERANK_BEAMS} beams)")
    config = fit_rerank_on_val(retriever, prepared, scorer, distributed=False)
    write_rerank_config(model_dir, config)
    _log(f"evaluate: Recall@K over every test caption, alone and re-ranked (weight {config.weight:.2f})")
    reranker = Reranker(scorer, config.weight, config.num_beams)
    metrics, records, curve = evaluate_model(
        retriever.for_candidates(candidates, reranker), queries, gold, distributed=False
    )
    train_metrics = read_json(model_dir / METRICS_FILE, "metrics")
    metrics.update(identifier_kind=train_metrics.get("identifier_kind"), train_seconds=train_metrics["train_seconds"])
    metrics["recall_curve"] = curve
    atomic_write_json(model_dir / METRICS_FILE, train_metrics | metrics)
    return metrics, records


def _gallery(out: Path, model_dir: Path, dense_dir: Path, data: Path, records: list[dict[str, Any]]) -> Path:
    """Retrieve a few test captions again through the public API, re-ranked, and show them with their images."""
    first_per_image = list({record["gold"]: record for record in reversed(records)}.values())[::-1]
    picked = first_per_image[:: max(1, len(first_per_image) // NUM_GALLERY_QUERIES)][:NUM_GALLERY_QUERIES]
    retriever = GraceRetriever.from_pretrained(model_dir, reranker=dense_dir)
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
        model_dir = train_kind(kind, out, data, max_steps)
        metrics, records = evaluate_kind(model_dir, out / f"prepared-{kind}", dense_dir)
        curves[kind], curves[f"{kind}{RERANKED_SUFFIX}"] = metrics["recall_curve"], metrics["rerank"]["recall_curve"]
        runs.append(model_dir)
        if first is None:
            first = metrics
            atomic_write_json(out / "metrics.json", metrics)
            lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            atomic_write_text(out / "queries.jsonl", lines)
            _log("retrieve example queries -> gallery.html")
            _gallery(out, model_dir, dense_dir, data, records)

    write_recall_plot(out / "recall.png", curves, title=f"synthetic, {num_images} images")
    table = comparison_table([*runs, dense_dir])
    atomic_write_text(out / "comparison.md", table)
    _log(f"done\n\n{table}")
    for name in ("metrics.json", "gallery.html", "recall.png", "comparison.md", "queries.jsonl"):
        print(f"  {out / name}")
    serve = (
        f"grace-hf serve --model {runs[0]} --rerank {dense_dir} --image-root {data} --queries {out / 'queries.jsonl'}"
    )
    print(f"\nSearch the model in the browser (the `app` extra: pip install -e '.[app]'):\n  {serve}")
    finish_output_dir(out, DEMO)
    return first


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("demo", __doc__.split("\n\n")[0], renamed={"--kinds": "--identifier-kind"})
    parser.add_argument("--output-dir", default="demo_output", help="where everything is written")
    parser.add_argument(
        "--identifier-kind",
        nargs="+",
        default=[DEFAULT_KIND],
        help=f"identifier kinds to train, or 'all' ({', '.join(IDENTIFIER_KINDS)}); the first fills the gallery",
    )
    parser.add_argument("--num-images", type=int, default=500, help="synthetic images (10%% test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipes' training steps")
    add_num_threads(parser)
    add_overwrite(parser)
    args = parser.parse_args(argv)
    setup_threads(args)
    kinds = args.identifier_kind
    if kinds == ["all"]:  # the best kind first: it fills the gallery
        kinds = [DEFAULT_KIND, *(kind for kind in IDENTIFIER_KINDS if kind != DEFAULT_KIND)]
    for kind in kinds:
        get_identifier_kind(kind)
    run_demo(args.output_dir, kinds, args.num_images, args.seed, args.max_steps, args.overwrite)
    return 0
