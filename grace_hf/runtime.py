"""How a command runs on this machine: progress bars that suit a terminal and a log file, and CPU threads."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from tqdm import autonotebook
from tqdm.auto import tqdm
from tqdm.std import tqdm as plain_tqdm

__all__ = [
    "configure_threads",
    "default_io_workers",
    "default_num_threads",
    "default_processes",
    "progress_bar",
    "usable_cores",
]

LOG_PERCENT_STEP = 5  # off a terminal: a line each time a bar passes another 5% of its total
LOG_INTERVAL_SECONDS = 60.0  # off a terminal, for a bar without a total: a line a minute


class _LogLines(plain_tqdm):
    """A progress bar for a log file (stderr is not a terminal): whole lines, never redraws. A line each time the bar
    passes another `LOG_PERCENT_STEP`% of its total (each `LOG_INTERVAL_SECONDS` without a total), whenever its postfix
    changes (training sets it every `logging_steps`), and at the end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._next_percent, self._printed_n, self._last_line_time, self._postfix_changed = 0.0, None, 0.0, False
        kwargs.setdefault("smoothing", 0)  # the average rate: a line is no moment's speed
        super().__init__(*args, mininterval=0, miniters=1, **kwargs)  # every update reaches `display`, which decides

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing its line: there is none to clear
            return False
        if self.total:
            due = 100 * self.n >= self._next_percent * self.total
        else:
            due = time.time() - self._last_line_time >= LOG_INTERVAL_SECONDS
        if self._postfix_changed or (due and self.n != self._printed_n):
            self._write_line()
        return True

    def _write_line(self) -> None:
        self.fp.write(f"{self}\n")
        self.fp.flush()
        self._printed_n, self._last_line_time, self._postfix_changed = self.n, time.time(), False
        if self.total:
            self._next_percent = (100 * self.n // self.total // LOG_PERCENT_STEP + 1) * LOG_PERCENT_STEP

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        self._postfix_changed = True
        super().set_postfix(ordered_dict, refresh, **kwargs)

    def close(self) -> None:
        if not self.disable and self.n != self._printed_n:
            self._write_line()  # the last line: where the bar ended
        self.leave = False  # tqdm would end the line it redraws: ours are ended
        super().close()


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)` on a terminal (or a notebook's widget); in a log file (stderr is not a terminal),
    where every redraw would be kept, a line per `LOG_PERCENT_STEP`% and per postfix change instead (`_LogLines`)."""
    in_notebook = autonotebook.tqdm is not plain_tqdm
    bar = tqdm if sys.stderr.isatty() or in_notebook else _LogLines
    return bar(iterable, dynamic_ncols=True, **kwargs)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_threads() -> int:
    """Half the CPU cores this process may use (1 on a 2-core machine), at most 8: torch's default of every core
    oversubscribes a busy machine, which ran small models up to 15x slower here."""
    return max(1, min(8, usable_cores() // 2))


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
