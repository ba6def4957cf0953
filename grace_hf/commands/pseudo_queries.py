"""`grace-hf pseudo-queries`: write pseudo-queries for the val and test images with a trained captioner.

    grace-hf pseudo-queries --model runs/flickr30k-captioner --karpathy-json data/dataset_flickr30k.json \\
        --image-root data/Flickr30K/flickr30k-images --output-dir data/pseudo_queries/flickr30k

Writes `pseudo_queries.json` in the original format (`{image file name: [query, ...]}`), which
`grace-hf prepare --pseudo-queries` reads (the file or its directory).
"""

from __future__ import annotations

from pathlib import Path

import torch

from grace_hf.commands.common import add_num_threads, add_overwrite, command_parser, setup_threads
from grace_hf.data.captioning import caption_splits
from grace_hf.data.karpathy import MEMORIZED_SPLITS, SPLITS, load_karpathy
from grace_hf.data.pseudo_queries import PSEUDO_QUERIES_FILE
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
        default=0,
        help="more queries per image drawn by top-k sampling (0: beams only; at most 100)",
    )
    parser.add_argument("--top-k", type=int, default=3, help="with --num-sampled: sample among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=0, help="with --num-sampled: the sampling seed")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_num_threads(parser)
    add_overwrite(parser)
    args = parser.parse_args(argv)
    setup_threads(args)
    inputs = [args.model, args.karpathy_json, args.image_root]
    check_output_dir(args.output_dir, PSEUDO_QUERIES, inputs, args.overwrite)
    if args.num_queries > args.num_beams:
        raise GraceInputError(f"--num-queries ({args.num_queries}) cannot exceed --num-beams ({args.num_beams})")

    corpus = load_karpathy(args.karpathy_json, args.image_root)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise GraceInputError(f"--device {args.device}: no CUDA GPU is available here; pass --device cpu")
    captioner = read_captioner(args.model, "--model")
    queries = caption_splits(
        captioner.model.to(args.device),
        captioner.processor,
        corpus,
        args.splits,
        num_queries=args.num_queries,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        num_sampled=args.num_sampled,
        top_k=args.top_k,
        seed=args.seed,
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
