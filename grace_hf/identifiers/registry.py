"""The identifier kinds, by name: the one place that lists them and checks a kind's name and options."""

from __future__ import annotations

from typing import Any

from grace_hf.data.karpathy import KarpathyCorpus
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import atomic, numeric, semantic, string, structured
from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["IDENTIFIER_KINDS", "build_identifiers", "get_identifier_kind"]

_KINDS: dict[str, IdentifierKind] = {
    kind.name: kind for kind in (numeric.KIND, string.KIND, semantic.KIND, structured.KIND, atomic.KIND)
}
IDENTIFIER_KINDS = tuple(_KINDS)


def get_identifier_kind(name: str) -> IdentifierKind:
    """The kind called `name`; an unknown name is a `GraceInputError` that lists the kinds."""
    if name not in _KINDS:
        raise GraceInputError(f"unknown identifier kind {name!r} (expected one of {', '.join(IDENTIFIER_KINDS)})")
    return _KINDS[name]


def build_identifiers(
    kind: str,
    corpus: KarpathyCorpus,
    pseudo_queries: dict[str, list[str]] | None = None,
    num_workers: int | None = None,
    **options: Any,
) -> IdentifierIndex:
    """Identifiers of kind `kind` for the memorized images of `corpus` (train, val, test; not restval).

    `options` are the kind's own (e.g. structured: `pixel_features=True`, `k`, `leaf_size`); one it does not take is
    an error. The collection (what retrieval ranks by default) is the test split.

    Example:
        >>> index = build_identifiers("structured", corpus, pixel_features=True, k=10, leaf_size=10)
    """
    spec = get_identifier_kind(kind)
    checked = spec.make_options(options)
    images = corpus.memorized()
    if not images:
        raise GraceInputError(f"{corpus.json_path}: no train, val or test images to memorize")
    index = spec.build(IdentifierInputs(images, pseudo_queries or {}, num_workers), checked)
    index.collection = [image.key for image in images if image.split == "test"]
    index.validate(f"{kind} identifiers for {corpus.json_path}")
    return index
