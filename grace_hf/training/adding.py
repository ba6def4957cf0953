"""The `add-images` job: new images into a trained retriever, without retraining it from scratch.

Stages: check (the model directory, the output, the new images) -> identifiers for the new images, coded the way
the model's kind codes them, no existing one changed (`extend_identifiers`) -> their rows (i2id; t2id from train
captions and val/test pseudo-queries; the test captions as evaluation queries) -> continued training from the
model's weights with the `train` loop, every batch mixing new rows with replayed rows of the datasets the model was
trained on (`replay_ratio` old rows per new row; by default as many as the data holds, so that batches mirror the
whole collection, half that for rq and structured models: `default_replay_ratio`), so the old images are neither
forgotten nor outranked by the new ones -> a new model directory.

The new directory is a complete retriever whose collection is the old one plus the new test images. It also holds
the new rows as a prepared dataset, `added_images/` (what a later add-images replays; `grace-hf evaluate --data
NEWDIR/added_images` scores the new images' test captions over the whole collection), and a `training_args.json`
that lists every dataset the model has now learned. The old model directory is only read.

    grace-hf add-images --config recipes/synthetic/add_images.yaml --model runs/synthetic-structured \\
        --karpathy-json data/new/dataset_synthetic.json --image-root data/new \\
        --pseudo-queries data/new/pseudo_queries.json --output-dir runs/synthetic-structured-added
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

from grace_hf.data.captioning import caption_splits
from grace_hf.data.karpathy import KarpathyCorpus, load_karpathy, teaching_texts
from grace_hf.data.prepared import (
    PREPARE_FILE,
    TEST_QUERIES,
    build_dataset_dict,
    dataset_counts,
    inputs_record,
    load_prepared,
    save_prepared,
    warn_images_without_queries,
)
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.dense.query_filter import filtered_captioning
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import CONTENT_KINDS, IDENTIFIERS_FILE, IdentifierIndex, extend_identifiers
from grace_hf.io_utils import atomic_write_json
from grace_hf.model_dir import (
    ADDED_IMAGES_DIR,
    GRACE_CONFIG_FILE,
    TRAINING_ARGS_FILE,
    ModelDirectory,
    read_captioner,
    read_codebooks,
    read_model_dir,
    training_data_sources,
)
from grace_hf.outputs import MODEL, check_output_dir
from grace_hf.runtime import configure_threads
from grace_hf.training.args import AddImagesArguments, GraceTrainingArguments, ModelArguments
from grace_hf.training.data import TaskStream, TrainingData, data_source, spread
from grace_hf.training.loop import train

__all__ = ["add_images", "added_training_data", "default_replay_ratio", "new_pseudo_queries", "split_batch"]

TASKS = ("i2id", "t2id")
# the default replayed rows per new row of content-based identifiers (rq, structured), as a share of the
# collection's proportion: at the proportion they see the new images' rows too rarely to learn them in 200 steps
# (half was chosen on val captions: docs/add_images.md); numeric and string models given fewer old rows favour the
# new images, so the other kinds keep the proportion
CONTENT_REPLAY_SHARE = 0.5


def default_replay_ratio(kind: str, replayed_rows: int, new_rows: int) -> float:
    """Replayed rows per new row when `--replay-ratio` is not given: the collection's proportion (so batches mirror
    it), times `CONTENT_REPLAY_SHARE` for the content-based kinds (`CONTENT_KINDS`: rq, structured).

    Example:
        >>> default_replay_ratio("numeric", 480, 120), default_replay_ratio("rq", 480, 120)
        (4.0, 2.0)
    """
    share = CONTENT_REPLAY_SHARE if kind in CONTENT_KINDS else 1.0
    return share * replayed_rows / new_rows


def split_batch(batch_size: int, replay_ratio: float) -> tuple[int, int]:
    """`(new, replayed)` rows of a batch of `batch_size` with `replay_ratio` replayed rows per new row (>= 1 new).

    Example:
        >>> split_batch(16, 1.0), split_batch(48, 2.0), split_batch(16, 0.0)
        ((8, 8), (16, 32), (16, 0))
    """
    new = max(1, round(batch_size / (1 + replay_ratio)))
    return new, batch_size - new


def _concatenate(parts: list[Dataset]) -> Dataset:
    """`parts` end to end (an empty part, which may have no arrow table at all, is left out)."""
    return concatenate_datasets([part for part in parts if len(part)] or parts[:1])


def new_pseudo_queries(data_args: AddImagesArguments, corpus: KarpathyCorpus) -> dict[str, list[str]]:
    """The new val and test images' pseudo-queries: read from a file, or written by a captioner from their pixels
    (with `captioner_filter`: of its beams and samples, those the dense model finds closest)."""
    if data_args.pseudo_queries:
        return load_pseudo_queries(data_args.pseudo_queries, corpus)
    uncaptioned = [split for split in ("val", "test") if corpus.split(split)]
    if not data_args.captioner or not uncaptioned:
        return {}
    captioner = read_captioner(data_args.captioner, "--captioner")
    kept = filtered_captioning(data_args.captioner_filter) if data_args.captioner_filter else {}
    return caption_splits(captioner.model, captioner.processor, corpus, uncaptioned, **kept)


def _replay_sources(model: ModelDirectory, data_args: AddImagesArguments) -> list[str]:
    """The prepared datasets to replay: `--data`, else those the model's training_args.json records."""
    if data_args.data:
        return [data_source(source) for source in data_args.data]
    sources = training_data_sources(model.path)
    if not sources:
        raise GraceInputError(
            f"{model.path}: no {TRAINING_ARGS_FILE} says which prepared dataset the model was trained on; pass "
            "--data DATASET (its rows are replayed so that the old images are not forgotten)"
        )
    return sources


def _check_rows(source: str, name: str, rows: Dataset, owner: dict[str, str]) -> None:
    """Every row of a replayed split teaches the model's own identifier of its image."""
    for position, (key, identifier) in enumerate(zip(rows["image_key"], rows["identifier"])):
        if owner.get(identifier) != key:
            raise GraceInputError(
                f"{source}: {name}[{position}]: identifier {identifier!r} of image {key!r} is not the model's "
                "identifier for it: this dataset was not prepared for this model (pass the one it was trained on "
                "with --data)"
            )


def _replayed_rows(sources: list[str], index: IdentifierIndex) -> DatasetDict:
    """The splits of the replayed datasets, each checked against the model's identifiers, laid end to end."""
    owner = index.identifier_to_image()
    parts = []
    for source in sources:
        dataset = load_prepared(source)
        for name in TASKS:
            _check_rows(source, name, dataset[name], owner)
        unknown = [key for key in dataset[TEST_QUERIES]["image_key"] if key not in index.images]
        if unknown:
            raise GraceInputError(f"{source}: queries of image {unknown[0]!r}, which the model does not know")
        parts.append(dataset)
    return DatasetDict({name: _concatenate([part[name] for part in parts]) for name in (*TASKS, TEST_QUERIES)})


def _token_texts(
    corpus: KarpathyCorpus, old: IdentifierIndex, new: IdentifierIndex, pseudo_queries: dict[str, list[str]]
) -> dict[str, list[str]]:
    """New identifiers that are one new token each (atomic) -> the texts their embeddings start from: the image's
    training queries (train captions; pseudo-queries of val and test images, whose captions are held out)."""
    added_tokens = set(new.new_tokens) - set(old.new_tokens)
    return {
        identifier: teaching_texts(image, pseudo_queries)[0]
        for image in corpus.memorized()
        for identifier in new.images[image.key]
        if identifier in added_tokens
    }


def _writer(added: DatasetDict, index: IdentifierIndex, record: dict[str, Any]):
    """Writes the new rows into a model directory as the prepared dataset `added_images/`."""

    def write(directory: Path) -> None:
        target = directory / ADDED_IMAGES_DIR
        save_prepared(added, target)
        index.save(target / IDENTIFIERS_FILE)
        atomic_write_json(target / PREPARE_FILE, record)

    return write


def added_training_data(
    model_args: ModelArguments, data_args: AddImagesArguments, args: GraceTrainingArguments, cache_dir: str
) -> TrainingData:
    """Check everything, name the new images and build what the continued training reads (the new rows' arrow
    cache goes to `cache_dir`, which must outlive the training). Sets `data_args.data` to the replayed datasets
    and `data_args.t2id_image` to the model's. Nothing is written outside `cache_dir`."""
    if model_args.model is None:
        raise GraceInputError("add-images needs --model: the trained model directory to add images to")
    model = read_model_dir(model_args.model, weights=False)
    query_image = model.grace_config.query_image
    if data_args.t2id_image not in (None, query_image):
        raise GraceInputError(
            f"t2id_image {data_args.t2id_image!r}: {model.path} was trained with {query_image!r} ({GRACE_CONFIG_FILE})"
        )
    data_args.t2id_image = query_image
    data_args.data = _replay_sources(model, data_args)
    check_output_dir(args.output_dir, MODEL, [*data_args.input_paths(), model.path], args.overwrite)

    corpus = load_karpathy(data_args.karpathy_json, data_args.image_root)
    pseudo_queries = new_pseudo_queries(data_args, corpus)
    overrides = {"image_features": data_args.image_features} if data_args.image_features else {}
    index = extend_identifiers(
        model.index,
        corpus,
        pseudo_queries,
        read_codebooks(model.path),
        source=str(model.path / IDENTIFIERS_FILE),
        **overrides,
    )
    replayed = _replayed_rows(data_args.data, model.index)
    added = build_dataset_dict(corpus, index, pseudo_queries, cache_dir)

    streams = []
    for name, batch_size, weight in (
        ("i2id", args.batch_size_i2id, args.loss_weight_i2id),
        ("t2id", args.batch_size_t2id, args.loss_weight_t2id),
    ):
        if weight == 0:
            continue
        if len(added[name]) == 0:
            raise GraceInputError(f"{data_args.karpathy_json}: the new images give no {name} rows")
        ratio = data_args.replay_ratio
        if ratio is None:
            ratio = default_replay_ratio(index.kind, len(replayed[name]), len(added[name]))
        new, replay = split_batch(batch_size, ratio)
        replay_rows = replayed[name] if replay > 0 and len(replayed[name]) > 0 else None
        if replay_rows is None:
            new = batch_size
        streams.append(TaskStream(name, added[name], new, weight, replay_rows, replay))

    queries = _concatenate([replayed[TEST_QUERIES], added[TEST_QUERIES]])
    chosen = queries.select(spread(len(queries), data_args.eval_num_queries))
    record = {
        "inputs": inputs_record(
            data_args.karpathy_json, data_args.image_root, index.kind, overrides, data_args.pseudo_queries
        ),
        "added_to": str(model.path),
        "counts": dataset_counts(corpus, index, pseudo_queries, added),
        "identifiers": index.report,
        "batch_rows": {s.name: {"new": s.batch_size, "replayed": s.replay_batch_size} for s in streams},
    }
    flags = "--pseudo-queries or --captioner"
    warn_images_without_queries(record["counts"], data_args.karpathy_json, "new images", flags)
    return TrainingData(
        streams,
        tokenizer_texts=[],
        index=index,
        eval_queries=list(chosen["query"]),
        eval_gold=list(chosen["image_key"]),
        sources=[*data_args.data, f"./{ADDED_IMAGES_DIR}"],
        codebooks=index.codebooks,
        token_texts=_token_texts(corpus, model.index, index, pseudo_queries),
        write_files=_writer(added, index, record),
    )


def add_images(
    model_args: ModelArguments,
    data_args: AddImagesArguments,
    args: GraceTrainingArguments,
    command: str = "grace-hf add-images",
) -> dict[str, Any]:
    """Add the images of `data_args.karpathy_json` to the model `model_args.model`: write the model directory
    `args.output_dir` (see the module docstring) and return its final metrics.

    Example:
        >>> from grace_hf.training.args import ADD_IMAGES_ARGUMENT_CLASSES, parse_args
        >>> metrics = add_images(*parse_args([
        ...     "--config", "recipes/synthetic/add_images.yaml", "--model", "runs/synthetic-structured",
        ...     "--karpathy-json", "data/new/dataset_synthetic.json", "--image-root", "data/new",
        ...     "--pseudo-queries", "data/new/pseudo_queries.json", "--output-dir", "runs/added",
        ... ], ADD_IMAGES_ARGUMENT_CLASSES))
    """
    configure_threads(args.torch_num_threads)
    with tempfile.TemporaryDirectory(prefix="grace-add-images-") as cache:
        data = added_training_data(model_args, data_args, args, cache)
        return train(model_args, data_args, args, command, data)
