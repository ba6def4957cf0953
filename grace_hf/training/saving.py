"""The final model directory of a run, written whole or not at all, and its push to the Hub.

The files are written into a temporary sibling that then replaces `<output_dir>`; what was already in
`<output_dir>` (checkpoints, logs) is moved into it just before, so it survives. The layout is
`grace_hf.retrieval.model_dir`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from grace_hf.identifiers import IdentifierIndex
from grace_hf.io_utils import atomic_directory
from grace_hf.retrieval.model_dir import NOT_PUSHED, GraceConfig, write_model_dir

__all__ = ["push_directory", "save_model_directory"]


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
) -> None:
    """Gather the weights (every process must call this: ZeRO-3 gathers the shards) and, on the main process,
    write the model directory atomically."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        with atomic_directory(output_dir) as tmp:
            write_model_dir(
                tmp,
                accelerator.unwrap_model(model),
                processor,
                index=index,
                grace_config=grace_config,
                metrics=metrics,
                model_card=model_card,
                state_dict=state_dict,
            )
            for entry in output_dir.iterdir() if output_dir.is_dir() else ():
                if not (tmp / entry.name).exists():
                    os.replace(entry, tmp / entry.name)
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
