"""What every command's parser shares: one flag spelling (kebab-case), clear messages for renamed flags, threads."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from grace_hf.dense.directory import check_dense_directory
from grace_hf.errors import GraceInputError, renamed_flag
from grace_hf.runtime import configure_threads

if TYPE_CHECKING:
    from grace_hf.retrieval.retriever import GraceRetriever

__all__ = [
    "add_num_threads",
    "add_overwrite",
    "add_rerank",
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


def command_parser(
    command: str, description: str, renamed: Mapping[str, str] | None = None, epilog: str | None = None
) -> argparse.ArgumentParser:
    """The parser of `grace-hf <command>`; `renamed` maps old flags to their new spelling (hidden from --help)."""
    parser = argparse.ArgumentParser(
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


def add_num_threads(parser: argparse.ArgumentParser) -> None:
    """`--num-threads N`: torch CPU threads (default: half the cores, at most 8; 1 on a 2-core machine)."""
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: half the cores this process may use, at most 8)",
    )


def setup_threads(args: argparse.Namespace) -> None:
    """Apply `--num-threads` (a GraceInputError below 1)."""
    if args.num_threads is not None and args.num_threads < 1:
        raise GraceInputError(f"--num-threads must be >= 1, got {args.num_threads}")
    configure_threads(args.num_threads)


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
    from grace_hf.retrieval.retriever import GraceRetriever  # the model stack: only the commands that search

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
