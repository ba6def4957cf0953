"""Data order as a pure function of (seed, step, rank): resuming at step N replays exactly what an unbroken run sees.

Each task stream is an endless concatenation of seeded per-epoch permutations of its rows. Step `s` takes the
global batch of `batch_size * world_size` consecutive positions starting at `s * batch_size * world_size`, and
process `r` takes its `r`-th slice, so the processes see disjoint rows and no sampler state needs saving.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from grace_hf.training.views import ImageViews

__all__ = ["ConcatBatchSampler", "EpochRows", "StepBatchSampler"]


def _permutation(num_rows: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of `(row_index, epoch)` pairs for one process, starting at `start_step`.

    Example:
        >>> sampler = StepBatchSampler(num_rows=10, batch_size=2, seed=0, rank=1, world_size=2)
        >>> first = next(iter(sampler))  # [(row, 0), (row, 0)]: positions 2 and 3 of epoch 0's permutation
    """

    def __init__(
        self, num_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0
    ) -> None:
        if num_rows < 1:
            raise ValueError("a task stream needs at least one row")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def batch_positions(self, step: int) -> range:
        """The stream positions this process reads at `step`."""
        start = (step * self.world_size + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, []
        step = self.start_step
        while True:
            batch = []
            for position in self.batch_positions(step):
                if position // self.num_rows != epoch:
                    epoch = position // self.num_rows
                    order = _permutation(self.num_rows, self.seed, epoch)
                batch.append((order[position % self.num_rows], epoch))
            yield batch
            step += 1


class ConcatBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches that join one batch of each sampler, for rows of several datasets laid end to end: sampler `i`'s row
    indices are shifted by `offsets[i]` (add-images: new rows and replayed old rows in every batch)."""

    def __init__(self, samplers: list[StepBatchSampler], offsets: list[int]) -> None:
        self.samplers, self.offsets = samplers, offsets

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batches in zip(*self.samplers):
            yield [(index + offset, epoch) for batch, offset in zip(batches, self.offsets) for index, epoch in batch]


class EpochRows(Dataset):
    """Rows of a `datasets.Dataset` addressed by `(index, epoch)`; with `views`, each row's image is replaced by its
    view in that epoch (deterministic)."""

    def __init__(self, rows: Any, seed: int, views: ImageViews | None = None) -> None:
        self.rows, self.seed = rows, seed
        self.views = views if views is not None and views.changes_images else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        row = dict(self.rows[index])
        if self.views is not None:
            row["image"] = self.views(row["image"], self.seed, epoch, index)
        return row
