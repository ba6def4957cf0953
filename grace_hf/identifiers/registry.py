"""The identifier kinds, by name: the one place that lists them and checks a kind's name and options."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image

from grace_hf.data.karpathy import MEMORIZED_SPLITS, KarpathyCorpus, verify_images
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import atomic, numeric, rq, semantic, string, structured
from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind
from grace_hf.identifiers.codebooks import CODEBOOKS_FILE, Codebooks
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["CONTENT_KINDS", "IDENTIFIER_KINDS", "build_identifiers", "extend_identifiers", "get_identifier_kind"]

_KINDS: dict[str, IdentifierKind] = {
    kind.name: kind for kind in (numeric.KIND, string.KIND, semantic.KIND, structured.KIND, atomic.KIND, rq.KIND)
}
IDENTIFIER_KINDS = tuple(_KINDS)
# the kinds whose identifiers follow the images' embeddings: similar images share a prefix
CONTENT_KINDS = ("rq", "structured")


def get_identifier_kind(name: str) -> IdentifierKind:
    """The kind called `name`; an unknown name is a `GraceInputError` that lists the kinds."""
    if name not in _KINDS:
        raise GraceInputError(f"unknown identifier kind {name!r} (expected one of {', '.join(IDENTIFIER_KINDS)})")
    return _KINDS[name]


@contextmanager
def _naming_unreadable_images(corpus: KarpathyCorpus, num_workers: int | None) -> Iterator[None]:
    """While a kind embeds the memorized images: an image file that does not read (unchecked, as with `prepare
    --skip-image-check`) is the `GraceInputError` of `verify_images`, naming the JSON file, the item and the file."""
    try:
        yield
    except GraceInputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        verify_images(corpus, num_workers, MEMORIZED_SPLITS)
        raise


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
    with _naming_unreadable_images(corpus, num_workers):
        index = spec.build(IdentifierInputs(images, pseudo_queries or {}, num_workers), checked)
    index.collection = [image.key for image in images if image.split == "test"]
    index.validate(f"{kind} identifiers for {corpus.json_path}")
    return index


def extend_identifiers(
    index: IdentifierIndex,
    corpus: KarpathyCorpus,
    pseudo_queries: dict[str, list[str]] | None = None,
    codebooks: Codebooks | None = None,
    num_workers: int | None = None,
    source: str = "identifiers",
    **options: Any,
) -> IdentifierIndex:
    """`index` plus identifiers of the memorized images of `corpus` (new images), coded the way `index`'s kind codes
    them, no existing identifier changed; the new test images join the collection.

    `codebooks`: what the kind saved when it built `index` (structured: the k-means tree); their recorded options
    are used, with `options` (e.g. `image_features`) overriding them. `source` names the index in messages. An
    image already in `index`, a kind that cannot code new images or lacks its codebooks, and an identifier that
    would name two images are `GraceInputError`s.

    Example:
        >>> new_index = extend_identifiers(index, load_karpathy("new.json", "images"), codebooks=codebooks)
    """
    spec = get_identifier_kind(index.kind)
    images = corpus.memorized()
    if not images:
        raise GraceInputError(f"{corpus.json_path}: no train, val or test images to add")
    known = [image.key for image in images if image.key in index.images]
    if known:
        raise GraceInputError(
            f"{corpus.json_path}: image {known[0]!r} is already in {source} ({len(known)} of the new images are)"
        )
    if spec.extend is None:
        raise GraceInputError(f"{source}: {index.kind} identifiers cannot name new images")
    if codebooks is not None and codebooks.kind != index.kind:
        raise GraceInputError(f"{source}: {codebooks.kind} codebooks for {index.kind} identifiers")
    if codebooks is None and spec.needs_codebooks:
        raise GraceInputError(
            f"{source}: no {CODEBOOKS_FILE}: {index.kind} identifiers of new images are coded with the codebooks "
            "`grace-hf prepare` saves beside identifiers.json and training copies into the model directory "
            "(prepare and train again with this version to get them)"
        )
    recorded = codebooks.metadata.get("options", {}) if codebooks is not None else {}
    checked = spec.make_options({**recorded, **options})
    with _naming_unreadable_images(corpus, num_workers):
        extended = spec.extend(index, IdentifierInputs(images, pseudo_queries or {}, num_workers), checked, codebooks)
    extended.collection = index.collection + [image.key for image in images if image.split == "test"]
    extended.validate(f"{source} with the images of {corpus.json_path}")
    return extended
