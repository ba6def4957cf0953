"""How a command runs on this machine: progress bars that suit a terminal and a log file, and CPU threads."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["configure_threads", "default_io_workers", "default_num_threads", "default_processes", "progress_bar"]

LOG_INTERVAL_SECONDS = 60.0  # how often a bar updates when stderr is a file or a CI log, not a terminal


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, redrawn at most once a minute when stderr is not a terminal (in a log file every
    redraw is a new line)."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_SECONDS)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_SECONDS)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_threads() -> int:
    """Half the CPU cores this process may use (1 on a 2-core machine), at most 8: torch's default of every core
    oversubscribes a busy machine, which ran small models up to 15x slower here."""
    return max(1, min(8, _usable_cores() // 2))


def default_io_workers() -> int:
    """Threads that read image files: twice the machine's cores, at most 8 (I/O and decoding release the GIL)."""
    return min(8, (os.cpu_count() or 1) * 2)


def default_processes() -> int:
    """Processes for CPU-bound work in a pool (drawing the synthetic images): the machine's cores, at most 8."""
    return min(8, os.cpu_count() or 1)


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's CPU threads to `num_threads` (None or 0: `default_num_threads()`); return the number set."""
    threads = num_threads or default_num_threads()
    torch.set_num_threads(threads)
    return threads
