"""`grace-hf pseudo-queries`: write pseudo-queries for the val and test images with a trained captioner.

    grace-hf pseudo-queries --model runs/flickr30k-captioner --karpathy-json data/dataset_flickr30k.json \\
        --image-root data/Flickr30K/flickr30k-images --output-dir data/pseudo_queries/flickr30k

`--filter runs/dense-clip` also draws 20 queries per image by sampling and keeps the five that the dense baseline
finds closest to the image (the demo's pseudo-queries). Writes `pseudo_queries.json` in the original format
(`{image file name: [query, ...]}`), which `grace-hf prepare --pseudo-queries` reads (the file or its directory).
"""

from __future__ import annotations

from pathlib import Path

import torch

from grace_hf.commands.common import add_num_threads, add_overwrite, command_parser, setup_threads
from grace_hf.data.captioning import caption_splits
from grace_hf.data.karpathy import MEMORIZED_SPLITS, SPLITS, load_karpathy
from grace_hf.data.pseudo_queries import PSEUDO_QUERIES_FILE
from grace_hf.dense.query_filter import PROPOSED_SAMPLES, PROPOSED_TOP_K, DenseQueryFilter
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.captions import write_captioner_output
from grace_hf.model_dir import read_captioner
from grace_hf.outputs import PSEUDO_QUERIES, check_output_dir, output_directory


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("pseudo-queries", __doc__.split("\n\n")[0], renamed={"--output": "--output-dir"})
    parser.add_argument("--model", required=True, help="a captioner directory trained with `task: captioner`")
    parser.add_argument("--karpathy-json", required=True, help="dataset_flickr30k.json, dataset_coco.json, ...")
    parser.add_argument("--image-root", required=True, help="directory the image keys (filepath/filename) are under")
    parser.add_argument("--output-dir", required=True, help=f"where {PSEUDO_QUERIES_FILE} is written")
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=SPLITS,
        default=[s for s in MEMORIZED_SPLITS if s != "train"],
        help="the splits whose images get pseudo-queries",
    )
    parser.add_argument("--num-queries", type=int, default=5, help="queries per image (beams returned)")
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument(
        "--num-sampled",
        type=int,
        default=None,
        help=f"more queries per image drawn by top-k sampling (at most 100; default: 0, beams only, or with --filter "
        f"{PROPOSED_SAMPLES})",
    )
    parser.add_argument(
        "--top-k", type=int, default=PROPOSED_TOP_K, help="with --num-sampled: sample among the k likeliest tokens"
    )
    parser.add_argument("--seed", type=int, default=0, help="with --num-sampled: the sampling seed")
    parser.add_argument(
        "--filter",
        metavar="DENSE_DIR",
        default=None,
        help="a `baseline-clip` directory: of each image's queries (beams and samples), keep the --keep its dense "
        "model finds closest to the image",
    )
    parser.add_argument("--keep", type=int, default=5, help="with --filter: queries kept per image")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_num_threads(parser)
    add_overwrite(parser)
    args = parser.parse_args(argv)
    setup_threads(args)
    inputs = [args.model, args.karpathy_json, args.image_root, args.filter]
    check_output_dir(args.output_dir, PSEUDO_QUERIES, inputs, args.overwrite)
    if args.num_queries > args.num_beams:
        raise GraceInputError(f"--num-queries ({args.num_queries}) cannot exceed --num-beams ({args.num_beams})")

    corpus = load_karpathy(args.karpathy_json, args.image_root)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise GraceInputError(f"--device {args.device}: no CUDA GPU is available here; pass --device cpu")
    captioner = read_captioner(args.model, "--model")
    query_filter = DenseQueryFilter.from_directory(args.filter, args.keep) if args.filter else None
    queries = caption_splits(
        captioner.model.to(args.device),
        captioner.processor,
        corpus,
        args.splits,
        num_queries=args.num_queries,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        num_sampled=args.num_sampled if args.num_sampled is not None else PROPOSED_SAMPLES if args.filter else 0,
        top_k=args.top_k,
        seed=args.seed,
        query_filter=query_filter,
    )
    with output_directory(args.output_dir, PSEUDO_QUERIES, inputs, args.overwrite, "grace-hf pseudo-queries") as tmp:
        quality = write_captioner_output(tmp, corpus, queries)
    if quality is not None:
        print(
            f"BLEU-4 of the first pseudo-query against the {quality['num_images']} val images' captions: "
            f"{quality['bleu4']:.1f}"
        )
    empty = sum(not texts for texts in queries.values())
    path = Path(args.output_dir) / PSEUDO_QUERIES_FILE
    print(f"wrote {path}: {len(queries)} images" + (f", {empty} without a usable query" if empty else ""))
    return 0
