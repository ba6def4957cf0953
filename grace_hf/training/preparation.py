"""The `prepare` job: Karpathy JSON + images (+ pseudo-queries) -> identifiers -> a prepared dataset directory.

The directory's format is described in `grace_hf.data.prepared`. Train images learn query -> identifier from their
human captions, val and test images from their pseudo-queries (their human captions are held out: the test images' are the evaluation
queries, the val images' the validation queries).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

from datasets import Dataset, DatasetDict, Features, Image, Value

from grace_hf.data.karpathy import KarpathyCorpus, KarpathyImage, load_karpathy
from grace_hf.data.prepared import PREPARE_FILE, VAL_QUERIES, save_prepared
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.identifiers import (
    CODEBOOKS_FILE,
    IDENTIFIERS_FILE,
    IdentifierIndex,
    build_identifiers,
    get_identifier_kind,
)
from grace_hf.io_utils import atomic_write_json, sha256_file
from grace_hf.outputs import PREPARED_DATASET, check_output_dir, output_directory

__all__ = [
    "build_dataset_dict",
    "dataset_counts",
    "inputs_record",
    "options_paths",
    "prepare",
    "training_queries",
]

TEXT = Value("string")


def options_paths(options: Any) -> list[str]:
    """The files an identifier kind's options read (features files, CLIP weights): inputs to keep safe."""
    return [value for name, value in vars(options).items() if name in ("image_features", "clip_pretrained") and value]


def training_queries(image: KarpathyImage, pseudo_queries: dict[str, list[str]]) -> tuple[list[str], str]:
    """What teaches query -> identifier for a memorized image: train captions, else its pseudo-queries."""
    if image.split == "train":
        return image.captions, "human_caption"
    return pseudo_queries.get(image.key, []), "pseudo_query"


def _t2id_rows(images: list[KarpathyImage], index: IdentifierIndex, pseudo_queries: dict[str, list[str]]) -> dict:
    """One row per query; with several identifiers, query j gets identifier (j + 1) mod n, so a semantic
    identifier is rarely the query itself and the model learns to name the image, not to copy."""
    rows: dict[str, list[str]] = {"query": [], "image_key": [], "identifier": []}
    for image in images:
        identifiers = index.images[image.key]
        queries, _ = training_queries(image, pseudo_queries)
        for j, query in enumerate(queries):
            rows["query"].append(query)
            rows["image_key"].append(image.key)
            rows["identifier"].append(identifiers[(j + 1) % len(identifiers)])
    return rows


def _i2id_examples(pairs: list[tuple[str, str, str]]) -> Iterator[dict[str, Any]]:
    """(image_key, path, identifier) -> rows whose image bytes are read now, so the dataset is self-contained."""
    for key, path, identifier in pairs:
        with open(path, "rb") as f:
            yield {"image": {"bytes": f.read(), "path": key}, "image_key": key, "identifier": identifier}


def build_dataset_dict(
    corpus: KarpathyCorpus, index: IdentifierIndex, pseudo_queries: dict[str, list[str]], cache_dir: str
) -> DatasetDict:
    """The splits of the prepared dataset; `cache_dir` holds the arrow cache `from_generator` writes first."""
    images = corpus.memorized()
    pairs = [(image.key, str(image.path), identifier) for image in images for identifier in index.images[image.key]]
    i2id = Dataset.from_generator(
        _i2id_examples,
        gen_kwargs={"pairs": pairs},
        features=Features({"image": Image(), "image_key": TEXT, "identifier": TEXT}),
        cache_dir=cache_dir,
    )
    t2id = Dataset.from_dict(
        _t2id_rows(images, index, pseudo_queries),
        features=Features({"query": TEXT, "image_key": TEXT, "identifier": TEXT}),
    )
    return DatasetDict(
        {"i2id": i2id, "t2id": t2id, "queries": _captions("test", corpus), VAL_QUERIES: _captions("val", corpus)}
    )


def _captions(split: str, corpus: KarpathyCorpus) -> Dataset:
    """(query, image_key): the human captions of the images of `split`, the queries that rank them."""
    images = corpus.split(split)
    return Dataset.from_dict(
        {
            "query": [caption for image in images for caption in image.captions],
            "image_key": [image.key for image in images for _ in image.captions],
        },
        features=Features({"query": TEXT, "image_key": TEXT}),
    )


def dataset_counts(
    corpus: KarpathyCorpus, index: IdentifierIndex, pseudo_queries: dict[str, list[str]], dataset: DatasetDict
) -> dict[str, Any]:
    """The numbers prepare.json reports."""
    images = corpus.memorized()
    sources = {"human_caption": 0, "pseudo_query": 0}
    without_queries = 0
    for image in images:
        queries, source = training_queries(image, pseudo_queries)
        sources[source] += len(queries)
        without_queries += not queries
    learns_from_pseudo = {image.key for image in images if image.split != "train"}
    return {
        "images_per_split": corpus.split_counts(),
        "memorized_images": len(images),
        "restval_not_memorized": corpus.split_counts()["restval"],
        "collection_images": len(index.collection),
        "i2id_rows": dataset["i2id"].num_rows,
        "t2id_rows": dataset["t2id"].num_rows,
        "t2id_human_captions": sources["human_caption"],
        "t2id_pseudo_queries": sources["pseudo_query"],
        "pseudo_queries_ignored": sum(len(q) for k, q in pseudo_queries.items() if k not in learns_from_pseudo),
        "memorized_images_without_queries": without_queries,
        "eval_queries": dataset["queries"].num_rows,
        "val_queries": dataset[VAL_QUERIES].num_rows,
        "new_tokens": len(index.new_tokens),
    }


def inputs_record(
    karpathy_json: str | os.PathLike,
    image_root: str | os.PathLike,
    kind: str,
    options: dict[str, Any],
    pseudo_queries: str | os.PathLike | None,
) -> dict[str, Any]:
    """What the dataset was made from (paths, checksums, options), for prepare.json."""
    return {
        "karpathy_json": str(karpathy_json),
        "karpathy_json_sha256": sha256_file(karpathy_json),
        "image_root": str(image_root),
        "identifier_kind": kind,
        "identifier_options": {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()},
        "pseudo_queries": None if pseudo_queries is None else str(pseudo_queries),
        "pseudo_queries_sha256": None if pseudo_queries is None else sha256_file(pseudo_queries),
    }


def prepare(
    karpathy_json: str | os.PathLike,
    image_root: str | os.PathLike,
    identifier_kind: str,
    output_dir: str | os.PathLike,
    pseudo_queries: str | os.PathLike | None = None,
    num_workers: int | None = None,
    check_images: bool = True,
    overwrite: bool = False,
    **identifier_options: Any,
) -> dict[str, Any]:
    """Build the prepared dataset directory `output_dir`; return what prepare.json records.

    Beside the splits: `identifiers.json`, `prepare.json`, and for a kind that keeps codebooks (structured: the
    k-means tree) `identifier_codebooks.safetensors`, which training copies into the model directory.

    `identifier_options` are the kind's own (structured: `pixel_features`, `image_features`, `clip_model`,
    `clip_pretrained`, `k`, `leaf_size`, ...), checked before any image is read. The same inputs give a
    byte-identical `identifiers.json` and identical dataset rows.

    Example:
        >>> prepare("data/synthetic/dataset_synthetic.json", "data/synthetic", "structured", "data/prepared",
        ...         pseudo_queries="data/synthetic/pseudo_queries.json", pixel_features=True)
    """
    options = get_identifier_kind(identifier_kind).make_options(identifier_options)  # fail before reading any image
    inputs = [karpathy_json, image_root, pseudo_queries, *options_paths(options)]
    check_output_dir(output_dir, PREPARED_DATASET, inputs, overwrite)
    corpus = load_karpathy(karpathy_json, image_root, check_images=check_images, num_workers=num_workers)
    queries = load_pseudo_queries(pseudo_queries, corpus) if pseudo_queries is not None else {}
    index = build_identifiers(identifier_kind, corpus, queries, num_workers, **identifier_options)
    record_inputs = inputs_record(karpathy_json, image_root, identifier_kind, identifier_options, pseudo_queries)
    with (
        output_directory(output_dir, PREPARED_DATASET, inputs, overwrite, "grace-hf prepare") as tmp,
        tempfile.TemporaryDirectory(prefix="grace-prepare-") as cache,
    ):
        dataset = build_dataset_dict(corpus, index, queries, cache)
        save_prepared(dataset, tmp)
        index.save(tmp / IDENTIFIERS_FILE)
        if index.codebooks is not None:
            index.codebooks.save(tmp / CODEBOOKS_FILE)
        record = {
            "inputs": record_inputs,
            "counts": dataset_counts(corpus, index, queries, dataset),
            "identifiers": index.report,
        }
        atomic_write_json(tmp / PREPARE_FILE, record)
    return record
