"""The output policy of every command that writes a directory: never lose what the user did not ask to replace.

- A new directory is built under a temporary name beside it (`.NAME.grace-tmp-<pid>-*`) and renamed into place
  when complete, so a failed or killed run leaves no half-written output; the temporary directories a killed run
  left behind are removed by the next run for the same output.
- Every output holds a marker file (`.grace_hf_output.json`) that says which kind of output it is. An existing
  directory is replaced only when it is empty, a grace_hf output of the same kind, or `overwrite` is given.
- Never, not even with `overwrite`: the working directory or one of its parents, the home directory, a directory
  that holds an input of the command, or a regular file. Each refusal is a `GraceInputError` that says why.

Long jobs (training, the demo) cannot build in a temporary directory for hours and rename at the end: they open
their output in place (`open_output_dir`), marked incomplete, and write their pieces into it atomically; the
marker says complete once everything is there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_json, umask

__all__ = [
    "MARKER_FILE",
    "check_output_dir",
    "finish_output_dir",
    "is_complete_output",
    "open_output_dir",
    "output_directory",
    "read_marker",
    "remove_stale_temporaries",
]

MARKER_FILE = ".grace_hf_output.json"

# the kinds of output, as their markers name them
SYNTHETIC_DATA = "synthetic-data"
PREPARED_DATASET = "prepared-dataset"
MODEL = "model"
DENSE_BASELINE = "dense-baseline"
TEXT_BASELINE = "text-baseline"
EVALUATION = "evaluation"
RETRIEVAL = "retrieval"
COMPARISON = "comparison"
PSEUDO_QUERIES = "pseudo-queries"
DEMO = "demo"
BENCHMARK = "benchmark"  # the work directory of a script in benchmarks/
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.grace-(?P<role>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")

PathLike = str | os.PathLike


def read_marker(directory: PathLike) -> dict[str, Any] | None:
    """The marker of a grace_hf output directory, or None when `directory` is not one."""
    path = Path(directory) / MARKER_FILE
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def is_complete_output(directory: PathLike) -> bool:
    """Whether `directory` is a grace_hf output whose marker says it is complete."""
    marker = read_marker(directory)
    return marker is not None and marker.get("complete", False) is True


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output_dir(
    path: PathLike,
    kind: str,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--output-dir",
) -> Path:
    """Refuse an output directory that must not be written or replaced (see the module docstring); return it.
    `flag`: the command-line flag that named it, for the messages."""
    output = Path(path).expanduser()
    where = f"{flag} {os.fspath(path)}"
    if output.is_symlink():
        raise GraceInputError(f"{where}: is a symbolic link; give the directory it points to")
    resolved = output.resolve()
    cwd = Path.cwd().resolve()
    if _contains(resolved, cwd):
        raise GraceInputError(f"{where}: is the working directory or one of its parents; choose a new directory")
    if resolved == Path.home().resolve():
        raise GraceInputError(f"{where}: is the home directory; choose a new directory")
    for source in inputs:
        if source is not None and _contains(resolved, Path(source).expanduser().resolve()):
            raise GraceInputError(f"{where}: holds the input {os.fspath(source)}; choose another directory")
    if output.exists() and not output.is_dir():
        raise GraceInputError(f"{where}: is a file, not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        marker = read_marker(output)
        if marker is None or marker["kind"] != kind:
            found = "not a grace_hf output" if marker is None else f"a grace_hf {marker['kind']} output"
            raise GraceInputError(
                f"{where}: exists and is {found}, not a {kind} output; choose another directory, or pass "
                "--overwrite to replace it"
            )
    return output


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output: PathLike) -> None:
    """Remove the temporary siblings of `output` that dead runs left; a replaced directory whose successor never
    arrived (a kill between the two renames) is put back."""
    output = Path(output)
    if not output.parent.is_dir():
        return
    for entry in output.parent.iterdir():
        match = _TEMPORARY.match(entry.name)
        if not match or match["name"] != output.name or _process_alive(int(match["pid"])):
            continue
        if match["role"] == "old" and not output.exists():
            os.replace(entry, output)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _sibling(output: Path, role: str) -> Path:
    return output.parent / f".{output.name}.grace-{role}-{os.getpid()}-{secrets.token_hex(4)}"


def _write_marker(directory: Path, kind: str, complete: bool, command: str | None) -> None:
    atomic_write_json(directory / MARKER_FILE, {"kind": kind, "complete": complete, "command": command})


def _replace(output: Path, new: Path) -> None:
    """Put `new` where `output` is; the old directory is removed after the swap."""
    if not output.exists():
        os.replace(new, output)
        return
    old = _sibling(output, "old")
    os.replace(output, old)
    os.replace(new, output)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def output_directory(
    path: PathLike,
    kind: str,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    command: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` (marked as a `kind` output) when the block completes.

    Example:
        >>> with output_directory("runs/eval", "evaluation", inputs=[model_dir]) as tmp:
        ...     (tmp / "metrics.json").write_text("{}")
    """
    output = check_output_dir(path, kind, inputs, overwrite)
    remove_stale_temporaries(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(output, "tmp")
    tmp.mkdir(mode=0o777 & ~umask())
    try:
        yield tmp
        _write_marker(tmp, kind, True, command)
        _replace(output, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_output_dir(
    path: PathLike,
    kind: str,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    resumable: bool = False,
    resume: bool = False,
    command: str | None = None,
    flag: str = "--output-dir",
) -> Path:
    """Open a long job's output directory in place, marked incomplete, and return it (`flag`: as in
    `check_output_dir`).

    `resume`: keep what is there (it must be a `kind` output). Otherwise an existing output is replaced by an
    empty one; for a `resumable` job, an unfinished run of the same kind is kept unless `overwrite` is given.
    """
    output = check_output_dir(path, kind, inputs, overwrite, flag)
    remove_stale_temporaries(output)
    marker = read_marker(output)
    if resume:
        if marker is None or marker["kind"] != kind:
            raise GraceInputError(f"{flag} {os.fspath(path)}: no {kind} output to resume")
    elif output.is_dir() and any(output.iterdir()):
        if resumable and marker is not None and not marker.get("complete", True) and not overwrite:
            raise GraceInputError(
                f"{flag} {os.fspath(path)}: holds an unfinished run; resume it with "
                "--resume-from-checkpoint latest, or pass --overwrite to start again"
            )
        fresh = _sibling(output, "tmp")
        fresh.mkdir(mode=0o777 & ~umask())
        _replace(output, fresh)
    output.mkdir(parents=True, exist_ok=True)
    _write_marker(output, kind, False, command)
    return output


def finish_output_dir(path: PathLike, kind: str, command: str | None = None) -> None:
    """Mark a long job's output directory complete (the last write of the job)."""
    _write_marker(Path(path), kind, True, command)
