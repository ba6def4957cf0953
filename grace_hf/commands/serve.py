"""`grace-hf serve`: a trained retriever in the browser and behind an HTTP API (Gradio; `pip install "grace-hf[app]"`).

    grace-hf serve --model runs/synthetic-structured --data data/prepared/synthetic-structured
    grace-hf serve --model demo_output/model-structured --image-root demo_output/data \\
        --queries demo_output/queries.jsonl --port 7860
    grace-hf serve --model runs/synthetic-structured --data data/prepared/synthetic-structured --rerank runs/dense-clip

Then open http://127.0.0.1:7860, or call the `/search` endpoint with `gradio_client` or plain HTTP (docs/serving.md);
`/search_image` takes an uploaded image instead of a query (query by image; `--image-views N` also searches N crops of
it).
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import socket
from pathlib import Path

from grace_hf.commands.common import (
    add_num_threads,
    add_rerank,
    check_directory,
    check_rerank_args,
    command_parser,
    load_retriever,
    setup_threads,
)
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.queries import load_eval_queries
from grace_hf.model_dir import check_prepared_identifiers
from grace_hf.retrieval.retriever import MAX_IMAGE_VIEWS
from grace_hf.serving.gallery import ImageLoader, dataset_image_loader, folder_image_loader

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("serve", __doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model directory or Hub id")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data", default=None, help="prepared dataset: rank its test images; its test captions are the examples"
    )
    source.add_argument(
        "--queries",
        default=None,
        help="test captions as JSON lines with 'query' and 'gold' (what `grace-hf evaluate` and the demo write)",
    )
    parser.add_argument("--image-root", default=None, help="folder of the image files (default: --data's images)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; the default serves this machine only, 0.0.0.0 exposes the app to the network",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (7860)")
    parser.add_argument("--top-k", type=int, default=5, help="images shown per query at first (at most --num-beams)")
    parser.add_argument(
        "--num-beams",
        type=int,
        default=None,
        help="beams per query: the largest top-k offered (max(10, --top-k); with --rerank: --rerank-beams)",
    )
    parser.add_argument("--length-penalty", type=float, default=0.0, help="see `grace-hf evaluate --help`")
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="waiting queries answered by one generate call (16)"
    )
    parser.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more are refused (64)")
    parser.add_argument("--max-query-chars", type=int, default=1000, help="longer queries are refused (1000)")
    parser.add_argument(
        "--image-views",
        type=int,
        default=0,
        metavar="N",
        help="/search_image also searches N crops of each uploaded image and averages the beams' probabilities "
        f"(N+1x the time; at most {MAX_IMAGE_VIEWS}; see `grace-hf retrieve --help`)",
    )
    add_rerank(parser)
    add_num_threads(parser)
    return parser


def _check_address(host: str, port: int) -> None:
    """`host` is an address of this machine on which `port` is free: a GraceInputError naming the flag otherwise."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise GraceInputError(f"--host {host}: not a host name or address ({err})") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closing port is free
        try:
            probe.bind(address)
        except OSError as err:
            flag = f"--port {port}" if err.errno in (errno.EADDRINUSE, errno.EACCES) else f"--host {host}"
            raise GraceInputError(f"{flag}: cannot listen on {host} port {port} ({err.strerror})") from None


def _image_loader(args: argparse.Namespace) -> ImageLoader | None:
    if args.image_root:
        return folder_image_loader(args.image_root)
    return dataset_image_loader(args.data) if args.data else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `grace-hf serve`: load the retriever, build the app, serve until interrupted."""
    args = build_parser().parse_args(argv)
    check_rerank_args(args)
    check_directory(args.image_root, "--image-root")
    _check_address(args.host, args.port)
    if importlib.util.find_spec("gradio") is None:
        raise GraceInputError('serve needs Gradio: pip install "grace-hf[app]"')
    from grace_hf.serving.app import SearchService, build_app, read_test_captions  # imports gradio (optional)

    setup_threads(args)
    test_captions, candidates = [], None
    if args.data:
        queries, gold, candidates = load_eval_queries(args.data)
        check_prepared_identifiers(args.model, args.data, candidates, "images the test split ranks")
        test_captions = list(zip(queries, gold))
    elif args.queries:
        test_captions = read_test_captions(args.queries)
    retriever = load_retriever(args, candidates, args.max_batch_size)
    service = SearchService(
        retriever,
        load_image=_image_loader(args),
        test_captions=test_captions,
        default_top_k=min(args.top_k, retriever.num_beams),
        max_query_chars=args.max_query_chars,
        image_views=args.image_views,
    )
    app = build_app(
        service,
        title=f"GRACE retrieval: {Path(args.model).name}",
        max_batch_size=args.max_batch_size,
        queue_size=args.queue_size,
    )
    try:
        app.launch(server_name=args.host, server_port=args.port, ssr_mode=False, show_error=True)
    except OSError:  # Gradio found no free port: the address was taken while the model loaded
        _check_address(args.host, args.port)
        raise
    return 0
