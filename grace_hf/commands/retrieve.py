"""`grace-hf retrieve`: ranked images for text queries, printed; with `--output-dir`, also a results file and an HTML
page of thumbnails.

    grace-hf retrieve --model runs/synthetic-structured --top-k 5 "a red circle" "two green squares"
    grace-hf retrieve --model runs/synthetic-structured --data data/prepared/synthetic-structured --num-queries 8 \\
        --output-dir runs/gallery        # test captions with their gold image marked
    grace-hf retrieve --model runs/synthetic-structured --rerank runs/dense-clip "a red circle"
                                         # the beams' images re-ranked with the dense model (the model's rerank.json)
"""

from __future__ import annotations

import json

from grace_hf.commands.common import (
    add_num_threads,
    add_overwrite,
    add_rerank,
    check_rerank_args,
    command_parser,
    load_retriever,
    setup_threads,
)
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.queries import load_eval_queries
from grace_hf.io_utils import atomic_write_text
from grace_hf.outputs import RETRIEVAL, check_output_dir, output_directory
from grace_hf.retrieval.results import RetrievedImage
from grace_hf.serving.gallery import (
    GALLERY_FILE,
    GalleryEntry,
    dataset_image_loader,
    folder_image_loader,
    write_gallery,
)

RESULTS_FILE = "results.jsonl"


def build_parser():
    parser = command_parser("retrieve", __doc__.split("\n\n")[0], renamed={"--html": "--output-dir"})
    parser.add_argument("queries", nargs="*", help="text queries")
    parser.add_argument("--model", required=True, help="trained model directory or Hub id")
    parser.add_argument("--top-k", type=int, default=10, help="images per query (at most --num-beams)")
    parser.add_argument(
        "--num-beams",
        type=int,
        default=None,
        help="beams per query (default: max(10, top-k); with --rerank: --rerank-beams)",
    )
    parser.add_argument("--length-penalty", type=float, default=0.0, help="see `grace-hf evaluate --help`")
    parser.add_argument("--batch-size", type=int, default=16, help="queries per generate call")
    parser.add_argument(
        "--data", default=None, help="prepared dataset: rank its test images, take queries (with gold) from it"
    )
    parser.add_argument("--num-queries", type=int, default=8, help="with --data: how many of its queries")
    parser.add_argument("--image-root", default=None, help="folder of the image files, for thumbnails")
    parser.add_argument("--output-dir", default=None, help="also write results.jsonl and gallery.html here")
    add_rerank(parser)
    add_num_threads(parser)
    add_overwrite(parser)
    return parser


def _print(query: str, gold: str | None, hits: list[RetrievedImage]) -> None:
    print(f"query: {query}" + (f"   [gold: {gold}]" if gold else ""))
    for rank, hit in enumerate(hits, start=1):
        mark = "  <- gold" if hit.image_key == gold else ""
        print(f"  {rank:>2}. {hit.image_key}  id {hit.identifier}  score {hit.score:.3f}{mark}")
    if not hits:
        print("  (no identifier was generated)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_rerank_args(args)
    setup_threads(args)
    inputs = [args.model, args.data, args.image_root]
    if args.output_dir:
        check_output_dir(args.output_dir, RETRIEVAL, inputs, args.overwrite)
    queries: list[str] = list(args.queries)
    gold: list[str | None] = [None] * len(queries)
    candidates = None
    if args.data is not None:
        data_queries, data_gold, candidates = load_eval_queries(args.data, limit=args.num_queries)
        queries += data_queries
        gold += data_gold
    if not queries:
        raise GraceInputError("no queries: give some on the command line, or --data with --num-queries")
    retriever = load_retriever(args, candidates, args.batch_size)
    results = retriever.retrieve(queries, top_k=args.top_k)
    for query, key, hits in zip(queries, gold, results):
        _print(query, key, hits)
    if args.output_dir:
        loader = None
        if args.image_root:
            loader = folder_image_loader(args.image_root)
        elif args.data:
            loader = dataset_image_loader(args.data)
        entries = [GalleryEntry(q, hits, key) for q, key, hits in zip(queries, gold, results)]
        records = [
            {"query": q, "gold": key, "results": [hit.__dict__ for hit in hits]}
            for q, key, hits in zip(queries, gold, results)
        ]
        with output_directory(args.output_dir, RETRIEVAL, inputs, args.overwrite, "grace-hf retrieve") as tmp:
            atomic_write_text(tmp / RESULTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            write_gallery(tmp / GALLERY_FILE, entries, load_image=loader, title=f"GRACE retrieval: {args.model}")
        print(f"wrote {args.output_dir}/{RESULTS_FILE} and {GALLERY_FILE}")
    return 0
