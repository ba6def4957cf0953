"""What every command's parser shares: one flag spelling (kebab-case), clear messages for renamed flags, threads."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from grace_hf.dense.directory import check_dense_directory
from grace_hf.errors import GraceInputError, renamed_flag
from grace_hf.retrieval.retriever import MAX_IMAGE_VIEWS, GraceRetriever
from grace_hf.runtime import configure_threads

__all__ = [
    "add_num_threads",
    "add_overwrite",
    "add_rerank",
    "check_directory",
    "check_rerank_args",
    "command_parser",
    "load_retriever",
    "setup_threads",
]


class _Renamed(argparse.Action):
    """A flag that was renamed: using it is an error that names the new spelling."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs) -> None:
        super().__init__(
            option_strings, argparse.SUPPRESS, nargs="*", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(renamed_flag(option_string, self.new))


# the least value of an integer flag: counts and sizes are >= 1 unless named here
INT_MINIMUM = {
    "--seed": 0,
    "--num-workers": 0,
    "--subfolders": 0,
    "--patience": 0,
    "--port": 1,
    "--image-views": 0,
    "--jpeg-quality": 0,
    "--num-sampled": 0,
}
INT_MAXIMUM = {"--port": 65535, "--image-views": MAX_IMAGE_VIEWS, "--num-sampled": 100}  # 100: queries per image
FLOAT_MINIMUM = {"--lr": 0.0, "--weight-decay": 0.0, "--val-fraction": 0.0, "--test-fraction": 0.0}


def _bad_number(flag: str, value: float) -> str | None:
    """Why `value` is no value for the numeric `flag`, or None."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        least = FLOAT_MINIMUM.get(flag)
        return f"must be >= {least}, got {value}" if least is not None and value < least else None
    least, most = INT_MINIMUM.get(flag, 1), INT_MAXIMUM.get(flag)
    if value < least or (most is not None and value > most):
        return f"must be {f'in [{least}, {most}]' if most is not None else f'>= {least}'}, got {value}"
    return None


class _CheckedParser(argparse.ArgumentParser):
    """Every numeric flag bounded: floats finite, integers >= 1 (`INT_MINIMUM`: the exceptions) and at most
    `INT_MAXIMUM` (ports, query crops); another value is a usage error (exit status 2) that names the flag."""

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's signature)
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if action.type not in (int, float) or value is None or not action.option_strings:
                continue
            for item in value if isinstance(value, list) else [value]:
                problem = _bad_number(action.option_strings[0], item)
                if problem is not None:
                    self.error(f"argument {action.option_strings[0]}: {problem}")
        return namespace, extras


def command_parser(
    command: str, description: str, renamed: Mapping[str, str] | None = None, epilog: str | None = None
) -> argparse.ArgumentParser:
    """The parser of `grace-hf <command>`; `renamed` maps old flags to their new spelling (hidden from --help);
    numeric flags are bounded (`_CheckedParser`)."""
    parser = _CheckedParser(
        prog=f"grace-hf {command}",
        description=description,
        epilog=epilog,
        allow_abbrev=False,
    )
    for old, new in (renamed or {}).items():
        parser.add_argument(old, action=_Renamed, new=new)
    return parser


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """`--overwrite`: replace an existing --output-dir that is not this command's own kind of output."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output-dir even if it is not this command's output (never the working "
        "directory, a parent of it, the home directory or a directory holding an input)",
    )


def add_num_threads(
    parser: argparse.ArgumentParser, default: str = "half the cores this process may use, at most 8"
) -> None:
    """`--num-threads N`: torch CPU threads (`default` says what None means: `setup_threads`'s default)."""
    parser.add_argument("--num-threads", type=int, default=None, help=f"torch CPU threads (default: {default})")


def setup_threads(args: argparse.Namespace, default: int | None = None) -> None:
    """Apply `--num-threads` (a GraceInputError below 1), or `default` (None: `default_num_threads()`) without it."""
    if args.num_threads is not None and args.num_threads < 1:
        raise GraceInputError(f"--num-threads must be >= 1, got {args.num_threads}")
    configure_threads(args.num_threads or default)


def check_directory(path: str | None, flag: str) -> None:
    """The folder `flag` names (None: not given) is an existing directory; a GraceInputError otherwise."""
    if path is not None and not Path(path).is_dir():
        raise GraceInputError(f"{flag} {path}: not a directory")


def add_rerank(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """`--rerank DENSE_DIR`, `--rerank-beams N`, `--rerank-weight W`: re-rank the beams' images with a dense model."""
    group = parser.add_argument_group("re-ranking the beams' images with a dense model")
    group.add_argument(
        "--rerank", default=None, metavar="DENSE_DIR", help="a `grace-hf baseline-clip` output directory"
    )
    group.add_argument(
        "--rerank-beams",
        type=int,
        default=None,
        help="beams whose images are re-ranked (default: as fitted in the model's rerank.json, else 30)",
    )
    group.add_argument(
        "--rerank-weight",
        type=float,
        default=None,
        help="fusion weight of the beam score, in [0, 1] (default: the model's rerank.json, fitted on val)",
    )
    return group


def load_retriever(args: argparse.Namespace, candidates: Sequence[str] | None, batch_size: int) -> GraceRetriever:
    """The retriever of `--model` with the search flags (`--num-beams`, default max(10, `--top-k`);
    `--length-penalty`) and the re-ranking ones (`add_rerank`), ranking `candidates` (None: the collection)."""
    return GraceRetriever.from_pretrained(
        args.model,
        num_beams=args.num_beams or max(10, args.top_k),
        length_penalty=args.length_penalty,
        batch_size=batch_size,
        candidates=candidates,
        reranker=args.rerank,
        rerank_weight=args.rerank_weight,
        rerank_beams=args.rerank_beams,
    )


def check_rerank_args(args: argparse.Namespace) -> None:
    """The re-ranking flags need --rerank, a `baseline-clip` directory (checked before any model is loaded); a weight
    in [0, 1] and beams >= 1 (a GraceInputError otherwise)."""
    if args.rerank is None:
        if args.rerank_beams is not None or args.rerank_weight is not None or getattr(args, "refit_rerank", False):
            raise GraceInputError("--rerank-beams, --rerank-weight and --refit-rerank need --rerank DENSE_DIR")
        return
    if args.rerank_weight is not None and not 0.0 <= args.rerank_weight <= 1.0:
        raise GraceInputError(f"--rerank-weight must be in [0, 1], got {args.rerank_weight}")
    if args.rerank_beams is not None and args.rerank_beams < 1:
        raise GraceInputError(f"--rerank-beams must be >= 1, got {args.rerank_beams}")
    check_dense_directory(args.rerank)
