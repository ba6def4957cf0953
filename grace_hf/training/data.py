"""What a run trains on: the task streams (rows + batch size + loss weight), the identifier index and eval queries."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
from torch.utils.data import DataLoader

from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.prepared import load_prepared, prepared_file
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IDENTIFIERS_FILE, IdentifierIndex
from grace_hf.prompts import CAPTION_PREFIX, IDENTIFIER_PREFIX
from grace_hf.training.args import DataArguments, GraceTrainingArguments
from grace_hf.training.collate import GraceCollator
from grace_hf.training.sampling import EpochRows, StepBatchSampler

__all__ = ["TaskStream", "TrainingData", "load_training_data", "stream_batches"]


@dataclass
class TaskStream:
    """One training task: its rows, per-process batch size and loss weight."""

    name: str  # "i2id", "t2id" or "caption"
    rows: Any  # a datasets.Dataset
    batch_size: int
    weight: float


@dataclass
class TrainingData:
    """Everything a run reads from its data: the streams, and (retrieval) the index and the evaluation queries."""

    streams: list[TaskStream]
    tokenizer_texts: list[str]
    index: IdentifierIndex | None = None
    eval_queries: list[str] = field(default_factory=list)
    eval_gold: list[str] = field(default_factory=list)


def _spread(num_rows: int, count: int) -> list[int]:
    """`count` evenly spread row positions out of `num_rows` (all of them when count >= num_rows)."""
    if count >= num_rows:
        return list(range(num_rows))
    return [i * num_rows // count for i in range(count)]


def _retrieval_data(data_args: DataArguments, args: GraceTrainingArguments) -> TrainingData:
    prepared = load_prepared(data_args.data)
    index = IdentifierIndex.load(prepared_file(data_args.data, IDENTIFIERS_FILE))
    streams = [
        TaskStream(name, prepared[name], batch_size, weight)
        for name, batch_size, weight in (
            ("i2id", args.batch_size_i2id, args.loss_weight_i2id),
            ("t2id", args.batch_size_t2id, args.loss_weight_t2id),
        )
        if weight > 0
    ]
    for stream in streams:
        if len(stream.rows) == 0:
            raise GraceInputError(f"{data_args.data}: split {stream.name!r} is empty")
    # the tokenizer of a fresh model learns the training texts (never the test captions); identifiers of kinds
    # with their own tokens are left out, those tokens are added whole
    texts = [CAPTION_PREFIX + query for query in prepared["t2id"]["query"]]
    if not index.new_tokens:
        texts += [
            IDENTIFIER_PREFIX + identifier for identifiers in index.images.values() for identifier in identifiers
        ]
    queries = prepared["queries"]
    chosen = queries.select(_spread(len(queries), data_args.eval_num_queries))
    return TrainingData(streams, texts, index, list(chosen["query"]), list(chosen["image_key"]))


def _captioner_data(data_args: DataArguments, args: GraceTrainingArguments) -> TrainingData:
    corpus = load_karpathy(data_args.karpathy_json, data_args.image_root, check_images=False)
    pairs = [(str(image.path), caption) for image in corpus.split("train") for caption in image.captions]
    if not pairs:
        raise GraceInputError(f"{data_args.karpathy_json}: no train images to train a captioner on")
    rows = datasets.Dataset.from_dict(
        {"image": [path for path, _ in pairs], "caption": [caption for _, caption in pairs]}
    ).cast_column("image", datasets.Image())
    stream = TaskStream("caption", rows, args.batch_size_caption, 1.0)
    return TrainingData([stream], [CAPTION_PREFIX + caption for _, caption in pairs])


def load_training_data(data_args: DataArguments, args: GraceTrainingArguments) -> TrainingData:
    """The streams of `data_args.task`: i2id and t2id (those with a positive weight), or the captions."""
    if data_args.task == "captioner":
        return _captioner_data(data_args, args)
    return _retrieval_data(data_args, args)


def stream_batches(
    stream: TaskStream,
    processor: Any,
    data_args: DataArguments,
    seed: int,
    rank: int,
    world_size: int,
    start_step: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict]:
    """Endless batches of `stream` for process `rank`, from `start_step` on (the same batches as an unbroken run).

    `pin_memory`: page-locked batches, which a GPU copies without waiting for the work queued before the copy.
    """
    sampler = StepBatchSampler(len(stream.rows), stream.batch_size, seed, rank, world_size, start_step)
    collator = GraceCollator(processor, stream.name, data_args.t2id_image, data_args.max_query_words)
    rows = EpochRows(stream.rows, seed, flip=data_args.i2id_flip and stream.name != "t2id")
    loader = DataLoader(
        rows, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers, pin_memory=pin_memory
    )
    return iter(loader)
