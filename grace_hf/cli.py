"""`grace-hf <command>`: one entry point, each command's logic lives in its own module.

Every command module exposes `main(argv: list[str] | None = None) -> int` with its own
argparse parser, so `grace-hf prepare --help` shows that command's options and tests call the
module's `main` directly.
"""

from __future__ import annotations

import importlib
import sys

from grace_hf.errors import GraceInputError

COMMANDS: dict[str, tuple[str, str]] = {
    "synthetic": ("grace_hf.data.synthetic", "write the built-in demo data (Karpathy format)"),
    "prepare": ("grace_hf.data.build", "Karpathy JSON + images -> identifiers -> datasets"),
    "convert-openflamingo": (
        "grace_hf.models.flamingo.convert_openflamingo",
        "merge OpenFlamingo, MPT and CLIP weights into one model directory",
    ),
    "train": ("grace_hf.training.train", "train with Accelerate (+ DeepSpeed) from a YAML recipe"),
    "evaluate": ("grace_hf.retrieval.evaluate", "Recall@K of a trained model on a prepared dataset"),
    "retrieve": ("grace_hf.retrieval.retrieve", "retrieve images for text queries"),
    "pseudo-queries": ("grace_hf.data.captioner", "write pseudo-queries with a trained captioner"),
    "baseline-clip": ("grace_hf.dense.train", "train and evaluate a dense open_clip dual encoder"),
    "compare": ("grace_hf.compare", "one table: identifier kinds beside the dense baseline"),
    "serve": ("grace_hf.commands.serve", "a trained retriever in the browser and behind an HTTP API (Gradio)"),
    "demo": ("grace_hf.demo", "the end-to-end demo on built-in synthetic data"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: grace-hf <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`grace-hf <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `grace-hf <command> ...` to the command's module."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"grace-hf: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(rest) or 0
    except GraceInputError as err:
        print(f"grace-hf {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
