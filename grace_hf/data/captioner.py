"""`grace-hf pseudo-queries`: write pseudo-queries for the images that have no training captions (DESIGN.md §3).

As the original: a Flamingo fine-tuned on train image -> caption pairs (`task: captioner`, e.g.
`recipes/flickr30k/captioner.yaml`) writes, for every val and test image, five queries by beam search (5 beams,
5 returned, at most 20 new tokens) after the prompt `<image>caption:`. The output is the original file format,
`{image_file_name: [query, ...]}`, which `grace-hf prepare --pseudo-queries` reads.

    grace-hf pseudo-queries --model runs/flickr30k-captioner --karpathy-json data/dataset_flickr30k.json \\
        --image-root data/Flickr30K/flickr30k-images --output data/flickr30k_pseudo_queries.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from grace_hf.data.collate import caption_prompt
from grace_hf.data.karpathy import MEMORIZED_SPLITS, KarpathyImage, load_karpathy
from grace_hf.data.pseudo_queries import write_pseudo_queries
from grace_hf.errors import GraceInputError
from grace_hf.models.flamingo import FlamingoForConditionalGeneration, FlamingoProcessor

__all__ = ["generate_pseudo_queries", "main"]


@torch.no_grad()
def generate_pseudo_queries(
    model: FlamingoForConditionalGeneration,
    processor: FlamingoProcessor,
    images: Sequence[KarpathyImage],
    num_queries: int = 5,
    num_beams: int = 5,
    max_new_tokens: int = 20,
    batch_size: int = 8,
) -> dict[str, list[str]]:
    """`{image_key: [query, ...]}`: the `num_queries` (<= `num_beams`) best beams per image, stripped, empty or
    repeated ones dropped."""
    model.eval()
    device = next(model.parameters()).device
    queries: dict[str, list[str]] = {}
    for start in tqdm(range(0, len(images), batch_size), desc="pseudo-queries"):
        chunk = images[start : start + batch_size]
        pictures = []
        for image in chunk:
            with Image.open(image.path) as picture:
                pictures.append(picture.convert("RGB"))
        inputs = processor(text=[caption_prompt()] * len(chunk), images=pictures, padding_side="left").to(device)
        sequences = model.generate(
            **inputs,
            num_beams=num_beams,
            num_return_sequences=num_queries,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=processor.end_of_chunk_token_id,
            pad_token_id=processor.pad_token_id,
        )  # (B * num_queries, prompt + new)
        texts = processor.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for position, image in enumerate(chunk):
            beams = [text.strip() for text in texts[position * num_queries : (position + 1) * num_queries]]
            queries[image.key] = list(dict.fromkeys(text for text in beams if text))
    return queries


def _file_names(images: Sequence[KarpathyImage]) -> dict[str, str]:
    """image key -> the name the original file uses (the file name; the key where file names repeat)."""
    counts = Counter(image.filename for image in images)
    return {image.key: image.filename if counts[image.filename] == 1 else image.key for image in images}


def main(argv: list[str] | None = None) -> int:
    """`grace-hf pseudo-queries --model C --karpathy-json J --image-root R --output P`."""
    parser = argparse.ArgumentParser(prog="grace-hf pseudo-queries", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a captioner directory trained with `task: captioner`")
    parser.add_argument("--karpathy-json", required=True, help="dataset_flickr30k.json, dataset_coco.json, ...")
    parser.add_argument("--image-root", required=True, help="directory the image keys (filepath/filename) are under")
    parser.add_argument("--output", required=True, help="the pseudo-query JSON to write")
    parser.add_argument("--splits", nargs="+", default=[s for s in MEMORIZED_SPLITS if s != "train"])
    parser.add_argument("--num-queries", type=int, default=5, help="queries per image (beams returned)")
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.num_queries > args.num_beams:
        raise GraceInputError(f"--num-queries ({args.num_queries}) cannot exceed --num-beams ({args.num_beams})")

    corpus = load_karpathy(args.karpathy_json, args.image_root)
    images = [image for image in corpus.images if image.split in args.splits]
    if not images:
        raise GraceInputError(f"{args.karpathy_json}: no images in split(s) {args.splits}")
    processor = FlamingoProcessor.from_pretrained(args.model)
    model = FlamingoForConditionalGeneration.from_pretrained(args.model).to(args.device)
    queries = generate_pseudo_queries(
        model, processor, images, args.num_queries, args.num_beams, args.max_new_tokens, args.batch_size
    )
    names = _file_names(corpus.images)
    write_pseudo_queries(args.output, {names[key]: texts for key, texts in queries.items()})
    empty = sum(not texts for texts in queries.values())
    print(f"wrote {args.output}: {len(queries)} images" + (f", {empty} without a usable query" if empty else ""))
    return 0
