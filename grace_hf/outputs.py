"""The output policy of every command that writes a directory: never lose what the user did not ask to replace.

What holds, for every command (`train`, `add-images` and `demo` included):

- **Built beside, swapped in at the end.** The output `NAME` is built in the sibling `.NAME.grace-partial/` and
  renamed into place only when complete. Until then the previous output is untouched: a failed, killed
  (SIGINT, SIGTERM, SIGKILL) or refused run leaves it byte for byte. A failure, SIGINT or SIGTERM (`grace-hf`
  turns it into an interrupt) also removes the build directory; one a SIGKILLed run left is removed by the next run
  for the same output. `train` keeps its checkpoints in the build directory, so `--resume-from-checkpoint latest`
  finds them after a kill (a build directory with checkpoints is kept: it is resumed, or replaced with
  `--overwrite`). A kill between the two renames of the swap leaves the old output aside
  (`.NAME.grace-old-<pid>-0`); the next run puts it back. Only the benchmarks' `--reuse` (`begin_output(resume=True)`
  on a complete output) moves an output back into its build directory, to continue it.
- **One writer per output.** The whole run holds a lock on `.NAME.grace-lock` beside the output; a second run into
  the same output is refused, naming the first run's process id.
- **Only what grace_hf wrote is ever removed.** Every output holds a marker (`.grace_hf_output.json`, a regular
  file, not a link) with its kind and a manifest: each file the command wrote, with its size. An existing directory
  is replaced only when it is empty or its marker's manifest matches it exactly (every listed file there with its
  size, nothing else beside them); replacing it removes exactly the listed files and the folders that become empty.
  A directory with files grace_hf did not write (they are named), a marker without a manifest (older grace_hf), a
  manifest that does not match (a copied or forged marker) or a linked marker is refused and nothing is deleted.
  `overwrite` only allows replacing a grace_hf output of another kind, or an unfinished one; it never lets a command
  empty a directory grace_hf did not create. A run into a finished output of its own kind says on stderr, when it
  starts, that it will replace it.
- **No input is an output,** by real path (symbolic links followed): the output may not be, hold or sit inside a
  directory the command reads (model, data, image root, dense model, pseudo-queries folder), nor be or hold a file
  it reads (recipe, Karpathy JSON, checkpoint).
- **Refused whatever the flags:** a symbolic link or a regular file as output, or a path through a file; the
  working directory or one of its parents; `/` and every top-level directory (`/etc`, `/tmp`, ...); anything under
  the system trees (`/bin`, `/boot`, `/dev`, `/etc`, `/lib*`, `/proc`, `/run`, `/sbin`, `/snap`, `/sys`, `/usr`) and
  within three levels of `/var` (but `/var/tmp/...`); the home directory and everything in its dot-folders
  (`~/.ssh`, `~/.cache`, ...); the root of a git checkout (a directory holding `.git`); a name too long to build
  beside.

Each refusal is a `GraceInputError` that names the path and says why.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_json, umask

__all__ = [
    "MARKER_FILE",
    "OutputBuild",
    "begin_output",
    "build_path",
    "check_output_dir",
    "final_path",
    "is_complete_output",
    "output_directory",
    "portable_path",
    "read_marker",
    "record_written",
    "remove_stale_temporaries",
]

MARKER_FILE = ".grace_hf_output.json"
PARTIAL_SUFFIX = ".grace-partial"
LOCK_SUFFIX = ".grace-lock"
MAX_MARKER_BYTES = 64 << 20

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
# what a run of an earlier version left beside an output
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.grace-(?P<role>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
# top-level directories of the system: nothing under them is ever an output (/var: down to three levels)
_SYSTEM_TREES = frozenset(
    ("bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "snap", "sys", "usr")
)
NAMED_FILES = 5  # files named in a message, at most

PathLike = str | os.PathLike


def build_path(output: PathLike) -> Path:
    """The sibling directory in which `output` is built: `.NAME.grace-partial`."""
    output = Path(output)
    return output.parent / f".{output.name}{PARTIAL_SUFFIX}"


def final_path(path: PathLike) -> Path:
    """`path` as it will be named once the outputs it is being built in are complete: every `.NAME.grace-partial`
    in it replaced by `NAME` (a record that names a file of its own build must outlive the rename)."""
    building = re.compile(rf"^\.(?P<name>.+){re.escape(PARTIAL_SUFFIX)}$")
    return Path(*((match["name"] if (match := building.match(part)) else part) for part in Path(path).parts))


def _lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


def read_marker(directory: PathLike) -> dict[str, Any] | None:
    """The marker of a grace_hf output directory, or None when `directory` is not one (no marker, a linked or
    oversized marker, or one that is not a JSON object naming a kind)."""
    path = Path(directory) / MARKER_FILE
    try:
        info = path.lstat()
        if not path.is_file() or path.is_symlink() or info.st_size > MAX_MARKER_BYTES:
            return None
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def is_complete_output(directory: PathLike) -> bool:
    """Whether `directory` is a grace_hf output whose marker says it is complete."""
    marker = read_marker(directory)
    return marker is not None and marker.get("complete", False) is True


def _manifest(directory: Path) -> dict[str, int]:
    """Every file under `directory` (links not followed) but the marker, as relative path -> size."""
    files = {}
    for root, dirs, names in os.walk(directory):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, name)
            relative = path.relative_to(directory).as_posix()
            if relative != MARKER_FILE:
                files[relative] = path.lstat().st_size
    return files


def _ownership(directory: Path) -> tuple[dict[str, int] | None, str]:
    """The files grace_hf wrote into the existing output `directory` (its marker's manifest, checked against what
    is there), or None and why they cannot be known."""
    marker = read_marker(directory)
    if marker is None:
        return None, "not a grace_hf output"
    listed = marker.get("files")
    if not isinstance(listed, dict) or not all(isinstance(v, int) for v in listed.values()):
        return None, f"a grace_hf {marker['kind']} output whose marker lists no files (an older grace_hf wrote it)"
    found = _manifest(directory)
    changed = sorted(name for name, size in listed.items() if found.get(name) != size)
    if changed:
        return None, (
            f"a grace_hf {marker['kind']} output whose files are not those its marker lists "
            f"({', '.join(changed[:NAMED_FILES])}): it was changed, or the marker was copied from elsewhere"
        )
    extras = sorted(name for name in found if name not in listed)
    if extras:
        more = len(extras) - NAMED_FILES
        named = ", ".join(extras[:NAMED_FILES]) + (f" and {more} more" if more > 0 else "")
        return None, f"a grace_hf {marker['kind']} output that also holds files grace_hf did not write: {named}"
    return listed, ""


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def _refused_location(resolved: Path) -> str | None:
    """Why `resolved` (an absolute, resolved path) may never be an output, or None."""
    parts = resolved.parts[1:]
    if len(parts) <= 1:
        return "is / or a directory directly under it"
    if parts[0] in _SYSTEM_TREES or (parts[0] == "var" and len(parts) <= 3 and parts[1] != "tmp"):
        return "is a system directory"
    home = Path.home().resolve()
    if resolved == home:
        return "is the home directory"
    if home in resolved.parents and resolved.relative_to(home).parts[0].startswith("."):
        return f"is in the dot-folder {home / resolved.relative_to(home).parts[0]} of the home directory"
    if (resolved / ".git").exists():
        return "is the root of a git checkout"
    if _contains(resolved, Path.cwd().resolve()):
        return "is the working directory or one of its parents"
    return None


def _clashes(output: Path, source: PathLike) -> str | None:
    """How the output (resolved) collides with the input `source`, or None."""
    given = Path(source).expanduser()
    for path in {given.resolve(), Path(os.path.abspath(given))}:
        if _contains(output, path):
            return "holds the input"
        if path.is_dir() and path in output.parents:
            return "is inside the input"
    return None


def check_output_dir(
    path: PathLike,
    kind: str,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--output-dir",
    overwrite_flag: str | None = "--overwrite",
) -> Path:
    """Refuse an output directory that must not be written or replaced (see the module docstring); return it.
    `flag`: the command-line flag that named it, for the messages; `overwrite_flag`: the flag that sets `overwrite`,
    which a refusal it would lift suggests (None: the command has none, e.g. a benchmark's `--work-dir`)."""
    output = Path(path).expanduser()
    where = f"{flag} {os.fspath(path)}"
    if output.is_symlink():
        raise GraceInputError(f"{where}: is a symbolic link; give the directory it points to")
    for parent in output.parents:
        if os.path.lexists(parent) and not parent.is_dir():
            raise GraceInputError(f"{where}: {os.fspath(parent)} is a file, not a directory")
    resolved = output.resolve()
    why = _refused_location(resolved)
    if why is not None:
        raise GraceInputError(f"{where}: {why}; choose a new directory")
    if len(os.fsencode(build_path(resolved).name)) > 255:
        raise GraceInputError(f"{where}: the name is too long to build the output beside it; choose a shorter one")
    for source in inputs:
        clash = None if source is None else _clashes(resolved, source)
        if clash is not None:
            raise GraceInputError(f"{where}: {clash} {os.fspath(source)}; choose another directory")
    if output.exists() and not output.is_dir():
        raise GraceInputError(f"{where}: is a file, not a directory")
    _check_replaceable(output, kind, overwrite, where, overwrite_flag)
    return output


def _check_replaceable(
    output: Path, kind: str, overwrite: bool, where: str, overwrite_flag: str | None = "--overwrite"
) -> dict[str, int]:
    """The files to remove when the existing `output` is replaced by a `kind` output (none when it is absent or
    empty); a `GraceInputError` when it may not be."""
    if not output.is_dir() or not any(output.iterdir()):
        return {}
    files, why = _ownership(output)
    if files is None:
        raise GraceInputError(f"{where}: exists and is {why}; nothing was deleted; choose another directory")
    marker = read_marker(output)
    if not overwrite and (marker["kind"] != kind or marker.get("complete") is not True):
        found = f"a grace_hf {marker['kind']} output" + ("" if marker.get("complete") is True else " (unfinished)")
        advice = "" if overwrite_flag is None else f", or pass {overwrite_flag} to replace it"
        raise GraceInputError(
            f"{where}: exists and is {found}, not a complete {kind} output; choose another directory{advice}"
        )
    return files


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output: PathLike) -> None:
    """Clean up what a dead run left beside `output`: a temporary of an earlier version is removed; a replaced
    output moved aside is put back when its successor never arrived (a kill between the two renames of a swap),
    else its listed files are removed (a kill just after the swap)."""
    output = Path(output)
    if not output.parent.is_dir():
        return
    for entry in output.parent.iterdir():
        match = _TEMPORARY.match(entry.name)
        if not match or match["name"] != output.name or _process_alive(int(match["pid"])):
            continue
        if match["role"] == "tmp":
            shutil.rmtree(entry, ignore_errors=True)
        elif not output.exists():
            os.replace(entry, output)
        elif _ownership(entry)[0] is not None:  # killed after the swap: the replaced output's own files go
            _remove_listed(entry, _ownership(entry)[0])


def _remove_listed(directory: Path, files: Iterable[str]) -> list[str]:
    """Remove the listed files and the marker of `directory`, then the folders that became empty; return what is
    left (relative paths)."""
    for name in [*files, MARKER_FILE]:
        if Path(name).is_absolute() or ".." in Path(name).parts:  # a manifest names files inside, never beyond
            continue
        (directory / name).unlink(missing_ok=True)
    for root, dirs, _ in sorted(os.walk(directory, topdown=False), key=lambda entry: -len(entry[0])):
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
    left = sorted(_manifest(directory))
    if not left and not any(directory.iterdir()):
        directory.rmdir()
    return left


def _take_lock(output: Path, where: str) -> int:
    """Lock `.NAME.grace-lock` beside `output` for this process (its pid written in it); return the descriptor."""
    path = _lock_path(output)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise GraceInputError(
                    f"{where}: another grace_hf run (process {holder}) is writing it; wait for it to end or choose "
                    "another directory"
                ) from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its holder removed while this process waited for it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _release_lock(output: Path, fd: int) -> None:
    _lock_path(output).unlink(missing_ok=True)
    os.close(fd)


def _write_marker(directory: Path, kind: str, command: str | None, files: dict[str, int] | None) -> None:
    marker: dict[str, Any] = {"kind": kind, "complete": files is not None, "command": command}
    if files is not None:
        marker["files"] = files
    atomic_write_json(directory / MARKER_FILE, marker)


def _has_checkpoints(directory: Path) -> bool:
    return (directory / "checkpoints").is_dir() and any((directory / "checkpoints").iterdir())


class OutputBuild:
    """An output being built: `build` (`.NAME.grace-partial`, where everything is written) becomes `path` on
    `commit()`; `abandon()` leaves `path` as it was. Made by `begin_output`; holds the output's lock until either."""

    def __init__(
        self,
        path: Path,
        kind: str,
        overwrite: bool,
        command: str | None,
        lock: int,
        made: list[Path],
        overwrite_flag: str | None = "--overwrite",
    ):
        self.path, self.build, self.kind = path, build_path(path), kind
        self.overwrite, self.command, self._lock, self._made = overwrite, command, lock, made
        self.overwrite_flag = overwrite_flag

    def commit(self) -> None:
        """Mark the build complete with its manifest and swap it in for the old output, of which exactly the files
        grace_hf wrote are removed."""
        try:
            try:
                old_files = _check_replaceable(
                    self.path, self.kind, self.overwrite, str(self.path), self.overwrite_flag
                )
            except GraceInputError as err:
                raise GraceInputError(
                    f"{err} (it changed during the run); the new output is kept in {self.build}"
                ) from None
            _write_marker(self.build, self.kind, self.command, _manifest(self.build))
            if not self.path.is_dir() or not any(self.path.iterdir()):
                os.replace(self.build, self.path)
                return
            old = self.path.parent / f".{self.path.name}.grace-old-{os.getpid()}-0"
            os.replace(self.path, old)
            os.replace(self.build, self.path)
            left = _remove_listed(old, old_files)
            if left:
                kept = ", ".join(left[:NAMED_FILES])
                print(f"note: {old} keeps files written into the old output during the run: {kept}")
        finally:
            self._release()

    def abandon(self, keep: bool = False) -> None:
        """Leave the old output as it was; the build directory is removed unless `keep` (a resumable run)."""
        try:
            if not keep:
                shutil.rmtree(self.build, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock < 0:
            return
        _release_lock(self.path, self._lock)
        self._lock = -1
        for made in self._made:  # parents this run created, if nothing landed in them
            if made.is_dir() and not any(made.iterdir()):
                made.rmdir()


def begin_output(
    path: PathLike,
    kind: str,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    command: str | None = None,
    resumable: bool = False,
    resume: bool = False,
    flag: str = "--output-dir",
    overwrite_flag: str | None = "--overwrite",
) -> OutputBuild:
    """Check `path` (`check_output_dir`), lock it and open its build directory.

    `resume`: continue the build directory a killed run left (it must hold a `kind` build), or else the complete
    `kind` output itself, which is moved back into its build directory (the benchmarks' `--reuse`: the caller asked
    to continue it, so until the commit it is there, not at `path`). Otherwise a build directory left by a dead run
    is removed; for a `resumable` job, one with checkpoints is kept unless `overwrite`. `flag`, `overwrite_flag`: as
    for `check_output_dir`.
    """
    where = f"{flag} {os.fspath(path)}"
    output = check_output_dir(path, kind, inputs, overwrite, flag, overwrite_flag)
    made = [parent for parent in [output.parent, *output.parent.parents] if not parent.exists()][::-1]
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = _take_lock(output, where)
    except BaseException:
        for parent in reversed(made):
            parent.rmdir()
        raise
    build = OutputBuild(output, kind, overwrite, command, lock, made[::-1], overwrite_flag)
    try:
        remove_stale_temporaries(output)
        marker = read_marker(build.build)
        if build.build.exists() and (marker is None or marker.get("complete") is not False):
            raise GraceInputError(f"{where}: {build.build} exists and is not a grace_hf build directory; remove it")
        if resume and marker is None and is_complete_output(output) and read_marker(output)["kind"] == kind:
            _check_replaceable(output, kind, False, where)  # only grace_hf's files in it
            os.replace(output, build.build)  # continued where it is built; the commit puts it back
            marker = read_marker(build.build)
            _write_marker(build.build, kind, command, None)
        if resume:
            if marker is None or marker["kind"] != kind:
                raise GraceInputError(f"{where}: no unfinished {kind} run to resume ({build.build} holds none)")
            return build
        previous = read_marker(output)
        if previous is not None and previous.get("complete") is True:
            print(
                f"note: {where} holds a finished {previous['kind']} output ({previous.get('command') or 'grace_hf'});"
                " this run replaces it when it completes, and leaves it as it is if it fails or is stopped",
                file=sys.stderr,
            )
        if marker is not None:
            if resumable and _has_checkpoints(build.build) and not overwrite:
                raise GraceInputError(
                    f"{where}: an unfinished run left checkpoints in {build.build}; resume it with "
                    "--resume-from-checkpoint latest, or pass --overwrite to start again"
                )
            shutil.rmtree(build.build)
        build.build.mkdir(mode=0o777 & ~umask())
        _write_marker(build.build, kind, command, None)
    except BaseException:
        build.abandon(keep=True)
        raise
    return build


@contextmanager
def output_directory(
    path: PathLike,
    kind: str,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    command: str | None = None,
) -> Iterator[Path]:
    """Yield the build directory that becomes `path` (marked as a `kind` output) when the block completes; when it
    fails, `path` is left as it was.

    Example:
        >>> with output_directory("runs/eval", "evaluation", inputs=[model_dir]) as tmp:
        ...     (tmp / "metrics.json").write_text("{}")
    """
    build = begin_output(path, kind, inputs, overwrite, command)
    try:
        yield build.build
    except BaseException:
        build.abandon()
        raise
    build.commit()


def record_written(directory: PathLike, *names: str) -> None:
    """Add the files `names` (relative paths) that a later command wrote into the complete output `directory` to
    its marker's manifest, so that they count as grace_hf's; a directory without a valid marker is left alone."""
    directory = Path(directory)
    marker = read_marker(directory)
    if marker is None or not isinstance(marker.get("files"), dict):
        return
    for name in names:
        marker["files"][name] = (directory / name).lstat().st_size
    atomic_write_json(directory / MARKER_FILE, marker)


def portable_path(target: PathLike, output: PathLike) -> str:
    """How a file written into the output `output` names `target`: relative to `output` when both lie in one build
    directory (which is renamed when complete, so the build's name would dangle), else as given."""
    resolved, output = Path(target).resolve(), Path(output).resolve()
    for ancestor in output.parents:
        if ancestor.name.endswith(PARTIAL_SUFFIX) and ancestor in resolved.parents:
            return os.path.relpath(resolved, output)
    return str(target)
