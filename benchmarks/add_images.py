"""Adding images to a trained retriever vs retraining it from scratch, per identifier kind, on synthetic data.

    python benchmarks/add_images.py --work-dir runs/bench-add-images

One synthetic set of `--num-images` (`--collection`: the demo's style, or `check`, the second collection nothing was
chosen on) is cut in two collections: A (the first images) and B (the last `--num-added`); each has train, val and
test images. Per kind: prepare A and train on it with `recipes/synthetic/<kind>.yaml` (model A); add B to model A
with `recipes/synthetic/add_images.yaml` (the add path); prepare A+B and train on it with the same recipe as A (the
retraining path).

The val/test images' texts (`--texts`):
- `captioner` (default), as `grace-hf demo` makes them: the dense baseline trained on A's train images is the vision
  tower and embeds every image (the rq/structured identifiers); a captioner trained on A's train captions writes the
  pseudo-queries of A's val/test images, and of B's from their pixels, kept by the tower's dense model
  (`add-images --captioner --captioner-filter`; the retraining path captions B's the same way, within its time).
  Both are trained once, before either path, like a pretrained CLIP.
- `oracle`: the generator's oracle pseudo-queries and 8x8 pixel thumbnails (an upper bound on the texts; no tower).

The figures: Recall@10 of the human captions of A's and of B's test images
(`--split val`: val images, for tuning), over A's images before adding and over A's and B's images after: the new
images' recall beside retraining's, forgetting (A's recall before minus after adding, over A's images both times)
and the wall time of each path (one torch thread, in this process), with their ratios, in one table.
`--reuse` keeps the outputs (and timings) of an earlier run in the same work directory; `--add-args` and `--tag`
try other add-images settings beside them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python benchmarks/<name>.py`
from benchmarks.common import finish_work_dir, open_work_dir
from benchmarks.synthetic_split import CHECK_SEED, CHECK_STYLE, write_part
from grace_hf.commands.demo import (
    DEMO_STYLE,
    PREPARE_OPTIONS,
    RECIPES,
    write_pseudo_queries_with_captioner,
)
from grace_hf.data.captioning import caption_splits
from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries, write_pseudo_queries
from grace_hf.data.synthetic import ORACLE_PSEUDO_QUERIES_JSON, SYNTHETIC_JSON, write_synthetic
from grace_hf.dense.directory import save_image_features
from grace_hf.dense.model import load_dual_encoder
from grace_hf.dense.query_filter import filtered_captioning
from grace_hf.dense.training import DenseTrainingArgs, run_baseline
from grace_hf.evaluation.model_recall import evaluate_model
from grace_hf.identifiers import CONTENT_KINDS, IDENTIFIER_KINDS
from grace_hf.model_dir import read_model_dir
from grace_hf.outputs import is_complete_output
from grace_hf.retrieval.retriever import GraceRetriever
from grace_hf.training.adding import add_images
from grace_hf.training.args import ADD_IMAGES_ARGUMENT_CLASSES, parse_args
from grace_hf.training.loop import train
from grace_hf.training.preparation import prepare

COMMON = ["--eval-num-queries", "0", "--report-to", "none", "--save-steps", "0", "--torch-num-threads", "1"]
GOALS = {"new_ratio": 0.9, "forgetting": 0.02, "time_ratio": 0.25}

# with `--texts oracle`, content-based identifiers come from 8x8 pixel thumbnails: no trained encoder needed
PIXEL_FEATURES = {"pixel_features": True, "pixel_side": 8}
COLLECTIONS = {"demo": (0, DEMO_STYLE), "check": (CHECK_SEED, CHECK_STYLE)}  # data seed, style
# the train and add-images flags that name a file or folder: the benchmark sets every path its runs read and write
# (inside --work-dir), so `--train-args` and `--add-args` may not
PATH_FLAGS = (
    "--config",
    "--output-dir",
    "--model",
    "--data",
    "--karpathy-json",
    "--image-root",
    "--pseudo-queries",
    "--captioner",
    "--image-features",
    "--vision-tower",
    "--vision-tower-weights",
    "--resume-from-checkpoint",
)


@dataclass
class Texts:
    """Where the val/test images' texts and the content identifiers' embeddings come from: the generator's oracle
    (`captioner` None) or, as in the demo, a captioner and a vision tower trained on A's train images."""

    captioner: Path | None = None
    tower: Path | None = None  # the dense baseline: the Flamingo's vision tower
    features: Path | None = None  # its embeddings of every image of A and B
    pseudo_queries: dict[str, Path] = field(default_factory=dict)  # collection folder name -> its val/test texts

    def of(self, collection: Path) -> Path:
        """The pseudo-query file of a collection (A or A+B)."""
        if self.captioner is None:
            return collection / ORACLE_PSEUDO_QUERIES_JSON
        return self.pseudo_queries[collection.name]

    def prepare_options(self, kind: str) -> dict[str, Any]:
        options = dict(PREPARE_OPTIONS.get(kind, {}))
        if kind in CONTENT_KINDS:
            options |= PIXEL_FEATURES if self.captioner is None else {"image_features": str(self.features)}
        return options


def _log(message: str) -> None:
    print(f"==> [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _timed(timings: dict, name: str, work: Callable[[], Any], done: bool) -> None:
    """Run `work` unless `done` (kept from an earlier run), and record its wall and CPU seconds as `name`."""
    if done and name in timings:
        _log(f"{name}: kept ({timings[name]['wall']:.0f} s)")
        return
    _log(name)
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    timings[name] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def _queries(collection: Path, split: str) -> tuple[list[str], list[str], list[str]]:
    """(queries, gold image keys, the split's image keys) of a collection: the human captions of its `split`."""
    images = load_karpathy(collection / SYNTHETIC_JSON, collection.parent / "raw", check_images=False).split(split)
    return (
        [c for image in images for c in image.captions],
        [i.key for i in images for _ in i.captions],
        [image.key for image in images],
    )


def _recall(model_dir: Path, queries: list[str], gold: list[str], candidates: list[str]) -> float:
    retriever = GraceRetriever.from_pretrained(model_dir, candidates=candidates, num_beams=10, batch_size=32)
    metrics, _, _ = evaluate_model(retriever, queries, gold, batch_size=32, distributed=False)
    return metrics["recall@10"]


def _prepare(collection: Path, kind: str, output: Path, texts: Texts) -> None:
    prepare(
        collection / SYNTHETIC_JSON,
        collection.parent / "raw",
        kind,
        output,
        pseudo_queries=texts.of(collection),
        overwrite=True,
        **texts.prepare_options(kind),
    )


def _train(kind: str, data: Path, output: Path, extra: list[str], texts: Texts) -> None:
    argv = ["--config", str(RECIPES / f"{kind}.yaml"), "--data", str(data), "--output-dir", str(output), *COMMON]
    if texts.tower is not None:
        argv += ["--vision-tower", str(texts.tower)]
    argv += extra
    train(*parse_args([*argv, "--overwrite"]), command=shlex.join(["grace-hf", "train", *argv]))


def _add(model: Path, collection: Path, output: Path, extra: list[str], texts: Texts) -> None:
    argv = ["--config", str(RECIPES / "add_images.yaml"), "--model", str(model), "--output-dir", str(output)]
    argv += ["--karpathy-json", str(collection / SYNTHETIC_JSON), "--image-root", str(collection.parent / "raw")]
    if texts.captioner is None:
        argv += ["--pseudo-queries", str(texts.of(collection))]
    else:  # the new images come with no text: the captioner writes it from their pixels
        argv += ["--captioner", str(texts.captioner), "--captioner-filter", str(texts.tower)]
    argv += [*COMMON, *extra]
    parsed = parse_args([*argv, "--overwrite"], ADD_IMAGES_ARGUMENT_CLASSES, "grace-hf add-images")
    add_images(*parsed, command=shlex.join(["grace-hf", "add-images", *argv]))


def _caption_new_images(texts: Texts, a: Path, b: Path, ab: Path) -> None:
    """The retraining path's texts: A's pseudo-queries and those the captioner writes for B's val/test images."""
    captioner = read_model_dir(texts.captioner, retriever=False)
    old = load_pseudo_queries(texts.pseudo_queries[a.name], load_karpathy(a / SYNTHETIC_JSON, a.parent / "raw"))
    new = load_karpathy(b / SYNTHETIC_JSON, b.parent / "raw")
    written = caption_splits(
        captioner.model, captioner.processor, new, ["val", "test"], **filtered_captioning(texts.tower)
    )
    merged = old | written  # by image key
    texts.pseudo_queries[ab.name] = ab / "captioner_pseudo_queries.json"
    write_pseudo_queries(texts.pseudo_queries[ab.name], merged)


def captioner_texts(work: Path, a: Path, ab: Path, seed: int) -> Texts:
    """Train the dense baseline (the vision tower) and the captioner on A's train images, embed every image of A and
    B with the tower and write A's val/test pseudo-queries (`work/pseudo-queries`), as the demo does."""
    tower, raw = work / "dense-a", a.parent / "raw"
    if not is_complete_output(tower):
        _log(f"the vision tower: the dense baseline on A's train images -> {tower}")
        run_baseline(a / SYNTHETIC_JSON, raw, tower, args=DenseTrainingArgs(seed=seed), overwrite=True)
    features = work / "tower_features.safetensors"
    if not features.is_file():
        images = load_karpathy(ab / SYNTHETIC_JSON, raw).images
        embeddings = load_dual_encoder(tower).encode_images([image.path for image in images])
        save_image_features(features, embeddings, [image.key for image in images])
    pseudo_queries = work / "pseudo-queries" / "pseudo_queries.json"
    if not (is_complete_output(work / "captioner") and pseudo_queries.is_file()):
        corpus = load_karpathy(a / SYNTHETIC_JSON, raw)
        pseudo_queries, _ = write_pseudo_queries_with_captioner(work, corpus, tower)
    return Texts(work / "captioner", tower, features, {a.name: pseudo_queries})


def run_kind(
    kind: str,
    work: Path,
    split: str,
    reuse: bool,
    tag: str,
    train_args: list[str],
    add_args: list[str],
    texts: Texts,
) -> dict[str, Any]:
    """Both paths for one kind; the measured figures."""
    root = work / kind
    root.mkdir(parents=True, exist_ok=True)
    timings_file = root / "timings.json"
    timings = json.loads(timings_file.read_text()) if reuse and timings_file.is_file() else {}

    def stage(name: str, output: Path, job: Callable[[], Any]) -> None:
        _timed(timings, name, job, reuse and is_complete_output(output))
        timings_file.write_text(json.dumps(timings, indent=2))

    a, b, ab = work / "a", work / "b", work / "ab"

    def prepare_ab() -> None:
        if texts.captioner is not None:
            _caption_new_images(texts, a, b, ab)
        _prepare(ab, kind, root / "prepared-ab", texts)

    stage("prepare A", root / "prepared-a", lambda: _prepare(a, kind, root / "prepared-a", texts))
    stage("train A", root / "model-a", lambda: _train(kind, root / "prepared-a", root / "model-a", train_args, texts))
    added = root / f"model-added{'-' + tag if tag else ''}"
    stage(f"add B{' ' + tag if tag else ''}", added, lambda: _add(root / "model-a", b, added, add_args, texts))
    stage("prepare A+B", root / "prepared-ab", prepare_ab)
    stage(
        "train A+B",
        root / "model-ab",
        lambda: _train(kind, root / "prepared-ab", root / "model-ab", train_args, texts),
    )

    _log(f"evaluate {kind} ({split} captions)")
    old_queries, old_gold, old_keys = _queries(a, split)
    new_queries, new_gold, new_keys = _queries(b, split)
    everything = old_keys + new_keys
    add_seconds = timings[f"add B{' ' + tag if tag else ''}"]
    retrain = {key: timings["prepare A+B"][key] + timings["train A+B"][key] for key in ("wall", "cpu")}
    result = {
        "kind": kind,
        "old_before": _recall(root / "model-a", old_queries, old_gold, old_keys),
        "old_after_same_candidates": _recall(added, old_queries, old_gold, old_keys),
        "old_added": _recall(added, old_queries, old_gold, everything),
        "old_retrained": _recall(root / "model-ab", old_queries, old_gold, everything),
        "new_added": _recall(added, new_queries, new_gold, everything),
        "new_retrained": _recall(root / "model-ab", new_queries, new_gold, everything),
        "add_seconds": add_seconds,
        "retrain_seconds": retrain,
        "num_old_queries": len(old_queries),
        "num_new_queries": len(new_queries),
    }
    result["forgetting"] = result["old_before"] - result["old_after_same_candidates"]
    result["new_ratio"] = result["new_added"] / max(result["new_retrained"], 1e-9)
    result["time_ratio"] = add_seconds["wall"] / retrain["wall"]
    result["cpu_ratio"] = add_seconds["cpu"] / retrain["cpu"]
    return result


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of `run_kind` results, goals checked."""
    lines = [
        "| identifiers | old R@10 before | old R@10 after adding | forgetting | old R@10 over A+B: add / retrain "
        "| new R@10: add / retrain | new ratio | wall time: add / retrain | time ratio (CPU) | goals met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        met = [
            r["new_ratio"] >= GOALS["new_ratio"],
            r["forgetting"] <= GOALS["forgetting"] + 1e-9,
            r["time_ratio"] <= GOALS["time_ratio"],
        ]
        verdict = "all" if all(met) else ", ".join(n for n, ok in zip(("new", "forgetting", "time"), met) if not ok)
        lines.append(
            f"| {r['kind']} | {r['old_before']:.3f} | {r['old_after_same_candidates']:.3f} "
            f"| {100 * r['forgetting']:+.1f} pts | {r['old_added']:.3f} / {r['old_retrained']:.3f} "
            f"| {r['new_added']:.3f} / {r['new_retrained']:.3f} | {r['new_ratio']:.2f}x "
            f"| {r['add_seconds']['wall']:.0f} s / {r['retrain_seconds']['wall']:.0f} s "
            f"| {r['time_ratio']:.2f} ({r['cpu_ratio']:.2f}) | {verdict if all(met) else 'missed: ' + verdict} |"
        )
    return "\n".join(lines) + "\n"


def pass_through(parser: argparse.ArgumentParser, option: str, value: str) -> list[str]:
    """The flags `option` (`--train-args`, `--add-args`) passes on, split as a shell would; a flag naming a path
    (`PATH_FLAGS`, in either spelling) is a usage error, before anything is written."""
    try:
        flags = shlex.split(value)
    except ValueError as error:
        parser.error(f"{option}: {error}")
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name.replace("_", "-") in PATH_FLAGS:
            parser.error(
                f"{option}: {name} names a path; the benchmark sets every path its runs read and write (inside "
                "--work-dir): pass settings only"
            )
    return flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="runs/bench-add-images", help="data, models and results go here")
    parser.add_argument("--kinds", nargs="+", default=["rq"], choices=IDENTIFIER_KINDS, help="default: the demo's")
    parser.add_argument("--collection", default="demo", choices=list(COLLECTIONS), help="the synthetic data's style")
    parser.add_argument(
        "--texts", default="captioner", choices=("captioner", "oracle"), help="the val/test images' pseudo-queries"
    )
    parser.add_argument("--seed", type=int, default=0, help="added to the collection's data seed; the training seed")
    parser.add_argument("--num-images", type=int, default=600, help="synthetic images, A and B together")
    parser.add_argument("--num-added", type=int, default=120, help="the last images: collection B")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="whose captions are scored")
    parser.add_argument("--reuse", action="store_true", help="keep finished outputs of an earlier run here")
    parser.add_argument(
        "--add-args", default="", help="more add-images settings, e.g. '--learning-rate 3e-4' (no paths)"
    )
    parser.add_argument(
        "--train-args", default="", help="more train settings for A and A+B (smoke runs: '--max-steps 5'; no paths)"
    )
    parser.add_argument("--tag", default="", help="names the add path's output (to compare settings)")
    args = parser.parse_args(argv)
    seed = ["--seed", str(args.seed)]
    train_args = [*seed, *pass_through(parser, "--train-args", args.train_args)]
    add_args = [*seed, *pass_through(parser, "--add-args", args.add_args)]
    torch.set_num_threads(1)

    output = open_work_dir(parser, args.work_dir, args.reuse)
    work = output.build.resolve()  # built beside --work-dir, which it becomes at the end
    raw = work / "raw"
    if not (args.reuse and (raw / SYNTHETIC_JSON).is_file()):
        seed, style = COLLECTIONS[args.collection]
        write_synthetic(
            raw, args.num_images, seed + args.seed, overwrite=True, style=style, oracle_pseudo_queries=True
        )
    first_added = args.num_images - args.num_added
    write_part(raw, work / "a", 0, first_added)
    write_part(raw, work / "b", first_added)
    write_part(raw, work / "ab", 0)
    texts = captioner_texts(work, work / "a", work / "ab", args.seed) if args.texts == "captioner" else Texts()

    results = [
        run_kind(kind, work, args.split, args.reuse, args.tag, train_args, add_args, texts) for kind in args.kinds
    ]
    suffix = f"-{args.tag}" if args.tag else ""
    (work / f"results-{args.split}{suffix}.json").write_text(json.dumps(results, indent=2))
    print(
        f"\n{args.collection} collection, {args.texts} pseudo-queries; A: {first_added} images, B: {args.num_added} "
        f"images; Recall@10 of {args.split} captions; goals: new "
        f">= {GOALS['new_ratio']}x retraining, forgetting <= {100 * GOALS['forgetting']:.0f} pts, time <= "
        f"{GOALS['time_ratio']:.0%} of retraining\n"
    )
    print(table(results), end="")
    finish_work_dir(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
