"""`IdentifierIndex`: which identifiers name which image, saved as `identifiers.json`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from grace_hf.data.karpathy import normalize_key
from grace_hf.errors import GraceInputError
from grace_hf.identifiers.codebooks import Codebooks
from grace_hf.io_utils import atomic_write_text, read_json

__all__ = ["IDENTIFIERS_FILE", "IdentifierIndex"]

IDENTIFIERS_FILE = "identifiers.json"


def _resolve(path_or_dir: str | os.PathLike) -> Path:
    path = Path(path_or_dir)
    return path / IDENTIFIERS_FILE if path.is_dir() or not path.suffix else path


@dataclass
class IdentifierIndex:
    """The identifiers of a corpus.

    Args:
        kind: numeric, string, semantic, structured, atomic or rq.
        images: image key -> its identifiers, in corpus file order (several only for semantic).
        new_tokens: tokens the tokenizer must add (structured, atomic and rq), in a stable order.
        collection: the image keys retrieval ranks by default (the test split).
        report: what building found (e.g. semantic collisions); recorded in prepare.json, not saved here.
        codebooks: what the kind needs to code more images later (structured: the k-means tree); saved beside
            identifiers.json as `identifier_codebooks.safetensors`, not in it.

    Example:
        >>> index = IdentifierIndex("string", {"a.jpg": ["0"], "b.jpg": ["1"]}, [], ["b.jpg"])
        >>> index.identifier_to_image()["1"]
        'b.jpg'
    """

    kind: str
    images: dict[str, list[str]]
    new_tokens: list[str] = field(default_factory=list)
    collection: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict, compare=False, repr=False)
    codebooks: Codebooks | None = field(default=None, compare=False, repr=False)

    def validate(self, source: str = "identifiers") -> None:
        """Every image key is a path inside an image root, every image has >= 1 non-empty identifier, no identifier
        names two images, collection images exist."""
        for key in self.images:
            if not isinstance(key, str) or normalize_key(key) != key:
                raise GraceInputError(f"{source}: image key {key!r} is not a normalised path inside an image root")
        self.identifier_to_image(source)
        missing = [key for key in self.collection if key not in self.images]
        if missing:
            raise GraceInputError(f"{source}: collection image {missing[0]!r} has no identifier")

    def identifier_to_image(self, source: str = "identifiers") -> dict[str, str]:
        """identifier -> image key; a collision is a GraceInputError naming both images."""
        owner: dict[str, str] = {}
        for key, identifiers in self.images.items():
            if not identifiers:
                raise GraceInputError(f"{source}: image {key!r} has no identifier")
            for identifier in identifiers:
                if not isinstance(identifier, str) or not identifier.strip():
                    raise GraceInputError(f"{source}: image {key!r} has an empty identifier")
                if identifier in owner and owner[identifier] != key:
                    raise GraceInputError(
                        f"{source}: identifier {identifier!r} names two images: {owner[identifier]!r} and {key!r}"
                    )
                owner[identifier] = key
        return owner

    def restrict(self, image_keys: Iterable[str]) -> IdentifierIndex:
        """The same index over `image_keys` only (same new_tokens, so the vocabulary does not change)."""
        keep = set(image_keys)
        unknown = keep - self.images.keys()
        if unknown:
            raise GraceInputError(f"identifiers: unknown image key {sorted(unknown)[0]!r}")
        return IdentifierIndex(
            kind=self.kind,
            images={key: list(ids) for key, ids in self.images.items() if key in keep},
            new_tokens=list(self.new_tokens),
            collection=[key for key in self.collection if key in keep],
        )

    def to_json(self) -> str:
        """The JSON text: one image per line, which stays readable and cheap to write at COCO's size."""

        def dumps(obj: object) -> str:
            return json.dumps(obj, ensure_ascii=False)

        images = ",\n".join(f"    {dumps(key)}: {dumps(ids)}" for key, ids in self.images.items())
        return (
            f'{{\n  "kind": {dumps(self.kind)},\n  "images": {{\n{images}\n  }},\n'
            f'  "new_tokens": {dumps(self.new_tokens)},\n  "collection": {dumps(self.collection)}\n}}\n'
        )

    def save(self, path_or_dir: str | os.PathLike) -> Path:
        """Write `identifiers.json` atomically (a directory means `<dir>/identifiers.json`); return its path."""
        path = _resolve(path_or_dir)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> IdentifierIndex:
        """Read `identifiers.json` (or `<dir>/identifiers.json`) and validate it."""
        path = _resolve(path_or_dir)
        data = read_json(path, "identifier file")
        if not isinstance(data, dict) or not isinstance(data.get("images"), dict) or "kind" not in data:
            raise GraceInputError(f"{path}: expected an object with 'kind' and 'images'")
        for key, identifiers in data["images"].items():
            if not isinstance(identifiers, list):
                raise GraceInputError(f"{path}: images[{key!r}] must be a list of identifiers")
        index = cls(data["kind"], data["images"], list(data.get("new_tokens", [])), list(data.get("collection", [])))
        index.validate(str(path))
        return index
