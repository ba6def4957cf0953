"""`grace-hf <command>`: one entry point; each command is a module of `grace_hf.commands` with `main(argv) -> int`.

Bad input ends in a message naming the file and item, exit status 2, no traceback; Ctrl-C (or SIGTERM) in one line,
exit status 130 (while `grace_hf` itself imports: `grace_hf/__init__.py`); `--debug` (anywhere on
the line) or `GRACE_HF_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from grace_hf.errors import GraceInputError
from grace_hf.runtime import configure_threads

COMMANDS: dict[str, tuple[str, str]] = {
    "synthetic": ("synthetic", "write the built-in demo data (Karpathy format)"),
    "prepare": ("prepare", "Karpathy JSON + images -> identifiers -> datasets"),
    "convert-openflamingo": (
        "convert_openflamingo",
        "merge OpenFlamingo, MPT and CLIP weights into one model directory",
    ),
    "train": ("train", "train with Accelerate (+ DeepSpeed) from a YAML recipe"),
    "add-images": ("add_images", "add new images to a trained retriever (continued training with replay)"),
    "evaluate": ("evaluate", "Recall@K of a trained model on a prepared dataset"),
    "retrieve": ("retrieve", "retrieve images for text queries"),
    "pseudo-queries": ("pseudo_queries", "write pseudo-queries with a trained captioner"),
    "baseline-clip": ("baseline_clip", "train and evaluate a dense open_clip dual encoder"),
    "baseline-bm25": ("baseline_bm25", "the text-only baseline: BM25 over each image's training texts"),
    "compare": ("compare", "one table: identifier kinds beside the dense baseline"),
    "serve": ("serve", "a trained retriever in the browser and behind an HTTP API (Gradio)"),
    "demo": ("demo", "the end-to-end demo on built-in synthetic data"),
}
DEBUG_FLAG = "--debug"


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: grace-hf <command> [options] [--debug]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`grace-hf <command> --help` shows a command's options."]
    return "\n".join(lines)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM interrupts the command like Ctrl-C (the output being built is cleaned up, the old one kept) instead of
    ending the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `grace-hf <command> ...` to the command's module."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get("GRACE_HF_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"grace-hf: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:  # Ctrl-C while the command's module imports ends the same way as in the command
        module = importlib.import_module(f"grace_hf.commands.{COMMANDS[command][0]}")
        configure_threads()  # a safe default for every command; `--num-threads` (train: `torch_num_threads`) overrides
        with _sigterm_interrupts():
            return module.main(rest) or 0
    except GraceInputError as err:
        if debug:
            raise
        print(f"grace-hf {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"grace-hf {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
