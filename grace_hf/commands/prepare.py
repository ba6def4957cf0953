"""`grace-hf prepare`: Karpathy JSON + images (+ pseudo-queries) -> identifiers -> a prepared dataset directory.

    grace-hf prepare --karpathy-json data/synthetic/dataset_synthetic.json --image-root data/synthetic \\
        --pseudo-queries data/synthetic/pseudo_queries.json --identifier-kind structured --pixel-features \\
        --output-dir data/prepared/synthetic-structured
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from grace_hf.commands.common import add_num_threads, add_overwrite, command_parser, setup_threads
from grace_hf.data.prepared import PREPARE_FILE, push_prepared_to_hub, warn_images_without_queries
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import CODEBOOKS_FILE, IDENTIFIER_KINDS, IDENTIFIERS_FILE, get_identifier_kind
from grace_hf.training.preparation import prepare


def add_identifier_options(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per option of any identifier kind (each kind refuses the options it does not take); returns their
    names."""
    group = parser.add_argument_group("identifier options (each kind takes its own; the others are refused)")
    takers: dict[str, list[str]] = {}
    fields: dict[str, tuple[dataclasses.Field, type]] = {}
    for name in IDENTIFIER_KINDS:
        options = get_identifier_kind(name).options
        hints = typing.get_type_hints(options)
        for option in dataclasses.fields(options):
            takers.setdefault(option.name, []).append(name)
            fields.setdefault(option.name, (option, hints[option.name]))
    for name, (option, hint) in fields.items():
        flag = f"--{name.replace('_', '-')}"
        text = f"{option.metadata.get('help', '')} ({', '.join(takers[name])}; default {option.default})"
        if hint is bool:
            group.add_argument(flag, action="store_const", const=True, default=None, help=text)
        else:
            value_type = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            group.add_argument(flag, type=value_type, default=None, help=text)
    return list(fields)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("prepare", __doc__.split("\n\n")[0], renamed={"--identifier": "--identifier-kind"})
    parser.add_argument("--karpathy-json", required=True, help="dataset_flickr30k.json, dataset_coco.json, ...")
    parser.add_argument("--image-root", required=True, help="directory the image keys (filepath/filename) are under")
    parser.add_argument("--identifier-kind", required=True, help=f"one of {', '.join(IDENTIFIER_KINDS)}")
    parser.add_argument("--output-dir", required=True, help="the prepared dataset directory to write")
    parser.add_argument("--pseudo-queries", default=None, help="JSON {image file name: [query, ...]}")
    parser.add_argument("--num-workers", type=int, default=None, help="threads checking and reading images")
    parser.add_argument("--skip-image-check", action="store_true", help="do not decode every image first")
    parser.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="also push the result to this dataset repo"
    )
    add_overwrite(parser)
    add_num_threads(parser)
    option_names = add_identifier_options(parser)
    args = parser.parse_args(argv)
    setup_threads(args)

    options = {name: getattr(args, name) for name in option_names if getattr(args, name) is not None}
    record = prepare(
        args.karpathy_json,
        args.image_root,
        args.identifier_kind,
        args.output_dir,
        pseudo_queries=args.pseudo_queries,
        num_workers=args.num_workers,
        check_images=not args.skip_image_check,
        overwrite=args.overwrite,
        **options,
    )
    counts = record["counts"]
    warn_images_without_queries(counts, args.karpathy_json, "memorized images", "--pseudo-queries")
    print(
        f"wrote {args.output_dir}: i2id {counts['i2id_rows']}, t2id {counts['t2id_rows']}, "
        f"queries {counts['eval_queries']}, val_queries {counts['val_queries']}, "
        f"collection {counts['collection_images']}"
    )
    if args.push_to_hub:
        side_files = [IDENTIFIERS_FILE, PREPARE_FILE, CODEBOOKS_FILE]
        try:
            push_prepared_to_hub(
                args.output_dir,
                args.push_to_hub,
                [name for name in side_files if (Path(args.output_dir) / name).is_file()],
            )
        except Exception as err:  # offline, no token, no such namespace: the dataset is written all the same
            raise GraceInputError(
                f"--push-to-hub {args.push_to_hub}: the dataset is saved in {args.output_dir}, but pushing it "
                f"failed: {type(err).__name__}: {err}"
            ) from None
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0
