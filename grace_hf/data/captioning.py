"""Pseudo-queries for the images that have no training captions, written by a trained captioner.

As the original GRACE: a Flamingo fine-tuned on train image -> caption pairs (`task: captioner`, e.g.
`recipes/flickr30k/captioner.yaml`) writes, for every val and test image, five queries by beam search (5 beams,
5 returned, at most 20 new tokens) after the prompt `<image>caption:`. Beams are near-copies of one caption; more
varied queries can be drawn beside them by top-k sampling, as DSI-QG does for text retrieval (`num_sampled`). Kept
all, sampled queries did not raise the demo's val R@1; kept by a filter (`query_filter`, e.g. the dense model's
closest five: `grace_hf.dense.query_filter`) they did, and the demo writes its pseudo-queries that way. The output
is the original file format, `{image_file_name: [query, ...]}`, which `grace-hf prepare --pseudo-queries` reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from grace_hf.data.images import read_rgb
from grace_hf.data.karpathy import KarpathyCorpus, KarpathyImage
from grace_hf.errors import GraceInputError
from grace_hf.models.flamingo import FlamingoForConditionalGeneration, FlamingoProcessor
from grace_hf.prompts import caption_prompt
from grace_hf.runtime import progress_bar

__all__ = ["QueryFilter", "caption_splits", "file_names", "generate_pseudo_queries"]

# keeps some of each image's queries (images, {image_key: queries}) -> {image_key: kept}; e.g.
# `grace_hf.dense.query_filter.DenseQueryFilter`, which keeps those the dense model finds closest to their image
QueryFilter = Callable[[Sequence[KarpathyImage], Mapping[str, list[str]]], dict[str, list[str]]]


def _written(
    model: FlamingoForConditionalGeneration, processor: FlamingoProcessor, inputs: Any, count: int, **generation: Any
) -> list[list[str]]:
    """`count` captions per image of the batch `inputs` (`generation`: `generate` options), decoded, image by image."""
    sequences = model.generate(
        **inputs,
        num_return_sequences=count,
        eos_token_id=processor.end_of_chunk_token_id,
        pad_token_id=processor.pad_token_id,
        **generation,
    )  # (B * count, prompt + new)
    texts = processor.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [texts[i : i + count] for i in range(0, len(texts), count)]


@torch.no_grad()
def generate_pseudo_queries(
    model: FlamingoForConditionalGeneration,
    processor: FlamingoProcessor,
    images: Sequence[KarpathyImage],
    num_queries: int = 5,
    num_beams: int = 5,
    max_new_tokens: int = 20,
    batch_size: int = 8,
    num_sampled: int = 0,
    top_k: int = 3,
    seed: int = 0,
    query_filter: QueryFilter | None = None,
) -> dict[str, list[str]]:
    """`{image_key: [query, ...]}`: the `num_queries` (<= `num_beams`) best beams per image, then `num_sampled`
    queries drawn by top-`top_k` sampling (seeded with `seed`: the same call writes the same queries; the global
    random state is left as it was), stripped, empty or repeated ones dropped; then, with `query_filter`, only the
    queries it keeps."""
    model.eval()
    device = next(model.parameters()).device
    queries: dict[str, list[str]] = {}
    for start in progress_bar(range(0, len(images), batch_size), desc="pseudo-queries"):
        chunk = images[start : start + batch_size]
        pictures = [read_rgb(image.path) for image in chunk]
        inputs = processor(text=[caption_prompt()] * len(chunk), images=pictures, padding_side="left").to(device)
        per_image = _written(
            model, processor, inputs, num_queries, num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens
        )
        if num_sampled:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + start)
                sampled = _written(
                    model, processor, inputs, num_sampled, do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens
                )
            per_image = [beams + drawn for beams, drawn in zip(per_image, sampled)]
        written = {
            image.key: list(dict.fromkeys(text.strip() for text in texts if text.strip()))
            for image, texts in zip(chunk, per_image)
        }
        queries.update(query_filter(chunk, written) if query_filter else written)
    return queries


def file_names(images: Sequence[KarpathyImage]) -> dict[str, str]:
    """image key -> the name the original file uses (the file name; the key where file names repeat)."""
    counts = Counter(image.filename for image in images)
    return {image.key: image.filename if counts[image.filename] == 1 else image.key for image in images}


def caption_splits(
    model: FlamingoForConditionalGeneration,
    processor: FlamingoProcessor,
    corpus: KarpathyCorpus,
    splits: Sequence[str],
    **generation: int,
) -> dict[str, list[str]]:
    """`{image_key: [query, ...]}` for every image of `splits` (`generation`: `generate_pseudo_queries` options);
    a `GraceInputError` when those splits hold no image."""
    images = [image for image in corpus.images if image.split in splits]
    if not images:
        raise GraceInputError(f"{corpus.json_path}: no images in split(s) {list(splits)}")
    return generate_pseudo_queries(model, processor, images, **generation)
