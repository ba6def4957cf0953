"""The evaluation queries of a prepared dataset with their gold images and the candidates they rank (below the
retriever: re-ranking fits its weight on the val ones)."""

from __future__ import annotations

import os

from grace_hf.data.prepared import EVAL_SPLITS, caption_queries, load_prepared, prepared_file, val_candidates
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IDENTIFIERS_FILE, IdentifierIndex

__all__ = ["load_eval_queries"]


def load_eval_queries(
    data: str | os.PathLike, limit: int | None = None, split: str = "test"
) -> tuple[list[str], list[str], list[str]]:
    """`(queries, gold image keys, candidate image keys)` of a prepared dataset (a `prepare` directory or a Hub
    dataset repo); every gold image must be a candidate.

    `split` "test": the test captions ranking the collection (the test images); "val": the val captions ranking the
    val images (for choosing settings, e.g. the re-ranking weight, without reading a test query).
    """
    rows = caption_queries(load_prepared(data), data, split)
    name = EVAL_SPLITS[split]
    if split == "val":  # the images the val captions describe (every val image has captions)
        candidates = val_candidates(rows)
    if limit is not None:
        rows = rows.select(range(min(limit, rows.num_rows)))
    queries, gold = list(rows["query"]), list(rows["image_key"])
    if not queries:
        raise GraceInputError(f"{data}: the {name!r} split is empty")
    if split == "val":
        return queries, gold, candidates
    identifiers_path = prepared_file(data, IDENTIFIERS_FILE)
    candidates = IdentifierIndex.load(identifiers_path).collection
    if not candidates:
        raise GraceInputError(f"{identifiers_path}: empty collection (no test images to rank)")
    candidate_set = set(candidates)
    for position, (query, key) in enumerate(zip(queries, gold)):
        if key not in candidate_set:
            raise GraceInputError(f"{data}: {name}[{position}] ({query!r}): gold image {key!r} is not a candidate")
    return queries, gold, candidates
