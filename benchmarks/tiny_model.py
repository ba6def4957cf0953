"""A random tiny Flamingo with a tokenizer trained on the texts it will see: what the latency and load benchmarks
time, and what the retrieval tests search with (latency does not depend on training)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from grace_hf.identifiers import IdentifierIndex
from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor

__all__ = ["random_flamingo", "save_random_model_dir"]


def random_flamingo(
    texts: Sequence[str], vocab_size: int = 300, seed: int = 0
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """The `tiny` preset with random weights (seeded), and a processor whose tokenizer is trained on `texts`
    (queries, `id ...` identifier strings), like a real run's."""
    image_size = FlamingoConfig.from_preset("tiny").vision_config["image_size"]
    processor = FlamingoProcessor.from_texts(list(texts), image_size=image_size, vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = FlamingoConfig.from_preset("tiny", text_config={"vocab_size": len(processor.tokenizer)})
    return FlamingoForConditionalGeneration(config).eval(), processor


def save_random_model_dir(
    directory: Path,
    images: dict[str, list[str]],
    queries: Sequence[str],
    collection: Sequence[str],
    kind: str = "numeric",
    vocab_size: int = 300,
    seed: int = 0,
) -> Path:
    """A model directory `GraceRetriever.from_pretrained` loads, of a random tiny Flamingo: model, processor (its
    tokenizer trained on `queries` and the identifiers) and identifiers.json; returns `directory`."""
    texts = [*queries, *(f"id {identifier}" for ids in images.values() for identifier in ids)]
    model, processor = random_flamingo(texts, vocab_size, seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    IdentifierIndex(kind, images, [], collection=list(collection)).save(directory)
    return directory
