"""Atomic files and careful JSON reading: write to a temporary sibling and rename; name the file on every error."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from grace_hf.errors import GraceInputError


def umask() -> int:
    """The process's file mode creation mask (new files get 0o666 & ~umask, directories 0o777 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; the output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path`, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path`, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(*paths: str | os.PathLike) -> str:
    """The sha256 hex digest of the files' bytes, read in order (one file: its usual checksum)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse the JSON file `path`; a missing or malformed file is a `GraceInputError` naming it and `what` it is."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise GraceInputError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise GraceInputError(f"{path}: is a directory, not a {what}") from None
    except OSError as err:
        raise GraceInputError(f"{path}: cannot read the {what}: {err.strerror}") from None
    except RecursionError:
        raise GraceInputError(f"{path}: not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise GraceInputError(f"{path}: not valid JSON: {err}") from None
