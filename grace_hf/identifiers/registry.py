"""One entry point for every identifier kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grace_hf.data.karpathy import KarpathyCorpus
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import atomic, numeric, semantic, string, structured
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["IDENTIFIER_KINDS", "build_identifiers"]

_BUILDERS: dict[str, Callable[..., IdentifierIndex]] = {
    "numeric": numeric.build,
    "string": string.build,
    "semantic": semantic.build,
    "structured": structured.build,
    "atomic": atomic.build,
}
IDENTIFIER_KINDS = tuple(_BUILDERS)


def build_identifiers(kind: str, corpus: KarpathyCorpus, **options: Any) -> IdentifierIndex:
    """Identifiers of kind `kind` for the memorized images of `corpus` (train, val, test; not restval).

    `options` go to the kind's builder: semantic takes `pseudo_queries` ({image_key: [query]});
    structured takes `clip_model`/`clip_pretrained`, `image_features` or `pixel_features`, and `k`,
    `leaf_size`, `seed`. The collection (what retrieval ranks by default) is the test split.
    """
    if kind not in _BUILDERS:
        raise GraceInputError(f"unknown identifier kind {kind!r} (expected one of {', '.join(IDENTIFIER_KINDS)})")
    images = corpus.memorized()
    if not images:
        raise GraceInputError(f"{corpus.json_path}: no train, val or test images to memorize")
    index = _BUILDERS[kind](images, **options)
    index.collection = [image.key for image in images if image.split == "test"]
    index.validate(f"{kind} identifiers for {corpus.json_path}")
    return index
