"""The README.md model card of a trained model directory: Hub metadata, how it was trained, its scores, usage."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["render_model_card"]


def _table(values: dict[str, Any]) -> str:
    rows = [
        f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in values.items()
    ]
    return "\n".join(["| | |", "| --- | --- |", *rows])


def render_model_card(
    *,
    task: str,
    identifier_kind: str | None,
    base_model: str,
    hyperparameters: dict[str, Any],
    metrics: dict[str, Any],
    launch_command: str,
) -> str:
    """A model card for a GRACE retriever (`task="retrieval"`) or a pseudo-query captioner (`task="captioner"`)."""
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["grace", "generative-retrieval", "flamingo", "text-to-image-retrieval"],
    }
    if task == "retrieval":
        title = f"GRACE generative retriever ({identifier_kind} identifiers)"
        summary = (
            "A Flamingo model that memorized every image of its corpus as an identifier and writes, for a text "
            "query, the identifiers of matching images by beam search constrained to the corpus's identifiers "
            '(GRACE, "Generative Cross-Modal Retrieval", ACL 2024).'
        )
        usage = (
            "```python\n"
            "from grace_hf.retrieval import GraceRetriever\n\n"
            'retriever = GraceRetriever.from_pretrained("path/or/hub-id")\n'
            'for hit in retriever.retrieve(["a dog runs on the beach"], top_k=10)[0]:\n'
            "    print(hit.image_key, hit.score)\n"
            "```"
        )
    else:
        title = "Flamingo pseudo-query captioner for GRACE"
        summary = (
            "A Flamingo model fine-tuned on train image -> caption pairs; it writes the pseudo-queries that teach "
            "GRACE to retrieve test images (prompt `<image>caption:`)."
        )
        usage = (
            "```bash\n"
            "grace-hf pseudo-queries --model path/to/this/dir --karpathy-json data/dataset_flickr30k.json \\\n"
            "    --image-root data/Flickr30K/flickr30k-images --output pseudo_queries.json\n"
            "```"
        )
    parts = [
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---",
        f"# {title}",
        summary,
        f"Trained from `{base_model}` with grace_hf (transformers + Accelerate).",
        "## Usage",
        usage,
        "## Training",
        f"```bash\n{launch_command}\n```",
        _table(hyperparameters),
    ]
    if metrics:
        parts += ["## Evaluation", _table(metrics)]
    return "\n\n".join(parts) + "\n"
