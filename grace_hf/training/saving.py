"""The final model directory, written whole or not at all, and its push to the Hub.

Layout of `<output_dir>` after a run (DESIGN.md "A trained model directory"):

    config.json, model.safetensors, generation_config.json   the weights (`save_pretrained`)
    tokenizer files, preprocessor/processor config           the processor
    identifiers.json, grace_config.json                      retrieval runs: the index and the query-image mode
    identifier_trie.safetensors                              retrieval runs: the trie of the collection's identifiers
    metrics.json, README.md                                  final scores and train time; the model card
    checkpoints/step-<N>/                                    resumable training states (kept, not pushed)
    logs/                                                    tracker logs (kept, not pushed)

The files are written into a temporary sibling that then replaces `<output_dir>`; what was already in
`<output_dir>` (checkpoints, logs) is moved into it just before, so it survives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from grace_hf.identifiers import IdentifierIndex
from grace_hf.io_utils import atomic_directory, atomic_write_json, atomic_write_text
from grace_hf.retrieval.retriever import GRACE_CONFIG_FILE, TRIE_FILE, GraceRetriever

__all__ = ["METRICS_FILE", "NOT_PUSHED", "push_directory", "save_model_directory"]

METRICS_FILE = "metrics.json"
NOT_PUSHED = ["checkpoints/*", "logs/*"]


def save_model_directory(
    accelerator: Any,
    model: Any,
    processor: Any,
    output_dir: str | os.PathLike,
    *,
    index: IdentifierIndex | None,
    grace_config: dict[str, Any] | None,
    metrics: dict[str, Any],
    model_card: str,
) -> None:
    """Gather the weights (every process must call this: ZeRO-3 gathers the shards) and, on the main process,
    write the model directory atomically."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        with atomic_directory(output_dir) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
            processor.save_pretrained(tmp)
            if index is not None:
                index.save(tmp)
                # the trie of the default candidates, so loading the retriever skips tokenizing the identifiers
                GraceRetriever(accelerator.unwrap_model(model), processor, index).trie.save(tmp / TRIE_FILE)
            if grace_config is not None:
                atomic_write_json(tmp / GRACE_CONFIG_FILE, grace_config)
            atomic_write_json(tmp / METRICS_FILE, metrics)
            atomic_write_text(tmp / "README.md", model_card)
            for entry in output_dir.iterdir() if output_dir.is_dir() else ():
                if not (tmp / entry.name).exists():
                    os.replace(entry, tmp / entry.name)
    accelerator.wait_for_everyone()


def push_directory(output_dir: str | os.PathLike, repo_id: str, commit_message: str = "GRACE model") -> str:
    """Upload the model directory (not its checkpoints or logs) to the Hub repo `repo_id`; return the commit URL."""
    from huggingface_hub import HfApi

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
