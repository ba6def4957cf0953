"""GRACE that sees, against a text-only and a dense baseline, on the demo data and a collection nothing was tuned on.

    python benchmarks/generalization.py --work-dir runs/generalization            # 2 collections x 3 seeds
    python benchmarks/generalization.py --work-dir runs/generalization --reuse    # print the table again

Each run is `grace-hf demo` (its own process; one run at a time by default, on the demo's own threads, so the demo
seed's figures are `make demo`'s; `--workers N` runs N side by side, the cores shared between them): captioner pseudo-queries for the val/test images,
the dense baseline (early stopping on val) as the Flamingo's vision tower, BM25 over the same texts, rq identifiers,
the re-ranking weight fitted on val; every figure is a test caption ranking the collection's test images. Two
collections, each with three seeds (the data's and the training's):
- `demo`: the demo's data (500 images, 64x64 RGB PNG, 10% val, 40% test); the synthetic recipes were chosen on its
  val captions.
- `check`: 500 images in another style (sides 48-128, PNG and JPEG, RGB, gray and RGBA, five sub-folders, 10% val,
  40% test, the extended caption templates), seeds 7, 8, 9. Nothing was chosen on it.
The upper-bound row is BM25 over oracle pseudo-queries (written from each scene's true attributes): what perfect
pseudo-queries would give a text matcher, which no real collection has.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python benchmarks/<name>.py`
from benchmarks.common import finish_work_dir, open_work_dir
from benchmarks.synthetic_split import CHECK_SEED, CHECK_STYLE
from grace_hf.commands.demo import DEMO_STYLE
from grace_hf.data.synthetic import ORACLE_PSEUDO_QUERIES_JSON, SYNTHETIC_JSON, SyntheticStyle, write_synthetic
from grace_hf.evaluation.metrics import METRICS_FILE
from grace_hf.evaluation.text_baseline import run_text_baseline
from grace_hf.outputs import is_complete_output
from grace_hf.runtime import usable_cores


@dataclass
class Collection:
    num_images: int
    seed: int
    style: SyntheticStyle = field(default_factory=SyntheticStyle)


COLLECTIONS = {
    "demo": Collection(500, 0, DEMO_STYLE),
    "check": Collection(500, CHECK_SEED, CHECK_STYLE),
}
KIND = "rq"  # the demo's default identifier kind
ROWS = ("bm25", "dense-clip", "rq", "rq + rerank", "oracle bm25 (upper bound)")


def _log(message: str) -> None:
    print(f"==> [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_one(name: str, offset: int, work: Path, reuse: bool, num_threads: int | None) -> dict[str, dict[str, Any]]:
    """One collection at one seed: data, `grace-hf demo` on it (`num_threads`: its every stage's torch threads, None:
    the demo's defaults), the oracle upper bound; metrics by row."""
    spec, out = COLLECTIONS[name], work / f"{name}-seed{offset}"
    out.mkdir(parents=True, exist_ok=True)
    data, demo, oracle = out / "data", out / "demo", out / "oracle-bm25"
    if not (reuse and is_complete_output(data)):
        write_synthetic(data, spec.num_images, spec.seed + offset, 1, True, spec.style, oracle_pseudo_queries=True)
    if not (reuse and is_complete_output(demo)):
        _log(f"{name} seed {offset}: grace-hf demo -> {demo}")
        command = [sys.executable, "-m", "grace_hf", "demo", "--output-dir", str(demo), "--overwrite"]
        command += ["--karpathy-json", str(data / SYNTHETIC_JSON), "--image-root", str(data), "--seed", str(offset)]
        if num_threads is not None:
            command += ["--num-threads", str(num_threads)]
        with open(out / "demo.log", "w") as log:  # its own process: runs can go side by side
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    if not (reuse and is_complete_output(oracle)):
        run_text_baseline(data / SYNTHETIC_JSON, data, oracle, data / ORACLE_PSEUDO_QUERIES_JSON, overwrite=True)
    model = json.loads((demo / f"model-{KIND}" / METRICS_FILE).read_text())
    dense = json.loads((demo / "dense-clip" / METRICS_FILE).read_text())
    captioner = json.loads((demo / "captioner" / METRICS_FILE).read_text())
    seconds = captioner["train_seconds"] + model["train_seconds"]
    return {
        "bm25": json.loads((demo / "bm25" / METRICS_FILE).read_text()),
        "dense-clip": dense,
        "rq": model | {"train_seconds": seconds},
        "rq + rerank": model["rerank"] | {"train_seconds": seconds + dense["train_seconds"]},
        "oracle bm25 (upper bound)": json.loads((oracle / METRICS_FILE).read_text()),
    }


def _mean_std(values: list[float]) -> str:
    """`mean ± std` in percent (std over seeds; 0 with one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def summary(name: str, runs: list[dict[str, dict[str, Any]]]) -> tuple[list[str], str]:
    """Table rows (mean ± std over seeds) and the goals' verdict for one collection."""
    rows = []
    for row in ROWS:
        cells = [_mean_std([run[row][f"recall@{k}"] for run in runs]) for k in (1, 5, 10)]
        seconds = statistics.mean(run[row].get("train_seconds", 0.0) for run in runs)
        rows.append(f"| {name} | {row} | {' | '.join(cells)} | {seconds:.0f} |")
    mean = {row: statistics.mean(run[row]["recall@1"] for run in runs) for row in ROWS}
    beams = runs[0]["rq + rerank"].get("num_beams")
    candidates = runs[0]["rq"].get("num_candidates")
    goals = [
        ("alone >= BM25 + 5", mean["rq"] >= mean["bm25"] + 0.05),
        ("alone >= 0.9x dense", mean["rq"] >= 0.9 * mean["dense-clip"]),
        ("re-ranked >= dense + 3", mean["rq + rerank"] >= mean["dense-clip"] + 0.03),
    ]
    verdict = f"{name} ({candidates} candidates, re-ranking {beams} beams): " + "; ".join(
        f"{goal} {'met' if met else 'missed'}" for goal, met in goals
    )
    return rows, verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="runs/generalization", help="data, models and results go here")
    parser.add_argument("--collections", nargs="+", default=list(COLLECTIONS), choices=list(COLLECTIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seed offsets (data and training)")
    parser.add_argument(
        "--workers", type=int, default=1, help="runs at once (more than one: the cores shared out between them)"
    )
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of an earlier call here")
    args = parser.parse_args(argv)
    if args.workers < 1 or not args.seeds:
        parser.error("--workers must be >= 1 and --seeds non-empty")
    output = open_work_dir(parser, args.work_dir, args.reuse)
    work = output.build.resolve()  # built beside --work-dir, which it becomes at the end
    jobs = [(name, seed) for name in args.collections for seed in args.seeds]
    threads = max(1, usable_cores() // args.workers) if args.workers > 1 else None
    with ThreadPoolExecutor(args.workers) as pool:  # each run is its own process
        results = list(pool.map(lambda job: run_one(*job, work, args.reuse, threads), jobs))
    rows, verdicts = [], []
    for name in args.collections:
        table_rows, verdict = summary(name, [r for (n, _), r in zip(jobs, results) if n == name])
        rows += table_rows
        verdicts.append(verdict)
    header = [
        "| collection | method | R@1 | R@5 | R@10 | train s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    table = "\n".join([*header, *rows])
    goals = "\n".join(f"- {verdict}" for verdict in verdicts)
    seeds = ", ".join(map(str, args.seeds))
    text = (
        f"Test captions ranking each collection's test images, mean ± std over seeds {seeds}:\n\n{table}\n\n{goals}\n"
    )
    (work / "generalization.md").write_text(text)
    print(f"\n{text}")
    finish_work_dir(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
