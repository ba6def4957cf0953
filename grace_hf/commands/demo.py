"""`grace-hf demo` (`make demo`): GRACE end to end with no GPU and no downloads, on the built-in synthetic data or on
a Karpathy-format collection of your own.

grace-hf demo --output-dir demo_output                                            # the synthetic data, ~10 min
grace-hf demo --output-dir demo_output --identifier-kind all                      # every identifier kind
grace-hf demo --output-dir my_demo --karpathy-json my.json --image-root my_images # your collection

The val and test images need no text to be learned: as in GRACE, a captioner that looks at their pixels writes
their pseudo-queries (their own captions are only the val and test queries). Stages, each a folder of the output:
1. `data/`: 500 synthetic images with human-style captions (250 train, 50 val, 200 test), or your collection.
2. `dense-clip/`: the dense open_clip baseline, trained on the train images' captions and views of the images (SLIP's
   image-image term) until its val R@1 stops improving. It is also the vision tower of every Flamingo below (the
   role CLIP ViT-L plays for OpenFlamingo).
3. `captioner/`: the tiny Flamingo trained to caption the train images (`recipes/synthetic/captioner.yaml`).
4. `pseudo-queries/`: five queries for every val and test image: the captioner proposes its beams and 20 sampled
   queries, the dense baseline keeps the five closest to the image (BLIP's CapFilt); their BLEU-4 against the val
   captions.
5. `bm25/`: the text-only baseline, BM25 over the same texts the Flamingo is taught with.
6. `prepared-<kind>/`, `model-<kind>/`: identifiers, then the Flamingo trained on i2id (image -> identifier) and
   t2id (query -> identifier) with `recipes/synthetic/<kind>.yaml`; the re-ranking weight fitted on the val
   captions; the test captions ranking the test images, alone and re-ranked by the dense baseline.
7. `metrics.json`, `queries.jsonl`, `gallery.html` (with the captioner's examples), `recall.png`, `comparison.md`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from grace_hf.commands.common import add_num_threads, add_overwrite, command_parser, setup_threads
from grace_hf.data.captioning import caption_splits
from grace_hf.data.karpathy import KarpathyCorpus, load_karpathy
from grace_hf.data.pseudo_queries import PSEUDO_QUERIES_FILE
from grace_hf.data.synthetic import SYNTHETIC_JSON, SyntheticStyle, check_synthetic_size, write_synthetic
from grace_hf.dense.directory import FEATURES_FILE
from grace_hf.dense.query_filter import PROPOSED_SAMPLES, filtered_captioning
from grace_hf.dense.training import DenseTrainingArgs, run_baseline
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.captions import write_captioner_output
from grace_hf.evaluation.comparison import TABLE_FILE, comparison_table
from grace_hf.evaluation.metrics import METRICS_FILE
from grace_hf.evaluation.model_recall import QUERIES_FILE, evaluate_model
from grace_hf.evaluation.plots import RECALL_PLOT_FILE, RERANKED_SUFFIX, write_recall_plot
from grace_hf.evaluation.queries import load_eval_queries
from grace_hf.evaluation.text_baseline import run_text_baseline
from grace_hf.identifiers import CONTENT_KINDS, IDENTIFIER_KINDS, get_identifier_kind
from grace_hf.io_utils import atomic_write_json, atomic_write_text, read_json
from grace_hf.model_dir import read_model_dir
from grace_hf.outputs import (
    DEMO,
    PARTIAL_SUFFIX,
    PSEUDO_QUERIES,
    final_path,
    output_directory,
    portable_path,
    record_written,
)
from grace_hf.retrieval.rerank import DEFAULT_RERANK_BEAMS, DenseScorer, fit_or_load
from grace_hf.retrieval.retriever import GraceRetriever
from grace_hf.runtime import usable_cores
from grace_hf.serving.gallery import GALLERY_FILE, CaptionedImage, GalleryEntry, folder_image_loader, write_gallery
from grace_hf.training.args import parse_args
from grace_hf.training.loop import train
from grace_hf.training.preparation import prepare

__all__ = [
    "DEFAULT_KIND",
    "DEMO_STYLE",
    "PREPARE_OPTIONS",
    "RECIPES",
    "check_collection",
    "evaluate_kind",
    "main",
    "run_demo",
    "run_pipeline",
    "train_kind",
]

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "synthetic"  # shipped inside the package
DEFAULT_KIND = "rq"
# 200 test images: the re-ranker's 30 beams then cover 15% of the candidates, so re-ranking cannot simply be the
# dense model's own ranking of a handful of images
DEMO_STYLE = SyntheticStyle(val_fraction=0.1, test_fraction=0.4)
# Content-based identifiers from the seeing vision tower's image embeddings (the dense baseline's features file): on
# the val captions they ranked far above identifiers from 8x8 pixel thumbnails (R@1 44.4 vs 15.2 or less).
PREPARE_OPTIONS: dict[str, dict[str, Any]] = {"structured": {"k": 10, "leaf_size": 10}}
NUM_GALLERY_QUERIES = 8
NUM_CAPTIONED_EXAMPLES = 6


def _log(message: str) -> None:
    print(f"\n==> [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _recipe(name: str) -> Path:
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise GraceInputError(f"{path}: no synthetic recipe for {name!r}")
    return path


def _train(recipe: Path, argv: list[str], max_steps: int | None, num_threads: int | None = None) -> None:
    """Train with `recipe` and the flags `argv` (the demo's own: no evaluation during training, no checkpoints), on
    `num_threads` torch threads (None: the recipe's `torch_num_threads`); the demo's own are restored afterwards."""
    argv = ["--config", str(recipe), *argv, "--eval-num-queries", "0", "--report-to", "none", "--save-steps", "0"]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    if num_threads is not None:
        argv += ["--torch-num-threads", str(num_threads)]
    threads = torch.get_num_threads()
    try:
        # the record names the paths as they will be once the demo's build folder is renamed
        command = " ".join(str(final_path(arg)) if PARTIAL_SUFFIX in arg else arg for arg in argv)
        train(*parse_args(argv), command=f"grace-hf train {command}")
    finally:
        torch.set_num_threads(threads)


def write_pseudo_queries_with_captioner(
    out: Path, corpus: KarpathyCorpus, vision_tower: Path, max_steps: int | None = None, num_threads: int | None = None
) -> tuple[Path, dict[str, list[str]]]:
    """Train the captioner on the train images' captions (`out/captioner`) and write the val and test images'
    pseudo-queries with it, kept by the dense model `vision_tower` (`dense.query_filter.filtered_captioning`) into
    `out/pseudo-queries`, with their BLEU in `quality.json`; return that file and the queries by image key.
    `num_threads`: the captioner's training threads (None: its recipe's)."""
    captioner_dir = out / "captioner"
    _log(f"train the captioner on the train images' captions -> {captioner_dir}")
    karpathy_json, image_root = corpus.json_path, corpus.image_root
    argv = ["--karpathy-json", str(karpathy_json), "--image-root", str(image_root), "--output-dir", str(captioner_dir)]
    _train(_recipe("captioner"), [*argv, "--vision-tower", str(vision_tower)], max_steps, num_threads)

    pseudo_dir = out / "pseudo-queries"
    _log(
        f"write pseudo-queries for every val and test image from its pixels ({PROPOSED_SAMPLES} sampled beside the "
        f"beams; the five the dense baseline finds closest kept) -> {pseudo_dir}"
    )
    captioner = read_model_dir(captioner_dir, retriever=False)
    queries = caption_splits(
        captioner.model, captioner.processor, corpus, ["val", "test"], **filtered_captioning(vision_tower)
    )
    with output_directory(pseudo_dir, PSEUDO_QUERIES, [karpathy_json, image_root], command="grace-hf demo") as tmp:
        quality = write_captioner_output(tmp, corpus, queries)
    if quality is not None:
        _log(f"pseudo-queries: BLEU-4 {quality['bleu4']:.1f} against the {quality['num_images']} val images' captions")
    return pseudo_dir / PSEUDO_QUERIES_FILE, queries


def train_kind(
    kind: str,
    out: Path,
    karpathy_json: Path,
    image_root: Path,
    pseudo_queries: Path | None,
    vision_tower: Path,
    max_steps: int | None = None,
    options: dict[str, Any] | None = None,
    name: str | None = None,
    overrides: tuple[str, ...] = (),
    num_threads: int | None = None,
) -> Path:
    """Prepare the collection for one identifier kind (`options`: its prepare options, default `PREPARE_OPTIONS`, and
    for rq and structured the image embeddings of `vision_tower`'s features file)
    into `out/prepared-<name>` and train the tiny Flamingo on it, its vision tower started from `vision_tower`, into
    `out/model-<name>` (`name` default: the kind; `overrides`: recipe flags, e.g. `("--loss-weight-i2id", "1")`;
    `num_threads`: training threads, None: the recipe's); return the model directory."""
    name = name or kind
    prepared = out / f"prepared-{name}"
    if options is None:
        options = dict(PREPARE_OPTIONS.get(kind, {}))
        if kind in CONTENT_KINDS:
            options["image_features"] = str(vision_tower / FEATURES_FILE)
    _log(f"prepare {kind} identifiers -> {prepared}")
    prepare(karpathy_json, image_root, kind, prepared, pseudo_queries=pseudo_queries, **options)

    model_dir = out / f"model-{name}"
    _log(f"train the tiny Flamingo on {kind} identifiers (recipe {_recipe(kind)}) -> {model_dir}")
    argv = ["--data", str(prepared), "--output-dir", str(model_dir), "--vision-tower", str(vision_tower)]
    _train(_recipe(kind), [*argv, *overrides], max_steps, num_threads)
    return model_dir


def evaluate_kind(model_dir: Path, prepared: Path, dense_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fit the re-ranking weight on the val captions (saved as the model's `rerank.json`), then Recall@K of the test
    captions alone and re-ranked (`metrics["rerank"]`), saved into the model's `metrics.json`; the per-query
    records."""
    scorer = DenseScorer.from_directory(dense_dir)
    queries, gold, candidates = load_eval_queries(prepared)
    retriever = GraceRetriever.from_pretrained(model_dir, candidates=candidates)
    _log(f"fit the re-ranking weight on the val captions ({DEFAULT_RERANK_BEAMS} beams)")
    reranker, _ = fit_or_load(model_dir, scorer, retriever, prepared, refit=True, distributed=False)
    _log(f"evaluate: Recall@K over every test caption, alone and re-ranked (weight {reranker.weight:.2f})")
    metrics, records, curve = evaluate_model(
        retriever.for_candidates(candidates, reranker), queries, gold, distributed=False
    )
    train_metrics = read_json(model_dir / METRICS_FILE, "metrics")
    metrics.update(identifier_kind=train_metrics.get("identifier_kind"), train_seconds=train_metrics["train_seconds"])
    metrics["recall_curve"] = curve
    metrics["rerank"]["dense"] = portable_path(dense_dir, model_dir)  # the build directory is renamed at the end
    atomic_write_json(model_dir / METRICS_FILE, train_metrics | metrics)
    record_written(model_dir, METRICS_FILE)
    return metrics, records


def _gallery(
    out: Path,
    model_dir: Path,
    dense_dir: Path,
    corpus: KarpathyCorpus,
    records: list[dict[str, Any]],
    pseudo_queries: dict[str, list[str]],
) -> Path:
    """Retrieve a few test captions again through the public API, re-ranked, and show them with their images; then
    a few val images beside the pseudo-queries the captioner wrote for them."""
    first_per_image = list({record["gold"]: record for record in reversed(records)}.values())[::-1]
    picked = first_per_image[:: max(1, len(first_per_image) // NUM_GALLERY_QUERIES)][:NUM_GALLERY_QUERIES]
    retriever = GraceRetriever.from_pretrained(model_dir, reranker=dense_dir)
    results = retriever.retrieve([r["query"] for r in picked], top_k=5)
    entries = [GalleryEntry(r["query"], hits, r["gold"]) for r, hits in zip(picked, results)]
    captioned = [
        CaptionedImage(image.key, pseudo_queries.get(image.key, []), image.captions[0] if image.captions else None)
        for image in corpus.split("val")[:NUM_CAPTIONED_EXAMPLES]
    ]
    return write_gallery(
        out / GALLERY_FILE,
        entries,
        load_image=folder_image_loader(corpus.image_root),
        title="grace_hf demo",
        captioned=captioned,
    )


def check_collection(corpus: KarpathyCorpus) -> None:
    """What the stages need of a collection, checked before the first of them trains: train images with captions
    (at least 2, to contrast), and val and test images with captions (the queries that fit the re-ranking weight and
    measure Recall@K; they never teach)."""
    trained = sum(bool(image.captions) for image in corpus.split("train"))
    if trained < 2:
        raise GraceInputError(
            f"{corpus.json_path}: {trained} train images with captions; the dense baseline and the captioner learn "
            "from them and need at least 2"
        )
    for split, use in (("val", "fit the re-ranking weight"), ("test", "measure Recall@K")):
        if not corpus.caption_queries(split):
            raise GraceInputError(
                f"{corpus.json_path}: no {split} images with captions: the demo needs their captions to {use} "
                "(as queries only: they never teach the models)"
            )


def run_pipeline(
    out: Path,
    karpathy_json: Path,
    image_root: Path,
    kinds: list[str],
    seed: int = 0,
    max_steps: int | None = None,
    title: str = "",
    num_threads: int | None = None,
) -> tuple[dict[str, Any], list[Path], str]:
    """Every stage after the data (see the module docstring), written into `out` (a build directory); return the
    first kind's metrics, the model directories and the comparison table. `num_threads`: every training's torch
    threads (None: each recipe's `torch_num_threads`)."""
    corpus = load_karpathy(karpathy_json, image_root)
    check_collection(corpus)
    dense_dir = out / "dense-clip"
    _log(f"train the dense open_clip baseline on the train images (early stopping on val) -> {dense_dir}")
    dense = run_baseline(karpathy_json, image_root, dense_dir, args=DenseTrainingArgs(seed=seed))
    pseudo_queries, queries = write_pseudo_queries_with_captioner(out, corpus, dense_dir, max_steps, num_threads)

    bm25_dir = out / "bm25"
    _log(f"the text-only baseline: BM25 over the same texts -> {bm25_dir}")
    bm25 = run_text_baseline(karpathy_json, image_root, bm25_dir, pseudo_queries)

    curves: dict[str, list[float]] = {"dense-clip": dense["recall_curve"], "bm25": bm25["recall_curve"]}
    runs, first = [], None
    for kind in kinds:
        model_dir = train_kind(
            kind, out, karpathy_json, image_root, pseudo_queries, dense_dir, max_steps, num_threads=num_threads
        )
        metrics, records = evaluate_kind(model_dir, out / f"prepared-{kind}", dense_dir)
        curves[kind], curves[f"{kind}{RERANKED_SUFFIX}"] = metrics["recall_curve"], metrics["rerank"]["recall_curve"]
        runs.append(model_dir)
        if first is None:
            first = metrics
            atomic_write_json(out / METRICS_FILE, metrics)
            lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            atomic_write_text(out / QUERIES_FILE, lines)
            _log(f"retrieve example queries -> {GALLERY_FILE}")
            _gallery(out, model_dir, dense_dir, corpus, records, queries)

    write_recall_plot(out / RECALL_PLOT_FILE, curves, title=title)
    table = comparison_table([*runs, dense_dir, bm25_dir])
    atomic_write_text(out / TABLE_FILE, table)
    return first, runs, table


def run_demo(
    output_dir: str | os.PathLike,
    kinds: list[str],
    num_images: int = 500,
    seed: int = 0,
    max_steps: int | None = None,
    overwrite: bool = False,
    karpathy_json: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """The pipeline into `output_dir` (replacing an earlier demo there) on `num_images` synthetic images, or on the
    collection `karpathy_json` + `image_root`; return the first kind's metrics. `num_threads`: every training's
    torch threads (None: each recipe's)."""
    if (karpathy_json is None) != (image_root is None):
        raise GraceInputError("--karpathy-json and --image-root go together")
    if karpathy_json is None:
        check_synthetic_size(num_images)
    for kind in kinds:
        _recipe(kind)
    final = Path(output_dir)
    with output_directory(output_dir, DEMO, [karpathy_json, image_root], overwrite, "grace-hf demo") as out:
        if karpathy_json is None:
            data = out / "data"
            _log(f"write {num_images} synthetic images with their captions -> {data}")
            write_synthetic(data, num_images, seed, style=DEMO_STYLE)
            json_path, root, title = data / SYNTHETIC_JSON, data, f"synthetic, {num_images} images"
        else:
            json_path, root, title = (
                Path(karpathy_json).resolve(),
                Path(image_root).resolve(),
                Path(karpathy_json).name,
            )
        first, runs, table = run_pipeline(out, json_path, root, kinds, seed, max_steps, title, num_threads)
    _log(f"done\n\n{table}")
    for name in (METRICS_FILE, GALLERY_FILE, RECALL_PLOT_FILE, TABLE_FILE, QUERIES_FILE):
        print(f"  {final / name}")
    image_root = final / "data" if karpathy_json is None else Path(image_root).resolve()
    serve = (
        f"grace-hf serve --model {final / runs[0].name} --rerank {final / 'dense-clip'} --image-root {image_root} "
        f"--queries {final / QUERIES_FILE}"
    )
    print(f"\nSearch the model in the browser (the `app` extra: pip install -e '.[app]'):\n  {serve}")
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
    parser.add_argument("--num-images", type=int, default=500, help="synthetic images (40%% test)")
    parser.add_argument("--karpathy-json", help="your collection instead of the synthetic one (with --image-root)")
    parser.add_argument("--image-root", help="the folder the JSON's image paths are relative to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipes' training steps")
    add_num_threads(
        parser,
        default="every core this process may use, at most 8, and each training its recipe's torch_num_threads; "
        "given, every stage's",
    )
    add_overwrite(parser)
    args = parser.parse_args(argv)
    setup_threads(args, default=min(8, usable_cores()))
    kinds = args.identifier_kind
    if kinds == ["all"]:  # the best kind first: it fills the gallery
        kinds = [DEFAULT_KIND, *(kind for kind in IDENTIFIER_KINDS if kind != DEFAULT_KIND)]
    for kind in kinds:
        get_identifier_kind(kind)
    run_demo(
        args.output_dir,
        kinds,
        args.num_images,
        args.seed,
        args.max_steps,
        args.overwrite,
        args.karpathy_json,
        args.image_root,
        args.num_threads,  # given: every stage's threads; without it the trainings keep their recipes'
    )
    return 0
