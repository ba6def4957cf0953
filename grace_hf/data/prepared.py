"""The prepared dataset that `grace-hf prepare` writes: its splits and its one reader (a local directory or a Hub
dataset repo).

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
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

from grace_hf.errors import GraceInputError

__all__ = [
    "EVAL_SPLITS",
    "PREPARE_FILE",
    "SPLITS",
    "VAL_QUERIES",
    "caption_queries",
    "load_prepared",
    "optional_prepared_file",
    "prepared_file",
    "push_prepared_to_hub",
]

PREPARE_FILE = "prepare.json"
SPLITS = ("i2id", "t2id", "queries")  # every prepared dataset has these
VAL_QUERIES = "val_queries"  # written by `prepare` since the val captions were kept; optional when reading
EVAL_SPLITS = {"test": "queries", "val": VAL_QUERIES}  # evaluation split name -> the split of its captions


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
