"""Karpathy JSON + images (+ pseudo-queries) -> identifiers -> a `datasets.DatasetDict` on disk.

    grace-hf prepare --karpathy-json data/synthetic/dataset_synthetic.json --image-root data/synthetic \\
        --identifier structured --pixel-features --pseudo-queries data/synthetic/pseudo_queries.json \\
        --output-dir data/prepared/synthetic-structured

The output directory (`datasets.load_from_disk(O)`) has three splits:
- `i2id` (image, image_key, identifier): learning to memorize, one row per image and identifier;
  the image bytes are stored inside the dataset, so it does not need the source images any more;
- `t2id` (query, image_key, identifier): learning to retrieve: the human captions of train images and
  the pseudo-queries of val and test images (DESIGN.md §3);
- `queries` (query, image_key): the evaluation queries, the human captions of the test images;
plus `O/identifiers.json` (`IdentifierIndex`) and `O/prepare.json` (inputs and counts).
The directory is built in a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grace_hf.data.karpathy import KarpathyCorpus, KarpathyImage, load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IDENTIFIER_KINDS, IDENTIFIERS_FILE, IdentifierIndex, build_identifiers
from grace_hf.identifiers.structured import check_embedding_source
from grace_hf.io_utils import atomic_directory, atomic_write_json

if TYPE_CHECKING:
    from datasets import DatasetDict

__all__ = ["PREPARE_FILE", "SPLITS", "prepare", "push_prepared_to_hub", "load_prepared", "main"]

PREPARE_FILE = "prepare.json"
SPLITS = ("i2id", "t2id", "queries")


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _queries_of(image: KarpathyImage, pseudo_queries: dict[str, list[str]]) -> tuple[list[str], str]:
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
        queries, _ = _queries_of(image, pseudo_queries)
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


def _build_dataset_dict(
    corpus: KarpathyCorpus, index: IdentifierIndex, pseudo_queries: dict[str, list[str]], cache_dir: str
) -> DatasetDict:
    """The three splits; `cache_dir` holds the arrow cache that `from_generator` writes before saving."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    images = corpus.memorized()
    pairs = [(image.key, str(image.path), identifier) for image in images for identifier in index.images[image.key]]
    i2id = Dataset.from_generator(
        _i2id_examples,
        gen_kwargs={"pairs": pairs},
        features=Features({"image": Image(), "image_key": Value("string"), "identifier": Value("string")}),
        cache_dir=cache_dir,
    )
    text = Value("string")
    t2id = Dataset.from_dict(
        _t2id_rows(images, index, pseudo_queries),
        features=Features({"query": text, "image_key": text, "identifier": text}),
    )
    test = corpus.split("test")
    queries = Dataset.from_dict(
        {
            "query": [c for image in test for c in image.captions],
            "image_key": [i.key for i in test for _ in i.captions],
        },
        features=Features({"query": text, "image_key": text}),
    )
    return DatasetDict({"i2id": i2id, "t2id": t2id, "queries": queries})


def _prepare_record(
    corpus: KarpathyCorpus,
    index: IdentifierIndex,
    pseudo_queries: dict[str, list[str]],
    dataset: DatasetDict,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """prepare.json: the inputs, the counts, and what building the identifiers reported."""
    images = corpus.memorized()
    sources = {"human_caption": 0, "pseudo_query": 0}
    without_queries = []
    for image in images:
        queries, source = _queries_of(image, pseudo_queries)
        sources[source] += len(queries)
        if not queries:
            without_queries.append(image.key)
    learns_from_pseudo = {image.key for image in images if image.split != "train"}
    return {
        "inputs": inputs,
        "counts": {
            "images_per_split": corpus.split_counts(),
            "memorized_images": len(images),
            "restval_not_memorized": corpus.split_counts()["restval"],
            "collection_images": len(index.collection),
            "i2id_rows": dataset["i2id"].num_rows,
            "t2id_rows": dataset["t2id"].num_rows,
            "t2id_human_captions": sources["human_caption"],
            "t2id_pseudo_queries": sources["pseudo_query"],
            "pseudo_queries_ignored": sum(len(q) for k, q in pseudo_queries.items() if k not in learns_from_pseudo),
            "memorized_images_without_queries": len(without_queries),
            "eval_queries": dataset["queries"].num_rows,
            "new_tokens": len(index.new_tokens),
        },
        "identifiers": index.report,
    }


def prepare(
    karpathy_json: str | os.PathLike,
    image_root: str | os.PathLike,
    identifier: str,
    output_dir: str | os.PathLike,
    pseudo_queries: str | os.PathLike | None = None,
    num_workers: int | None = None,
    check_images: bool = True,
    **identifier_options: Any,
) -> Path:
    """Build the prepared dataset directory `output_dir` and return it (see the module docstring).

    `identifier_options` go to `build_identifiers` (structured: `clip_model`, `clip_pretrained`,
    `image_features`, `pixel_features`, `k`, `leaf_size`, `seed`). The same inputs give a
    byte-identical `identifiers.json` and identical dataset rows.
    """
    if identifier not in IDENTIFIER_KINDS:
        raise GraceInputError(
            f"unknown identifier kind {identifier!r} (expected one of {', '.join(IDENTIFIER_KINDS)})"
        )
    if identifier == "structured":
        check_embedding_source(
            identifier_options.get("clip_model"),
            identifier_options.get("image_features"),
            identifier_options.get("pixel_features", False),
        )
    corpus = load_karpathy(karpathy_json, image_root, check_images=check_images, num_workers=num_workers)
    queries = load_pseudo_queries(pseudo_queries, corpus) if pseudo_queries is not None else {}
    if identifier == "semantic":
        identifier_options["pseudo_queries"] = queries
    elif identifier == "structured":
        identifier_options.setdefault("num_workers", num_workers)
    index = build_identifiers(identifier, corpus, **identifier_options)

    options = {k: v for k, v in identifier_options.items() if k not in ("pseudo_queries", "num_workers")}
    inputs = {
        "karpathy_json": str(karpathy_json),
        "karpathy_json_sha256": _sha256(karpathy_json),
        "image_root": str(image_root),
        "identifier": identifier,
        "identifier_options": {k: str(v) if isinstance(v, os.PathLike) else v for k, v in options.items()},
        "pseudo_queries": None if pseudo_queries is None else str(pseudo_queries),
        "pseudo_queries_sha256": None if pseudo_queries is None else _sha256(pseudo_queries),
    }
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as tmp, tempfile.TemporaryDirectory(prefix="grace-prepare-cache-") as cache:
        dataset = _build_dataset_dict(corpus, index, queries, cache)
        dataset.save_to_disk(str(tmp))
        index.save(tmp / IDENTIFIERS_FILE)
        record = _prepare_record(corpus, index, queries, dataset, inputs)
        atomic_write_json(tmp / PREPARE_FILE, record)
    missing = record["counts"]["memorized_images_without_queries"]
    if missing:
        print(
            f"warning: {missing} memorized images have no query (val/test images need --pseudo-queries); "
            "they are memorized (i2id) but never learned from a query",
            file=sys.stderr,
        )
    return output_dir


def push_prepared_to_hub(output_dir: str | os.PathLike, repo_id: str, private: bool | None = None) -> None:
    """Push a prepared directory to a Hub dataset repo, plus `identifiers.json` and `prepare.json`.

    The three splits have different columns, which one Hub config cannot hold, so each is its own
    config with one split of the same name; `load_prepared(repo_id)` puts them back together.
    """
    from datasets import load_from_disk
    from huggingface_hub import CommitOperationAdd, HfApi

    output_dir = Path(output_dir)
    for name, split in load_from_disk(str(output_dir)).items():
        split.push_to_hub(repo_id, config_name=name, split=name, private=private, set_default=name == "i2id")
    HfApi().create_commit(
        repo_id,
        operations=[
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(output_dir / name))
            for name in (IDENTIFIERS_FILE, PREPARE_FILE)
        ],
        commit_message="Add identifiers.json and prepare.json",
        repo_type="dataset",
    )


def load_prepared(source: str | os.PathLike, cache_dir: str | None = None) -> DatasetDict:
    """The prepared `DatasetDict` (i2id, t2id, queries) from a `prepare` directory or a pushed Hub repo."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if (Path(source) / "dataset_dict.json").is_file():
        return load_from_disk(str(source))
    return DatasetDict({name: load_dataset(str(source), name, split=name, cache_dir=cache_dir) for name in SPLITS})


def main(argv: list[str] | None = None) -> int:
    """`grace-hf prepare --karpathy-json J --image-root R --identifier KIND --output-dir O [...]`."""
    parser = argparse.ArgumentParser(prog="grace-hf prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--karpathy-json", required=True, help="dataset_flickr30k.json, dataset_coco.json, ...")
    parser.add_argument("--image-root", required=True, help="directory the image keys (filepath/filename) are under")
    parser.add_argument("--identifier", required=True, help=f"identifier kind: {', '.join(IDENTIFIER_KINDS)}")
    parser.add_argument("--output-dir", required=True, help="prepared dataset directory (replaced if it exists)")
    parser.add_argument("--pseudo-queries", default=None, help="JSON {image file name: [query, ...]}")
    parser.add_argument("--num-workers", type=int, default=None, help="threads checking and reading images")
    parser.add_argument("--skip-image-check", action="store_true", help="do not decode every image first")
    parser.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="also push the result to this dataset repo"
    )
    structured = parser.add_argument_group("structured identifiers (one embedding source)")
    structured.add_argument("--clip-model", default=None, help="open_clip model name, config JSON or local-dir:DIR")
    structured.add_argument("--clip-pretrained", default=None, help="local open_clip weights file")
    structured.add_argument("--image-features", default=None, help="safetensors: `features` (N, d) + `image_keys`")
    structured.add_argument("--pixel-features", action="store_true", help="16x16 thumbnails (no model; demo data)")
    structured.add_argument("--k", type=int, default=30, help="clusters per level")
    structured.add_argument("--leaf-size", type=int, default=30, help="largest cluster that is not split again")
    structured.add_argument("--seed", type=int, default=0, help="k-means seed")
    structured.add_argument("--kmeans-n-init", type=int, default=1, help="k-means restarts per split")
    structured.add_argument("--batch-size", type=int, default=64, help="CLIP batch size")
    structured.add_argument("--device", default="cpu", help="CLIP device")
    args = parser.parse_args(argv)

    options: dict[str, Any] = {}
    if args.identifier == "structured":
        options = {
            "clip_model": args.clip_model,
            "clip_pretrained": args.clip_pretrained,
            "image_features": args.image_features,
            "pixel_features": args.pixel_features,
            "k": args.k,
            "leaf_size": args.leaf_size,
            "seed": args.seed,
            "n_init": args.kmeans_n_init,
            "batch_size": args.batch_size,
            "device": args.device,
        }
    elif any([args.clip_model, args.clip_pretrained, args.image_features, args.pixel_features]):
        raise GraceInputError("--clip-model, --clip-pretrained, --image-features, --pixel-features: structured only")
    out = prepare(
        args.karpathy_json,
        args.image_root,
        args.identifier,
        args.output_dir,
        pseudo_queries=args.pseudo_queries,
        num_workers=args.num_workers,
        check_images=not args.skip_image_check,
        **options,
    )
    with open(out / PREPARE_FILE, encoding="utf-8") as f:
        counts = json.load(f)["counts"]
    print(
        f"wrote {out}: i2id {counts['i2id_rows']}, t2id {counts['t2id_rows']}, queries {counts['eval_queries']}, "
        f"collection {counts['collection_images']}"
    )
    if args.push_to_hub:
        push_prepared_to_hub(out, args.push_to_hub)
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0
