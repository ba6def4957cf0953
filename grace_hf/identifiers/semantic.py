"""Semantic identifiers: captions as identifiers.

A train image is named by its human captions, any other memorized image by its pseudo-queries
(its human captions are the evaluation queries, so they must not leak into training). Texts are
lower-cased with whitespace collapsed. A text that names two images stays with the earlier image
in file order and is dropped from the later one; the drops are reported. An image left without
any text is an error. Images added to a trained model are named the same way, after every existing image.
"""

from __future__ import annotations

from grace_hf.data.karpathy import KarpathyImage, teaching_texts
from grace_hf.errors import GraceInputError
from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind, NoOptions
from grace_hf.identifiers.codebooks import Codebooks
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["KIND", "build", "extend", "normalize"]

MAX_REPORTED = 20  # collisions listed by name in the report; all are counted


def normalize(text: str) -> str:
    """Lower-case and collapse whitespace: `' A  Dog\\n'` -> `'a dog'`."""
    return " ".join(text.lower().split())


def _name_images(
    images: list[KarpathyImage], pseudo_queries: dict[str, list[str]], owner: dict[str, str]
) -> tuple[dict[str, list[str]], dict]:
    """Identifiers of `images` from their texts; `owner` (identifier -> image, updated) holds the texts already
    taken, which an image cannot take again. Returns the identifiers and the collision report."""
    result: dict[str, list[str]] = {}
    dropped: list[dict[str, str]] = []
    num_dropped = 0
    for image in images:
        texts, source = teaching_texts(image, pseudo_queries)
        if source == "pseudo_query" and image.key not in pseudo_queries:
            raise GraceInputError(
                f"semantic identifiers: {image.split} image {image.key!r} has no pseudo-queries (pass --pseudo-queries)"
            )
        kept: list[str] = []
        for text in dict.fromkeys(normalize(t) for t in texts):
            if text in owner:
                num_dropped += 1
                if len(dropped) < MAX_REPORTED:
                    dropped.append({"identifier": text, "kept_by": owner[text], "dropped_from": image.key})
                continue
            owner[text] = image.key
            kept.append(text)
        if not kept:
            raise GraceInputError(
                f"semantic identifiers: every text of image {image.key!r} also names an earlier image "
                f"(e.g. {normalize(texts[0])!r} names {owner[normalize(texts[0])]!r})"
                if texts
                else f"semantic identifiers: image {image.key!r} has no caption"
            )
        result[image.key] = kept
    return result, {"collisions_dropped": num_dropped, "collision_examples": dropped}


def build(inputs: IdentifierInputs, options: NoOptions) -> IdentifierIndex:
    """Identifiers from human captions (train) and pseudo-queries (val, test); `report` lists collisions."""
    images, report = _name_images(inputs.images, inputs.pseudo_queries, {})
    return IdentifierIndex("semantic", images, report=report)


def extend(index: IdentifierIndex, inputs: IdentifierInputs, options: NoOptions, codebooks: Codebooks | None):
    """The new images' texts name them as in `build`; a text that already names an image of `index` (or an
    earlier new image) is dropped, and a new image left without any is an error."""
    new, report = _name_images(inputs.images, inputs.pseudo_queries, index.identifier_to_image())
    return IdentifierIndex("semantic", {**index.images, **new}, report=report)


KIND = IdentifierKind("semantic", build, description="captions (train) and pseudo-queries (val, test)", extend=extend)
