"""Throughput and latency of `grace-hf serve` under load: 1 client, then 8 concurrent clients, side by side.

Each client sends its queries one after another over the app's plain HTTP API (loopback); the app's queue gathers
the queries waiting at each moment into one `retrieve` call (`--max-batch-size`), so throughput should grow with the
number of clients. The same 8 clients against an app that batches nothing (`--max-batch-size 1`) show what the
batching is worth. Without `--model`, a random tiny Flamingo over `--num-images` synthetic images is served
(latency does not depend on training).

    python benchmarks/serve_load.py [--model DIR --image-root ROOT] [--queries-per-client 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python benchmarks/<name>.py`
from benchmarks.serve_clients import LoadRun, run_clients, serve_subprocess
from benchmarks.tiny_model import save_random_model_dir
from grace_hf.data.synthetic import SYNTHETIC_JSON, write_synthetic


def random_model(root: Path, num_images: int) -> tuple[Path, Path, list[str]]:
    """A random tiny model directory over `num_images` synthetic images (numeric identifiers, every image a
    candidate); returns it, the image root and the images' captions (the queries)."""
    write_synthetic(root / "data", num_images, seed=0)
    images = json.loads((root / "data" / SYNTHETIC_JSON).read_text())["images"]
    keys = [f"{image['filepath']}/{image['filename']}" for image in images]
    captions = [sentence["raw"] for image in images for sentence in image["sentences"]]
    identifiers = {key: [" ".join(str(n))] for n, key in enumerate(keys)}
    save_random_model_dir(root / "model", identifiers, captions, keys, vocab_size=500)
    return root / "model", root / "data", captions


def measure(argv: list[str], clients: int, queries: list[str], per_client: int, top_k: int) -> LoadRun:
    """Start the app with `argv`, warm it up, run `clients` concurrent clients of `per_client` queries each."""
    requests = [[(queries[(97 * c + i) % len(queries)], top_k) for i in range(per_client)] for c in range(clients)]
    with serve_subprocess(argv, env={"OMP_NUM_THREADS": "1"}) as url:
        run_clients(url, [requests[0][:3]])  # first calls pay for lazy set-up (thumbnails, caches)
        return run_clients(url, requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a trained model directory (default: a random tiny one)")
    parser.add_argument("--image-root", default=None, help="its images, for the thumbnails")
    parser.add_argument("--num-images", type=int, default=100, help="images of the random model (100)")
    parser.add_argument("--queries-per-client", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            model_dir, image_root, queries = random_model(Path(tmp), args.num_images)
        else:
            model_dir, image_root = Path(args.model), args.image_root
            queries = [f"a {size} {color} shape" for size in ("small", "big") for color in ("red", "blue", "green")]
        argv = ["--model", str(model_dir), "--num-threads", str(args.threads), "--queue-size", "256"]
        argv += ["--image-root", str(image_root)] if image_root else []
        rows = []
        for clients, batch in ((1, args.max_batch_size), (8, args.max_batch_size), (8, 1)):
            run = measure(
                [*argv, "--max-batch-size", str(batch)], clients, queries, args.queries_per_client, args.top_k
            )
            rows.append((clients, batch, run))
            print(f"{clients} clients, max batch {batch}: {run.queries_per_second:.1f} queries/s", flush=True)

    print(f"\n{args.queries_per_client} queries per client, top-{args.top_k}, {args.threads} torch thread(s)\n")
    print("| clients | max batch | queries | queries/s | p50 latency (ms) | p95 latency (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for clients, batch, run in rows:
        print(
            f"| {clients} | {batch} | {len(run.latencies)} | {run.queries_per_second:.1f} | "
            f"{run.latency_ms(50):.0f} | {run.latency_ms(95):.0f} |"
        )
    (_, _, one), (_, _, eight), (_, _, unbatched) = rows
    print(
        f"\n8 clients vs 1: throughput x{eight.queries_per_second / one.queries_per_second:.2f}, "
        f"p50 latency x{eight.latency_ms(50) / one.latency_ms(50):.2f}, "
        f"p95 latency x{eight.latency_ms(95) / one.latency_ms(95):.2f}"
    )
    print(
        f"8 clients, batching vs none: throughput x{eight.queries_per_second / unbatched.queries_per_second:.2f}, "
        f"p50 latency x{eight.latency_ms(50) / unbatched.latency_ms(50):.2f}"
    )


if __name__ == "__main__":
    main()
