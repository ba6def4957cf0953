"""`Codebooks`: what an identifier kind keeps from building to code more images later, `identifier_codebooks.safetensors`.

A content-based kind codes an image from its embedding (structured: a path down a k-means tree; rq: the nearest
centroid per level), so adding images to a trained model needs the centroids the collection was coded with, not a
new clustering that would rename every image. `prepare` saves them beside `identifiers.json`, training copies them
into the model directory, and `add-images` reads them there. The file is safetensors: named float32 arrays (the
centroids, the embedding source's own constants) and a JSON metadata entry (the kind, its options, the tree's
shape).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_bytes

__all__ = ["CODEBOOKS_FILE", "Codebooks"]

CODEBOOKS_FILE = "identifier_codebooks.safetensors"


@dataclass
class Codebooks:
    """The saved state of an identifier kind.

    Args:
        kind: the identifier kind that wrote them (a kind refuses another kind's codebooks).
        tensors: name -> array, e.g. structured's `centroids` (C, d) and `pixel_mean` (1, 768).
        metadata: JSON-serialisable values, e.g. the kind's options and the tree's node paths.

    Example:
        >>> books = Codebooks("structured", {"centroids": np.zeros((2, 4), np.float32)}, {"leaf_size": 30})
        >>> Codebooks.load(books.save("identifier_codebooks.safetensors")).metadata
        {'leaf_size': 30}
    """

    kind: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (a directory means `<dir>/identifier_codebooks.safetensors`); return its path."""
        path = Path(path)
        if path.is_dir():
            path = path / CODEBOOKS_FILE
        tensors = {name: np.ascontiguousarray(value) for name, value in self.tensors.items()}
        header = {"kind": self.kind, "metadata": json.dumps(self.metadata, ensure_ascii=False)}
        atomic_write_bytes(path, save(tensors, metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Codebooks:
        """Read a codebooks file; a missing, truncated or foreign file is a `GraceInputError` naming it."""
        path = Path(path)
        if not path.is_file():
            raise GraceInputError(f"{path}: identifier codebooks not found")
        try:
            with safe_open(os.fspath(path), framework="numpy") as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            return cls(header["kind"], tensors, json.loads(header["metadata"]))
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
            raise GraceInputError(f"{path}: not an identifier codebooks file ({err})") from None
