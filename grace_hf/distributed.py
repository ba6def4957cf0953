"""The one `Accelerator` set-up for training, evaluation and retrieval: what `accelerate launch` asked for (plain,
DDP, DeepSpeed; GPUs or CPU), made to work on machines without GPUs."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

__all__ = ["create_accelerator", "uses_deepspeed"]


def uses_deepspeed() -> bool:
    """Whether `accelerate launch` set this process up for DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def create_accelerator(
    report_to: list[str] | None = None, project_dir: str | None = None, find_unused_parameters: bool = False
) -> Accelerator:
    """The process's `Accelerator`; create it before building or loading the model (ZeRO-3 partitions at load).

    On a machine without GPUs, launched processes talk over gloo, and plain DDP processes are made MULTI_CPU
    (Accelerate would otherwise count one process per rank and never synchronise); DeepSpeed keeps its own type.
    `report_to`: trackers (`["none"]` or None for none); `project_dir`: where tracker logs go (`<dir>/logs`).
    """
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    cpu = False
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true"
    if on_cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        cpu = not uses_deepspeed()
    trackers = [] if report_to is None or "none" in report_to else report_to
    project = ProjectConfiguration(project_dir=project_dir, logging_dir=f"{project_dir}/logs") if project_dir else None
    return Accelerator(
        cpu=cpu,
        log_with=("all" if "all" in trackers else trackers) or None,
        project_config=project,
        kwargs_handlers=handlers,
    )
