"""Time and peak memory of `grace-hf synthetic` and `grace-hf prepare` at Flickr30K's size.

    python benchmarks/prepare_scale.py --num-images 30000

Each step runs in its own process (peak RSS of that process and its children); prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python benchmarks/<name>.py`
from grace_hf.identifiers import IDENTIFIER_KINDS

REPO = Path(__file__).resolve().parents[1]

# Runs one grace-hf command and reports its peak memory on the last stdout line.
_CHILD = """
import json, resource, sys
from grace_hf.commands import cli
code = cli.main(json.loads(sys.argv[1]))
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"exit": code, "peak_kib": peak}))
"""


def _run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `grace-hf argv`; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(argv)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"grace-hf {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if report["exit"] != 0:
        sys.exit(f"grace-hf {' '.join(argv)} exited {report['exit']}:\n{proc.stderr[-3000:]}")
    return wall, report["peak_kib"] / 1024


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=30000)
    parser.add_argument("--kinds", nargs="+", default=list(IDENTIFIER_KINDS), choices=IDENTIFIER_KINDS)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--work-dir", default=None, help="keep outputs here (default: a temporary directory)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="grace-prepare-scale-") as tmp:
        work = Path(args.work_dir or tmp)
        workers = ["--num-workers", str(args.num_workers)] if args.num_workers else []
        syn = work / "synthetic"
        wall, peak = _run(["--help"])  # importing grace_hf alone: the floor under every row below
        rows = [("import only", 0, wall, peak, 0.0)]
        wall, peak = _run(["synthetic", "--output-dir", str(syn), "--num-images", str(args.num_images), *workers])
        rows.append(("synthetic", args.num_images, wall, peak, _size_mib(syn)))
        for kind in args.kinds:
            out = work / f"prepared-{kind}"
            command = ["prepare", "--karpathy-json", str(syn / "dataset_synthetic.json"), "--image-root", str(syn)]
            command += ["--pseudo-queries", str(syn / "oracle_pseudo_queries.json"), "--identifier-kind", kind]
            command += ["--output-dir", str(out), *workers]
            command += ["--pixel-features"] if kind in ("structured", "rq") else []
            wall, peak = _run(command)
            with open(out / "prepare.json") as f:
                counts = json.load(f)["counts"]
            rows.append((f"prepare {kind}", counts["memorized_images"], wall, peak, _size_mib(out)))

    print(f"{'step':<20} {'images':>8} {'wall s':>8} {'peak RSS MiB':>13} {'output MiB':>11}")
    for step, images, wall, peak, size in rows:
        print(f"{step:<20} {images:>8} {wall:>8.1f} {peak:>13.0f} {size:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
