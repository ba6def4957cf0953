"""Pseudo-queries in the original project's file format: `{image_file_name: [query, ...]}`.

The original fine-tuned a captioner on train image -> caption pairs and wrote five queries per
test image; test images learn query -> identifier only from these, their human captions being the
evaluation queries. A directory stands for its `pseudo_queries.json`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from grace_hf.data.karpathy import KarpathyCorpus
from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_json, read_json

__all__ = ["PSEUDO_QUERIES_FILE", "load_pseudo_queries", "pseudo_queries_file", "write_pseudo_queries"]

PSEUDO_QUERIES_FILE = "pseudo_queries.json"


def pseudo_queries_file(path: str | os.PathLike) -> str:
    """The pseudo-query file `path` names: a directory (what `grace-hf pseudo-queries` writes) stands for its
    `pseudo_queries.json`."""
    return os.path.join(path, PSEUDO_QUERIES_FILE) if os.path.isdir(path) else os.fspath(path)


def load_pseudo_queries(path: str | os.PathLike, corpus: KarpathyCorpus) -> dict[str, list[str]]:
    """Read a pseudo-query file and return `{image_key: [query, ...]}` in the corpus's file order.

    A name in the file is an image's file name (as in the original) or its full image key.
    Unknown or ambiguous names, non-string or empty queries are a `GraceInputError`.
    """
    path = pseudo_queries_file(path)
    data = read_json(path, "pseudo-query file")
    if not isinstance(data, dict):
        raise GraceInputError(f"{path}: expected an object mapping image file names to lists of queries")

    by_name: dict[str, list[str]] = {}
    for image in corpus.images:
        by_name.setdefault(image.filename, []).append(image.key)
    keys = {image.key for image in corpus.images}
    found: dict[str, list[str]] = {}
    for name, queries in data.items():
        if name in keys:
            key = name
        elif len(by_name.get(name, ())) == 1:
            key = by_name[name][0]
        elif name in by_name:
            raise GraceInputError(f"{path}: {name!r} is ambiguous: images {by_name[name]}; use the image key")
        else:
            raise GraceInputError(f"{path}: pseudo-queries for unknown image {name!r} (not in {corpus.json_path})")
        if key in found:
            raise GraceInputError(f"{path}: image {key!r} is listed twice")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise GraceInputError(f"{path}: {name!r}: expected a list of strings")
        for i, query in enumerate(queries):
            if not query.strip():
                raise GraceInputError(f"{path}: {name!r}: empty query at position {i}")
        found[key] = [q.strip() for q in queries]
    return {image.key: found[image.key] for image in corpus.images if image.key in found}


def write_pseudo_queries(path: str | os.PathLike, mapping: Mapping[str, list[str]]) -> None:
    """Write `{image_file_name: [query, ...]}` atomically, in the original format."""
    atomic_write_json(path, {name: list(queries) for name, queries in mapping.items()})
