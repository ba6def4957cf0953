"""What every identifier kind is made of: its inputs, its options and its builder."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from grace_hf.data.karpathy import KarpathyImage
from grace_hf.errors import GraceInputError
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["IdentifierInputs", "IdentifierKind", "NoOptions"]


@dataclass
class IdentifierInputs:
    """What a builder may read: the memorized images (file order), their pseudo-queries, reader threads."""

    images: list[KarpathyImage]
    pseudo_queries: dict[str, list[str]] = field(default_factory=dict)
    num_workers: int | None = None


@dataclass
class NoOptions:
    """The options of a kind that takes none."""


@dataclass(frozen=True)
class IdentifierKind:
    """A kind of identifier: its name, its options (a dataclass that checks itself) and its builder."""

    name: str
    build: Callable[[IdentifierInputs, Any], IdentifierIndex]
    options: type = NoOptions
    description: str = ""

    def make_options(self, values: Mapping[str, Any]) -> Any:
        """The kind's options from `values`; an option the kind does not take is a `GraceInputError` naming it."""
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in unknown)
            takes = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(known)) or "no options"
            raise GraceInputError(f"{self.name} identifiers do not take {flags} (they take: {takes})")
        return self.options(**values)
