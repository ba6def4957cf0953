"""The final model files of a run, and its push to the Hub.

The run's output directory already holds its checkpoints and logs. The model files are written into a staging
directory inside it, then each is renamed into place, and the output's marker says complete last: a kill at any
moment leaves a directory that `--resume-from-checkpoint latest` resumes, and one that `read_model_dir` refuses
until the run has finished. The layout is `grace_hf.model_dir`'s.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from grace_hf.identifiers import Codebooks, IdentifierIndex
from grace_hf.model_dir import NOT_PUSHED, GraceConfig, write_model_dir
from grace_hf.outputs import MODEL, finish_output_dir
from grace_hf.retrieval.collection import Collection

__all__ = ["STAGING_PREFIX", "push_directory", "save_model_directory"]

STAGING_PREFIX = ".grace-final-"


def save_model_directory(
    accelerator: Any,
    model: Any,
    processor: Any,
    output_dir: str | os.PathLike,
    *,
    index: IdentifierIndex | None,
    grace_config: GraceConfig | None,
    metrics: dict[str, Any],
    model_card: str,
    codebooks: Codebooks | None = None,
    training_args: dict[str, Any] | None = None,
    write_files: Callable[[Path], None] | None = None,
) -> None:
    """Gather the weights (every process must call this: ZeRO-3 gathers the shards) and, on the main process,
    write the model directory atomically; `write_files` adds more files to it (add-images: the new images' rows)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        for stale in output_dir.glob(f"{STAGING_PREFIX}*"):  # a final save that was killed
            shutil.rmtree(stale)
        staging = output_dir / f"{STAGING_PREFIX}{os.getpid()}"
        staging.mkdir()
        write_model_dir(
            staging,
            accelerator.unwrap_model(model),
            processor,
            index=index,
            grace_config=grace_config,
            metrics=metrics,
            model_card=model_card,
            state_dict=state_dict,
            codebooks=codebooks,
            training_args=training_args,
            trie=None if index is None else Collection.build(index, processor).trie,
        )
        if write_files is not None:
            write_files(staging)
        for entry in staging.iterdir():
            os.replace(entry, output_dir / entry.name)
        staging.rmdir()
        finish_output_dir(output_dir, MODEL)
    accelerator.wait_for_everyone()


def push_directory(output_dir: str | os.PathLike, repo_id: str, commit_message: str = "GRACE model") -> str:
    """Upload the model directory (not its checkpoints or logs) to the Hub repo `repo_id`; return the commit URL."""
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=NOT_PUSHED,
    )
    return str(getattr(commit, "commit_url", commit))
