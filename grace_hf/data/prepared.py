"""The prepared dataset that `grace-hf prepare` writes: its splits, its writer and its one reader (a local directory
or a Hub dataset repo), and the evaluation queries.

A prepared directory is a `datasets.DatasetDict` saved with `save_to_disk`, with the splits
- `i2id` (image, image_key, identifier): learning to memorize, one row per image and identifier, image bytes inside;
- `t2id` (query, image_key, identifier): learning to retrieve (train captions, val/test pseudo-queries);
- `queries` (query, image_key): the evaluation queries, the human captions of the test images;
- `val_queries` (query, image_key): the human captions of the val images, for choosing settings without reading a
  test query (the val images are memorized like the test images, from their pseudo-queries, and the val captions
  rank the val images); datasets prepared before this split existed lack it;
plus side files beside the splits: `identifiers.json` (the identifier index), `prepare.json` (inputs, counts) and,
for a kind that keeps them, `identifier_codebooks.safetensors` (structured: the k-means tree).
On the Hub each split is its own config (their columns differ) and the side files sit at the repo's top.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from datasets import Dataset, DatasetDict, Features, Image, Value, load_dataset, load_from_disk
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

from grace_hf.data.karpathy import KarpathyCorpus, KarpathyImage, teaching_texts
from grace_hf.data.pseudo_queries import pseudo_queries_file
from grace_hf.errors import GraceInputError
from grace_hf.io_utils import sha256_file
from grace_hf.outputs import portable_path

__all__ = [
    "EVAL_SPLITS",
    "PREPARE_FILE",
    "SPLITS",
    "TEST_QUERIES",
    "VAL_QUERIES",
    "build_dataset_dict",
    "caption_queries",
    "dataset_counts",
    "inputs_record",
    "load_prepared",
    "optional_prepared_file",
    "prepared_file",
    "push_prepared_to_hub",
    "val_candidates",
    "warn_images_without_queries",
]

PREPARE_FILE = "prepare.json"
TEST_QUERIES = "queries"
SPLITS = ("i2id", "t2id", TEST_QUERIES)  # every prepared dataset has these
VAL_QUERIES = "val_queries"  # written by `prepare` since the val captions were kept; optional when reading
EVAL_SPLITS = {"test": TEST_QUERIES, "val": VAL_QUERIES}  # evaluation split name -> the split of its captions
TEXT = Value("string")


class ImageIdentifiers(Protocol):
    """What the writer reads of an identifier index (`grace_hf.identifiers.IdentifierIndex`)."""

    images: dict[str, list[str]]  # image key -> its identifiers
    collection: list[str]  # the images the evaluation queries rank
    new_tokens: list[str]  # tokens the kind adds to the tokenizer


def _t2id_rows(images: list[KarpathyImage], index: ImageIdentifiers, pseudo_queries: dict[str, list[str]]) -> dict:
    """One row per query; with several identifiers, query j gets identifier (j + 1) mod n, so a semantic
    identifier is rarely the query itself and the model learns to name the image, not to copy."""
    rows: dict[str, list[str]] = {"query": [], "image_key": [], "identifier": []}
    for image in images:
        identifiers = index.images[image.key]
        queries, _ = teaching_texts(image, pseudo_queries)
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
    corpus: KarpathyCorpus, index: ImageIdentifiers, pseudo_queries: dict[str, list[str]], cache_dir: str
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
        {"i2id": i2id, "t2id": t2id, TEST_QUERIES: _captions("test", corpus), VAL_QUERIES: _captions("val", corpus)}
    )


def _captions(split: str, corpus: KarpathyCorpus) -> Dataset:
    """(query, image_key): the human captions of the images of `split`, the queries that rank them."""
    pairs = corpus.caption_queries(split)
    return Dataset.from_dict(
        {"query": [query for query, _ in pairs], "image_key": [key for _, key in pairs]},
        features=Features({"query": TEXT, "image_key": TEXT}),
    )


def dataset_counts(
    corpus: KarpathyCorpus, index: ImageIdentifiers, pseudo_queries: dict[str, list[str]], dataset: DatasetDict
) -> dict[str, Any]:
    """The numbers prepare.json reports."""
    images = corpus.memorized()
    sources = {"human_caption": 0, "pseudo_query": 0}
    without_queries = 0
    for image in images:
        queries, source = teaching_texts(image, pseudo_queries)
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
        "eval_queries": dataset[TEST_QUERIES].num_rows,
        "val_queries": dataset[VAL_QUERIES].num_rows,
        "new_tokens": len(index.new_tokens),
    }


def warn_images_without_queries(counts: dict[str, int], source: str | os.PathLike, images: str, flags: str) -> None:
    """Say on stderr how many memorized `images` of `source` no query teaches (val/test images need `flags` to get
    pseudo-queries): they are memorized (i2id) but never learned from a query."""
    if counts["memorized_images_without_queries"]:
        print(
            f"warning: {os.fspath(source)}: {counts['memorized_images_without_queries']} {images} have no query "
            f"(val/test images need {flags}); they are memorized (i2id) but never learned from a query",
            file=sys.stderr,
        )


def inputs_record(
    karpathy_json: str | os.PathLike,
    image_root: str | os.PathLike,
    kind: str,
    options: dict[str, Any],
    pseudo_queries: str | os.PathLike | None,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What the dataset was made from (paths, checksums, options), for prepare.json; with `output_dir` (where it is
    written), inputs in the same build directory are named from there (`portable_path`)."""

    def name(path: Any) -> Any:
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        return portable_path(path, output_dir) if output_dir is not None and isinstance(path, str) and path else path

    return {
        "karpathy_json": name(karpathy_json),
        "karpathy_json_sha256": sha256_file(karpathy_json),
        "image_root": name(image_root),
        "identifier_kind": kind,
        "identifier_options": {key: name(value) for key, value in options.items()},
        "pseudo_queries": None if pseudo_queries is None else name(pseudo_queries_file(pseudo_queries)),
        "pseudo_queries_sha256": None if pseudo_queries is None else sha256_file(pseudo_queries_file(pseudo_queries)),
    }


def _is_local(source: str | os.PathLike) -> bool:
    return (Path(source) / "dataset_dict.json").is_file()


def save_prepared(dataset: DatasetDict, directory: str | os.PathLike) -> None:
    """`dataset.save_to_disk(directory)`, an empty split written as one empty shard: `datasets` writes none for it
    by default, and then cannot load the directory back (e.g. a collection without test images has no queries)."""
    dataset.save_to_disk(
        os.fspath(directory), num_shards={name: 1 for name, split in dataset.items() if not len(split)}
    )


def load_prepared(source: str | os.PathLike, cache_dir: str | None = None) -> DatasetDict:
    """The prepared `DatasetDict` (i2id, t2id, queries, and val_queries where it was written) of a `prepare` directory, or of a pushed Hub dataset repo
    (its id, or a local copy of it); `cache_dir` is where `load_dataset` caches a Hub repo."""
    try:
        if _is_local(source):
            dataset = load_from_disk(os.fspath(source))
        else:
            dataset = DatasetDict(
                {name: load_dataset(str(source), name, split=name, cache_dir=cache_dir) for name in SPLITS}
            )
            try:
                dataset[VAL_QUERIES] = load_dataset(str(source), VAL_QUERIES, split=VAL_QUERIES, cache_dir=cache_dir)
            except ValueError:  # pushed before the split existed: no such config
                pass
    except (OSError, ValueError) as err:
        raise GraceInputError(f"{source}: not a prepared dataset directory or Hub dataset ({err})") from None
    missing = [name for name in SPLITS if name not in dataset]
    if missing:
        raise GraceInputError(f"{source}: the prepared dataset lacks the split(s) {missing}")
    return dataset


def caption_queries(dataset: DatasetDict, source: str | os.PathLike, split: str = "test") -> Dataset:
    """The (query, image_key) rows of an evaluation split: "test" (the test captions) or "val" (the val captions;
    a dataset prepared before the split existed is refused with a message naming it)."""
    if split not in EVAL_SPLITS:
        raise GraceInputError(f"evaluation split must be one of {list(EVAL_SPLITS)}, got {split!r}")
    name = EVAL_SPLITS[split]
    if name not in dataset:
        raise GraceInputError(
            f"{source}: the prepared dataset has no {name!r} split (the val captions): it was prepared before "
            "`grace-hf prepare` kept them; prepare it again"
        )
    return dataset[name]


def val_candidates(rows: Dataset) -> list[str]:
    """The images the val captions `rows` rank: the images they describe (every val image has captions), in order."""
    return list(dict.fromkeys(rows["image_key"]))


def prepared_file(source: str | os.PathLike, name: str) -> Path:
    """The local path of the side file `name` (e.g. `identifiers.json`) of a prepared directory or Hub repo."""
    if Path(source).is_dir():
        return Path(source) / name
    try:
        return Path(hf_hub_download(str(source), name, repo_type="dataset"))
    except (OSError, ValueError) as err:
        raise GraceInputError(
            f"{source}: no {name} (not a prepared dataset directory or Hub dataset: {err})"
        ) from None


def optional_prepared_file(source: str | os.PathLike, name: str) -> Path | None:
    """The local path of the side file `name` of a prepared directory or Hub repo, or None when it has none."""
    try:
        path = prepared_file(source, name)
    except GraceInputError:
        return None
    return path if path.is_file() else None


def push_prepared_to_hub(
    directory: str | os.PathLike, repo_id: str, side_files: list[str], private: bool | None = None
):
    """Push a prepared directory to the Hub dataset repo `repo_id`: each split as a config of its own (one split of
    the same name), then the side files; `load_prepared(repo_id)` puts them back together."""
    directory = Path(directory)
    for name, split in load_from_disk(os.fspath(directory)).items():
        split.push_to_hub(repo_id, config_name=name, split=name, private=private, set_default=name == "i2id")
    HfApi().create_commit(
        repo_id,
        operations=[
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name)) for name in side_files
        ],
        commit_message=f"Add {', '.join(side_files)}",
        repo_type="dataset",
    )
