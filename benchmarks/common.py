"""What the benchmarks share: timing, a free port and the work directory. Light to import (torch is loaded by the
timing functions only), so that a launcher's `--help` stays quick."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from grace_hf.errors import GraceInputError
from grace_hf.outputs import BENCHMARK, OutputBuild, begin_output

if TYPE_CHECKING:
    import torch

__all__ = ["finish_work_dir", "free_port", "median_seconds", "open_work_dir", "sync"]


def sync(device: torch.device | None = None) -> None:
    """Wait for the device's queued work (CUDA only; a no-op elsewhere), so that a clock reading covers it."""
    import torch

    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device | None = None) -> tuple[float, object]:
    """Median wall time of `fn` over `repeats` calls after one warm-up call (compilation, graph capture), and what
    the warm-up call returned."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def open_work_dir(
    parser: argparse.ArgumentParser, path: str, reuse: bool, inputs: Iterable[str | os.PathLike | None] = ()
) -> OutputBuild:
    """The benchmark's `--work-dir`, built beside it under the output policy (never the working directory, home, a
    folder this script did not write or another kind of grace_hf output, which no flag lets it replace; nor one that
    is, holds or sits inside one of the run's `inputs`, the paths it reads; `.build` is where the run writes); a
    refusal ends the run as a usage error naming the flag, before anything is written."""
    try:
        return begin_output(
            path,
            BENCHMARK,
            inputs,
            resume=reuse,
            command=shlex.join(sys.argv),
            flag="--work-dir",
            overwrite_flag=None,
        )
    except GraceInputError as error:
        parser.error(str(error))


def finish_work_dir(output: OutputBuild) -> None:
    """Swap the finished work directory into place (the run's last step)."""
    output.commit()
