"""What every identifier kind is made of: its inputs, its options, its builder and its extender."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from grace_hf.data.karpathy import KarpathyImage
from grace_hf.errors import GraceInputError
from grace_hf.identifiers.codebooks import Codebooks
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["Extender", "IdentifierInputs", "IdentifierKind", "NoOptions", "next_number", "number_images"]


@dataclass
class IdentifierInputs:
    """What a builder may read: the memorized images (file order), their pseudo-queries, reader threads."""

    images: list[KarpathyImage]
    pseudo_queries: dict[str, list[str]] = field(default_factory=dict)
    num_workers: int | None = None


@dataclass
class NoOptions:
    """The options of a kind that takes none."""


# extend(index, inputs, options, codebooks) -> the new index: see `IdentifierKind`
Extender = Callable[[IdentifierIndex, IdentifierInputs, Any, Codebooks | None], IdentifierIndex]


@dataclass(frozen=True)
class IdentifierKind:
    """A kind of identifier: its name, its options (a dataclass that checks itself), its builder and its extender.

    `build(inputs, options)` names the memorized images of a corpus; it may attach `Codebooks` to the index it
    returns (what coding more images later needs; `prepare` saves them). `extend(index, inputs, options, codebooks)`
    names new images (`inputs.images`, none of them in `index`) the way `build` would have, without renaming an
    image of `index`, and returns the whole new index (old images first) with its updated codebooks; `codebooks`
    are those the model directory holds (None when it has none), `options` the recorded ones with the caller's
    overrides. A kind without `extend` cannot take new images; one that `needs_codebooks` cannot without them.
    """

    name: str
    build: Callable[[IdentifierInputs, Any], IdentifierIndex]
    options: type = NoOptions
    description: str = ""
    extend: Extender | None = None
    needs_codebooks: bool = False

    def make_options(self, values: Mapping[str, Any]) -> Any:
        """The kind's options from `values`; an option the kind does not take is a `GraceInputError` naming it."""
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in unknown)
            takes = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(known)) or "no options"
            raise GraceInputError(f"{self.name} identifiers do not take {flags} (they take: {takes})")
        return self.options(**values)


def number_images(images: list[KarpathyImage], start: int, spell: Callable[[int], str]) -> dict[str, list[str]]:
    """Number `images` start, start + 1, ... in file order: image key -> [spell(number)]."""
    return {image.key: [spell(start + n)] for n, image in enumerate(images)}


def next_number(index: IdentifierIndex, read: Callable[[str], int | None]) -> int:
    """The number after the largest one `index` uses (`read` turns an identifier back into its number)."""
    numbers = []
    for key, identifiers in index.images.items():
        for identifier in identifiers:
            number = read(identifier)
            if number is None:
                raise GraceInputError(f"{index.kind} identifiers: {identifier!r} of image {key!r} is not a number")
            numbers.append(number)
    return max(numbers, default=-1) + 1


def extended_index(
    index: IdentifierIndex,
    images: list[KarpathyImage],
    identifiers: list[str],
    tokens: list[str],
    codebooks: Codebooks,
) -> IdentifierIndex:
    """`index` with `images` named `identifiers` (in order) added, the `tokens` it lacks appended to its new tokens,
    and the `codebooks` that now code them."""
    known = set(index.new_tokens)
    return IdentifierIndex(
        index.kind,
        {**index.images, **{image.key: [identifier] for image, identifier in zip(images, identifiers)}},
        new_tokens=index.new_tokens + [token for token in dict.fromkeys(tokens) if token not in known],
        codebooks=codebooks,
    )
