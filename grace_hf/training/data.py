"""What a run trains on: the task streams (rows + batch size + loss weight), the identifier index and eval queries."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from grace_hf.data.karpathy import load_karpathy, verify_images
from grace_hf.data.prepared import (
    caption_queries,
    load_prepared,
    optional_prepared_file,
    prepared_file,
    val_candidates,
)
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import CODEBOOKS_FILE, IDENTIFIERS_FILE, Codebooks, IdentifierIndex
from grace_hf.prompts import CAPTION_PREFIX, IDENTIFIER_PREFIX
from grace_hf.training.args import DataArguments, GraceTrainingArguments
from grace_hf.training.collate import GraceCollator
from grace_hf.training.sampling import ConcatBatchSampler, EpochRows, StepBatchSampler
from grace_hf.training.views import ImageViews

__all__ = ["TaskStream", "TrainingData", "data_source", "load_training_data", "spread", "stream_batches"]

REPLAY_SEED_OFFSET = 7919  # the replayed rows' order is seeded apart from the new rows'


@dataclass
class TaskStream:
    """One training task: its rows, per-process batch size and loss weight; with `replay_rows`, every batch also
    holds `replay_batch_size` of those (add-images: old rows replayed beside the new ones)."""

    name: str  # "i2id", "t2id" or "caption"
    rows: Any  # a datasets.Dataset
    batch_size: int
    weight: float
    replay_rows: Any = None  # a datasets.Dataset with the columns of `rows`
    replay_batch_size: int = 0

    def __post_init__(self) -> None:
        """A batch larger than the rows is clamped to them (with a note): it would only repeat rows in memory."""
        for attribute, rows in (("batch_size", self.rows), ("replay_batch_size", self.replay_rows)):
            size = getattr(self, attribute)
            if rows is not None and size > len(rows) > 0:
                what = self.name if attribute == "batch_size" else f"{self.name} replayed"
                print(f"note: {what} batch size {size} clamped to the {len(rows)} rows there are", file=sys.stderr)
                setattr(self, attribute, len(rows))

    @property
    def step_batch_size(self) -> int:
        """Samples per process per step, replayed ones included."""
        return self.batch_size + (self.replay_batch_size if self.replay_rows is not None else 0)

    def describe(self) -> str:
        text = f"{self.name} ({len(self.rows)} rows, batch {self.batch_size}"
        if self.replay_rows is not None:
            text += f" + {self.replay_batch_size} replayed of {len(self.replay_rows)} rows"
        return text + f", weight {self.weight})"


@dataclass
class TrainingData:
    """Everything a run reads from its data: the streams, and (retrieval) the index, the evaluation queries, and
    what the model directory keeps of the data.

    Args:
        sources: the prepared datasets whose rows the run trains on, recorded in `training_args.json` (so that
            add-images finds what to replay); a relative path is relative to the model directory.
        codebooks: the index's codebooks (structured: the k-means tree), copied into the model directory.
        token_texts: new tokens whose input embeddings start from the mean embedding of these texts' tokens.
        write_files: writes more files into the model directory when it is saved (add-images: the new rows).
    """

    streams: list[TaskStream]
    tokenizer_texts: list[str]
    index: IdentifierIndex | None = None
    eval_queries: list[str] = field(default_factory=list)
    eval_gold: list[str] = field(default_factory=list)
    eval_candidates: list[str] | None = None  # the images the evaluation ranks; None: the index's collection
    sources: list[str] = field(default_factory=list)
    codebooks: Codebooks | None = None
    token_texts: dict[str, list[str]] = field(default_factory=dict)
    write_files: Callable[[Path], None] | None = None


def data_source(data: str | os.PathLike) -> str:
    """How `training_args.json` names a prepared dataset: a local directory by its absolute path, else the Hub id."""
    return str(Path(data).resolve()) if Path(data).is_dir() else str(data)


def spread(num_rows: int, count: int) -> list[int]:
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
    queries = caption_queries(prepared, data_args.data, data_args.eval_split)
    chosen = queries.select(spread(len(queries), data_args.eval_num_queries))
    codebooks_file = optional_prepared_file(data_args.data, CODEBOOKS_FILE)
    return TrainingData(
        streams,
        texts,
        index,
        list(chosen["query"]),
        list(chosen["image_key"]),
        # the val captions rank the val images, as the test captions rank the collection (the test images)
        eval_candidates=val_candidates(queries) if data_args.eval_split == "val" else None,
        sources=[data_source(data_args.data)],
        codebooks=Codebooks.load(codebooks_file) if codebooks_file is not None else None,
    )


def _captioner_data(data_args: DataArguments, args: GraceTrainingArguments) -> TrainingData:
    corpus = load_karpathy(data_args.karpathy_json, data_args.image_root, check_images=False)
    pairs = [(str(image.path), caption) for image in corpus.split("train") for caption in image.captions]
    if not pairs:
        raise GraceInputError(f"{data_args.karpathy_json}: no train images to train a captioner on")
    verify_images(corpus, splits=("train",))  # the only images it reads
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
    """Endless batches of `stream` for process `rank`, from `start_step` on (the same batches as an unbroken run);
    with replay, each batch is `batch_size` rows of the stream then `replay_batch_size` replayed rows.

    `pin_memory`: page-locked batches, which a GPU copies without waiting for the work queued before the copy.
    """
    rows = stream.rows
    sampler = StepBatchSampler(len(rows), stream.batch_size, seed, rank, world_size, start_step)
    if stream.replay_rows is not None:
        replay = StepBatchSampler(
            len(stream.replay_rows),
            stream.replay_batch_size,
            seed + REPLAY_SEED_OFFSET,
            rank,
            world_size,
            start_step,
        )
        sampler = ConcatBatchSampler([sampler, replay], [0, len(rows)])
        replay_rows = stream.replay_rows
        if replay_rows.features != rows.features:
            replay_rows = replay_rows.cast(rows.features)
        rows = datasets.concatenate_datasets([rows, replay_rows])
    collator = GraceCollator(processor, stream.name, data_args.t2id_image, data_args.max_query_words)
    views = {"i2id": data_args.i2id_views(), "caption": ImageViews(flip=data_args.i2id_flip)}.get(stream.name)
    loader = DataLoader(
        EpochRows(rows, seed, views),
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    source = data_args.data or data_args.karpathy_json
    source = ", ".join(source) if isinstance(source, list) else str(source)
    return _naming_undecodable_images(iter(loader), sampler, rows, stream.name, source)


def _naming_undecodable_images(
    batches: Iterator[dict], sampler: Sampler, rows: Any, name: str, source: str
) -> Iterator[dict]:
    """`batches`, but an image of `rows` that does not decode ends them in a `GraceInputError` naming `source`, the
    row and its image (the loader's own error names neither, and a worker process's comes with its traceback)."""
    done = 0
    try:
        for batch in batches:
            yield batch
            done += 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        for index, _ in next(itertools.islice(iter(sampler), done, None)):  # the batch that failed
            try:
                rows[index]
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                row = f"{name}[{index}]"
                if "image_key" in rows.column_names:
                    row += f" (image {rows.select_columns('image_key')[index]['image_key']!r})"
                raise GraceInputError(
                    f"{source}: {row}: the image does not decode ({err}); was the dataset prepared with "
                    "--skip-image-check? Prepare it again without it"
                ) from None
        raise
