"""The `prepare` job: Karpathy JSON + images (+ pseudo-queries) -> identifiers -> a prepared dataset directory.

The directory's format is described in `grace_hf.data.prepared`. Train images learn query -> identifier from their
human captions, val and test images from their pseudo-queries (their human captions are held out: the test images' are the evaluation
queries, the val images' the validation queries).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.prepared import PREPARE_FILE, build_dataset_dict, dataset_counts, inputs_record, save_prepared
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.identifiers import (
    CODEBOOKS_FILE,
    IDENTIFIERS_FILE,
    build_identifiers,
    get_identifier_kind,
)
from grace_hf.io_utils import atomic_write_json
from grace_hf.outputs import PREPARED_DATASET, check_output_dir, output_directory

__all__ = ["options_paths", "prepare"]


def options_paths(options: Any) -> list[str]:
    """The files an identifier kind's options read (features files, CLIP weights): inputs to keep safe."""
    return [value for name, value in vars(options).items() if name in ("image_features", "clip_pretrained") and value]


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
    record_inputs = inputs_record(
        karpathy_json, image_root, identifier_kind, identifier_options, pseudo_queries, output_dir
    )
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
