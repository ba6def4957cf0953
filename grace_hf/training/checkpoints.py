"""Resumable checkpoints: `<output_dir>/checkpoints/step-<N>/`, each written whole or not at all.

A checkpoint is `accelerator.save_state` (model, optimizer, RNG states; DeepSpeed shards under DeepSpeed) plus
`trainer_state.json` (step, scheduler state). It is written into `.step-<N>.tmp` and renamed into place once
complete, so a process killed mid-save leaves no `step-<N>` directory and `latest` resolves to the one before.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_json
from grace_hf.model_dir import CHECKPOINTS_DIR

__all__ = ["TRAINER_STATE_FILE", "list_checkpoints", "resolve_checkpoint", "save_checkpoint"]

TRAINER_STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run as (step, path), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str | os.PathLike, spec: str) -> Path:
    """`"latest"` -> the highest complete checkpoint of `output_dir`; anything else is a checkpoint directory."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise GraceInputError(
                f"{output_dir}: no checkpoint to resume from (yet); run again without --resume-from-checkpoint"
            )
        return checkpoints[-1][1]
    path = Path(spec)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise GraceInputError(f"{path}: not a complete checkpoint (no {TRAINER_STATE_FILE})")
    return path


def save_checkpoint(
    accelerator: Any, output_dir: str | os.PathLike, step: int, trainer_state: dict, total_limit: int
) -> Path:
    """Save the training state at `step` on every process, rename it into place, keep the last `total_limit`."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAINER_STATE_FILE, {"step": step, **trainer_state})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit > 0:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
