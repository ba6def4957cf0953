"""Query by image: top-1 of finding a memorized image from a perturbed copy, GRACE beside the dense baseline.

    python benchmarks/image_query.py --work-dir runs/image-query                 # trains everything first
    python benchmarks/image_query.py --work-dir runs/image-query \\
        --model runs/model-rq --dense runs/dense-clip --data runs/prepared-rq     # a model trained with i2id

The model memorized each image by writing its identifier after `<image>` (the i2id task), so an image can be the
query: `GraceRetriever.retrieve(images=...)` decodes `<image>` with the copy's pixels under the identifier trie. Each
memorized image of the prepared dataset's i2id split gets one perturbed copy (a random crop keeping 75-95% of each
side, resized back to the original size, re-encoded as JPEG of quality 50-90; one fixed seed), and every copy ranks
the same candidates (default: every memorized image; `--candidates test`: the model's collection, the test images):
- GRACE: the trie-constrained beam search alone (`--image-views N`: over each copy and N crops of it, the beams'
  probabilities averaged: `retrieve(images=..., image_views=N)`);
- dense: the dense baseline's image tower, cosine between the copy and each candidate's saved embedding (its
  `image_features.safetensors`);
- patch tokens: the cosine of the model's own vision-tower patch tokens, flattened (what the Flamingo reads of an
  image, matched by nearest neighbour instead of memorized);
- pixels: the L2 distance of 3x3 RGB thumbnails, the simplest ranking that could find a copy.
The table gives top-1 and top-5 (%) on the copies, GRACE's top-1 as a ratio of the dense one, and top-1 on the
unperturbed images (what the model memorized; the dense cosine finds them by construction).

Without `--model`, the script writes a synthetic collection, trains the dense baseline (the vision tower, as the demo
trains it: captions and views of its images) and then
the tiny Flamingo with `recipes/synthetic/<kind>.yaml` (default rq, from the tower's embeddings, as in the demo) on
the memorization task alone, every image's pixels -> its identifier (`--max-steps` of 32 images; no text reaches
it), in the work directory, on the recipe's threads (`--num-threads`: others). Each step shows the images in changed
views (`--crop-scale`, `--jpeg-quality`, `--original-share`: the training flags `--i2id-crop-scale`,
`--i2id-jpeg-quality`, `--i2id-original-share`; a quarter of the rows keep their exact pixels by default;
`--crop-scale 1 --jpeg-quality 0` memorizes the exact pixels only). The views are of the same family as the copies
(crops and JPEG), wider, and drawn from the training seed, never from the copies' seed.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `python benchmarks/<name>.py`
from benchmarks.common import finish_work_dir, open_work_dir
from grace_hf.retrieval.retriever import MAX_IMAGE_VIEWS, check_image_views

if TYPE_CHECKING:
    from grace_hf.retrieval import GraceRetriever

# image queries need the memorization task (image -> identifier) only: text queries are not measured here
MEMORIZE_ONLY = ("--loss-weight-i2id", "1", "--loss-weight-t2id", "0", "--batch-size-i2id", "32")
THUMBNAIL_SIDE = 3  # the side of the pixel baseline's thumbnails (chosen on another seed's data: docs/serving.md)
LABELS = {
    "grace": "GRACE (`<image>` under the trie)",
    "dense": "dense image-image cosine",
    "tokens": "nearest patch tokens of the model's vision tower",
    "pixels": f"nearest {THUMBNAIL_SIDE}x{THUMBNAIL_SIDE} RGB thumbnail",
}
ORIGINAL_SHARE = 0.25  # i2id rows shown with their exact pixels (chosen on another seed's data: docs/serving.md)


def memorize_flags(crop_scale: float, jpeg_quality: int, original_share: float) -> tuple[str, ...]:
    """The training flags of the memorization task with these i2id views."""
    views = ("--i2id-crop-scale", str(crop_scale), "--i2id-jpeg-quality", str(jpeg_quality))
    return (*MEMORIZE_ONLY, *views, "--i2id-original-share", str(original_share))


def perturb(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop keeping 75-95% of each side, resized back to the image's size, re-encoded as JPEG (50-90)."""
    image = image.convert("RGB")
    width, height = image.size
    crop_w, crop_h = round(width * rng.uniform(0.75, 0.95)), round(height * rng.uniform(0.75, 0.95))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    copy = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    copy.save(buffer, "JPEG", quality=rng.randint(50, 90))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def memorized_images(data: Path, keys: set[str] | None) -> dict[str, Image.Image]:
    """The images of the prepared dataset's i2id split (one per key; only `keys` when given), in split order."""
    from grace_hf.data.prepared import load_prepared

    split = load_prepared(data)["i2id"]
    images: dict[str, Image.Image] = {}
    for row, key in enumerate(split["image_key"]):
        if key not in images and (keys is None or key in keys):
            images[key] = split[row]["image"]
    return images


def top_k_hits(rankings: list[list[str]], gold: list[str], k: int) -> float:
    """The share of queries whose gold image is among the first `k` of its ranking."""
    return sum(g in ranking[:k] for ranking, g in zip(rankings, gold)) / len(gold)


def dense_rankings(dense: Path, copies: list[Image.Image], candidates: list[str], k: int) -> list[list[str]]:
    """The top `k` candidates of each copy by the dense image-image cosine."""
    from grace_hf.retrieval.rerank import DenseScorer

    scorer = DenseScorer.from_directory(dense)
    scorer.check_covers(candidates, "the candidates")
    rows = scorer.features[[scorer.image_keys.index(key) for key in candidates]]  # (N, D)
    cosines = scorer.encode_queries(copies) @ rows.T  # (Q, N)
    return [[candidates[i] for i in row] for row in cosines.topk(min(k, len(candidates)), dim=1).indices.tolist()]


def thumbnail_rankings(
    originals: list[Image.Image], copies: list[Image.Image], candidates: list[str], k: int
) -> list[list[str]]:
    """The top `k` candidates of each copy by the L2 distance of RGB thumbnails (`THUMBNAIL_SIDE` pixels a side):
    the simplest ranking that could find a copy, no learning at all."""
    import numpy as np
    import torch

    from grace_hf.identifiers.embeddings import image_thumbnail

    def thumbnails(images: list[Image.Image]) -> torch.Tensor:
        rows = [image_thumbnail(image, THUMBNAIL_SIDE, Image.Resampling.BILINEAR) for image in images]
        return torch.from_numpy(np.stack(rows))

    distances = torch.cdist(thumbnails(copies), thumbnails(originals))  # (Q, N)
    top = distances.topk(min(k, len(candidates)), dim=1, largest=False).indices
    return [[candidates[i] for i in row] for row in top.tolist()]


def patch_token_rankings(
    retriever: GraceRetriever, originals: list[Image.Image], copies: list[Image.Image], candidates: list[str], k: int
) -> list[list[str]]:
    """The top `k` candidates of each copy by the cosine of the model's vision-tower patch tokens, flattened: what
    the Flamingo reads of an image, matched by nearest neighbour instead of memorized."""
    import torch

    tower = retriever.model.model.vision_model

    @torch.no_grad()
    def tokens(images: list[Image.Image]) -> torch.Tensor:
        pixels = retriever.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        parameter = next(tower.parameters())
        pixels = pixels.reshape(-1, *pixels.shape[-3:]).to(device=parameter.device, dtype=parameter.dtype)
        return torch.nn.functional.normalize(tower(pixels)[1].flatten(1).float(), dim=1)

    top = (tokens(copies) @ tokens(originals).T).topk(min(k, len(candidates)), dim=1).indices
    return [[candidates[i] for i in row] for row in top.tolist()]


def train(
    work: Path,
    kind: str,
    num_images: int,
    seed: int,
    max_steps: int,
    views: tuple[str, ...],
    threads: int | None,
    every_image: bool = False,
) -> tuple[Path, Path, Path]:
    """Synthetic data, the dense baseline (the vision tower; `every_image`: its image-image term over every memorized
    image) and a model that memorized every image from its pixels alone (i2id only, `views`: its training flags; no
    text reaches it; `threads`: its torch threads, None: the recipe's), as the demo makes them: (model, dense,
    prepared)."""
    from grace_hf.commands.demo import train_kind
    from grace_hf.data.synthetic import SYNTHETIC_JSON, write_synthetic
    from grace_hf.dense.training import DenseTrainingArgs, run_baseline

    data, dense = work / "data", work / "dense-clip"
    print(f"==> {num_images} synthetic images (seed {seed}) -> {data}", flush=True)
    write_synthetic(data, num_images, seed, overwrite=True)
    print(f"==> dense baseline on the train images -> {dense}", flush=True)
    run_baseline(data / SYNTHETIC_JSON, data, dense, args=DenseTrainingArgs(every_image=every_image), overwrite=True)
    model = train_kind(
        kind, work, data / SYNTHETIC_JSON, data, None, dense, max_steps, overrides=views, num_threads=threads
    )
    return model, dense, work / f"prepared-{kind}"


def measure(
    model: Path, dense: Path, data: Path, candidates: str, seed: int, batch_size: int, image_views: int = 0
) -> dict[str, Any]:
    """Top-1/top-5 of GRACE (searching `image_views` crops of each copy too) and of the dense cosine over the same
    perturbed copies and candidates."""
    from grace_hf.errors import GraceInputError
    from grace_hf.retrieval import GraceRetriever

    retriever = GraceRetriever.from_pretrained(model, num_beams=10, batch_size=batch_size)
    originals = memorized_images(data, None if candidates == "all" else set(retriever.candidates))
    if candidates == "all":
        retriever = retriever.for_candidates(list(originals))
    elif len(originals) < len(retriever.candidates):
        missing = sorted(set(retriever.candidates) - set(originals))
        raise GraceInputError(f"{data}: its i2id split lacks {len(missing)} candidate images (e.g. {missing[0]!r})")
    gold = list(originals)
    rng = random.Random(seed)
    copies = [perturb(originals[key], rng) for key in gold]
    rank = {
        "grace": lambda images: [
            [hit.image_key for hit in hits]
            for hits in retriever.retrieve(images=images, top_k=5, image_views=image_views)
        ],
        "dense": lambda images: dense_rankings(dense, images, retriever.candidates, 5),
        "tokens": lambda images: patch_token_rankings(retriever, list(originals.values()), images, gold, 5),
        "pixels": lambda images: thumbnail_rankings(list(originals.values()), images, gold, 5),
    }
    result: dict[str, Any] = {"queries": len(gold), "candidates": len(retriever.candidates)}
    for name, ranking in rank.items():
        start = time.perf_counter()
        on_copies = ranking(copies)
        seconds = time.perf_counter() - start
        on_originals = ranking(list(originals.values()))
        result[name] = {1: top_k_hits(on_copies, gold, 1), 5: top_k_hits(on_copies, gold, 5)}
        result[name].update(originals=top_k_hits(on_originals, gold, 1), seconds=seconds)
    return result


def table(result: dict[str, Any]) -> str:
    """The markdown table of `measure`'s result."""
    dense_top1 = result["dense"][1]
    rows = [
        "| method | copies top-1 % | copies top-5 % | top-1 / dense | originals top-1 % | seconds (copies) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, label in LABELS.items():
        figures = result[name]
        ratio = f"{figures[1] / dense_top1:.2f}x" if dense_top1 else "n/a"
        rows.append(
            f"| {label} | {100 * figures[1]:.1f} | {100 * figures[5]:.1f} | {ratio} | "
            f"{100 * figures['originals']:.1f} | {figures['seconds']:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="runs/image-query", help="results (and what is trained) go here")
    parser.add_argument("--model", type=Path, default=None, help="a trained model directory (else: train one)")
    parser.add_argument("--dense", type=Path, default=None, help="with --model: its `baseline-clip` directory")
    parser.add_argument("--data", type=Path, default=None, help="with --model: its prepared dataset")
    parser.add_argument("--kind", default="rq", help="training: identifier kind (the demo's: rq)")
    parser.add_argument("--num-images", type=int, default=500, help="training: synthetic images")
    parser.add_argument(
        "--max-steps", type=int, default=24000, help="training: optimizer steps (i2id, 32 images; chosen on seed 3)"
    )
    parser.add_argument("--crop-scale", type=float, default=0.7, help="training: i2id crops keep >= this of a side")
    parser.add_argument("--jpeg-quality", type=int, default=40, help="training: i2id JPEG quality from this to 95")
    parser.add_argument(
        "--original-share", type=float, default=ORIGINAL_SHARE, help="training: i2id rows shown unchanged"
    )
    parser.add_argument(
        "--num-threads", type=int, default=None, help="training: torch threads (default: the recipe's)"
    )
    parser.add_argument(
        "--every-image",
        action="store_true",
        help="training: the tower's image-image term over every memorized image (`baseline-clip --every-image`)",
    )
    parser.add_argument("--candidates", choices=("all", "test"), default="all", help="every memorized image, or test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of the perturbations")
    parser.add_argument("--batch-size", type=int, default=32, help="image queries per search")
    parser.add_argument(
        "--image-views",
        type=int,
        default=0,
        help=f"GRACE also searches this many crops of each copy (at most {MAX_IMAGE_VIEWS})",
    )
    args = parser.parse_args(argv)
    given = [args.model, args.dense, args.data]
    if any(given) and not all(given):
        parser.error("--model, --dense and --data go together (or none of them: train)")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num-threads must be >= 1, got {args.num_threads}")
    from grace_hf.errors import GraceInputError
    from grace_hf.training.views import ImageViews

    try:
        check_image_views(args.image_views, "--image-views")
    except GraceInputError as error:
        parser.error(str(error))
    try:
        ImageViews(crop_scale=args.crop_scale, jpeg_quality=args.jpeg_quality, original_share=args.original_share)
    except ValueError as error:
        parser.error(f"--crop-scale/--jpeg-quality/--original-share: {error}")

    output = open_work_dir(parser, args.work_dir, reuse=False, inputs=given)  # none of them in it
    work = output.build.resolve()  # built beside --work-dir, which it becomes at the end
    try:
        if args.model is None:
            views = memorize_flags(args.crop_scale, args.jpeg_quality, args.original_share)
            args.model, args.dense, args.data = train(
                work, args.kind, args.num_images, args.seed, args.max_steps, views, args.num_threads, args.every_image
            )
        result = measure(
            args.model, args.dense, args.data, args.candidates, args.seed, args.batch_size, args.image_views
        )
    except GraceInputError as error:
        output.abandon()
        parser.error(str(error))
    text = table(result)
    model = output.path / args.model.relative_to(work) if args.model.is_relative_to(work) else args.model
    heading = (
        f"Perturbed copies of {result['queries']} memorized images ranking {result['candidates']} candidates "
        f"(seed {args.seed}; model {model}; GRACE searches each image and {args.image_views} crops of it):"
    )
    (work / "image_query.md").write_text(f"{heading}\n\n{text}\n")
    print(f"\n{heading}\n\n{text}")
    finish_work_dir(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
