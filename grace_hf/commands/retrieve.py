"""`grace-hf retrieve`: ranked images for text queries (or query images), printed; with `--output-dir`, also a results
file and an HTML page of thumbnails.

    grace-hf retrieve --model runs/synthetic-structured --top-k 5 "a red circle" "two green squares"
    grace-hf retrieve --model runs/synthetic-structured --data data/prepared/synthetic-structured --num-queries 8 \\
        --output-dir runs/gallery        # test captions with their gold image marked
    grace-hf retrieve --model runs/synthetic-structured --rerank runs/dense-clip "a red circle"
                                         # the beams' images re-ranked with the dense model (the model's rerank.json)
    grace-hf retrieve --model runs/synthetic-structured --image photo.jpg crop.png [--image-views 4]
                                         # query by image: the images the model memorized that these show
"""

from __future__ import annotations

import json

from grace_hf.commands.common import (
    add_num_threads,
    add_overwrite,
    add_rerank,
    check_directory,
    check_rerank_args,
    command_parser,
    load_retriever,
    setup_threads,
)
from grace_hf.data.images import read_query_image
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.queries import load_eval_queries
from grace_hf.io_utils import atomic_write_text
from grace_hf.model_dir import check_prepared_identifiers
from grace_hf.outputs import RETRIEVAL, check_output_dir, output_directory
from grace_hf.retrieval.results import RetrievedImage
from grace_hf.retrieval.retriever import MAX_IMAGE_VIEWS
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
    parser.add_argument(
        "--image",
        nargs="+",
        default=None,
        metavar="PATH",
        help="query images instead of text queries: find the memorized images they show",
    )
    parser.add_argument(
        "--image-views",
        type=int,
        default=0,
        metavar="N",
        help="with --image: also search N crops of each query image and average the beams' probabilities (N+1x the "
        f"time; at most {MAX_IMAGE_VIEWS})",
    )
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
    if args.image is not None and (args.queries or args.data is not None):
        raise GraceInputError("--image takes the place of text queries: give query images or text queries (or --data)")
    if args.image_views and args.image is None:
        raise GraceInputError("--image-views goes with --image: it searches crops of query images")
    check_directory(args.image_root, "--image-root")
    setup_threads(args)
    inputs = [args.model, args.data, args.image_root, args.rerank, *(args.image or [])]
    if args.output_dir:
        check_output_dir(args.output_dir, RETRIEVAL, inputs, args.overwrite)
    images = [read_query_image(path, path) for path in args.image or []]  # a bad file fails before the model loads
    queries: list[str] = list(args.queries) if args.image is None else [f"image: {path}" for path in args.image]
    gold: list[str | None] = [None] * len(queries)
    candidates = None
    if args.data is not None:
        data_queries, data_gold, candidates = load_eval_queries(args.data, limit=args.num_queries)
        check_prepared_identifiers(args.model, args.data, candidates, "images the test split ranks")
        queries += data_queries
        gold += data_gold
    if not queries:
        raise GraceInputError("no queries: give some on the command line, --image, or --data with --num-queries")
    retriever = load_retriever(args, candidates, args.batch_size)
    if images:
        results = retriever.retrieve(images=images, top_k=args.top_k, image_views=args.image_views)
    else:
        results = retriever.retrieve(queries, top_k=args.top_k)
    for query, key, hits in zip(queries, gold, results):
        _print(query, key, hits)
    if args.output_dir:
        loader = None
        if args.image_root:
            loader = folder_image_loader(args.image_root)
        elif args.data:
            loader = dataset_image_loader(args.data)
        shown = images or [None] * len(queries)
        entries = [GalleryEntry(q, hits, key, image) for q, key, hits, image in zip(queries, gold, results, shown)]
        sources = args.image or [None] * len(queries)
        records = [
            {
                "query": q,
                **({"image": source} if source else {}),
                "gold": key,
                "results": [hit.__dict__ for hit in hits],
            }
            for q, source, key, hits in zip(queries, sources, gold, results)
        ]
        with output_directory(args.output_dir, RETRIEVAL, inputs, args.overwrite, "grace-hf retrieve") as tmp:
            atomic_write_text(tmp / RESULTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            write_gallery(tmp / GALLERY_FILE, entries, load_image=loader, title=f"GRACE retrieval: {args.model}")
        print(f"wrote {args.output_dir}/{RESULTS_FILE} and {GALLERY_FILE}")
    return 0
