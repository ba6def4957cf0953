"""How good pseudo-queries are: BLEU-4 of a captioner's queries against the held-out human captions of the same images.

The val images' human captions are never trained on (they are validation queries), so they measure what the
captioner writes for an image it only saw through its pixels. sacrebleu's corpus BLEU (13a tokenization), each
image's first pseudo-query (the best beam) against all of its captions as references.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grace_hf.data.captioning import file_names
from grace_hf.data.karpathy import KarpathyCorpus
from grace_hf.data.pseudo_queries import PSEUDO_QUERIES_FILE, write_pseudo_queries
from grace_hf.io_utils import atomic_write_json

__all__ = ["QUALITY_FILE", "pseudo_query_bleu", "write_captioner_output"]

QUALITY_FILE = "quality.json"  # beside pseudo_queries.json in a `grace-hf pseudo-queries` output


def pseudo_query_bleu(
    corpus: KarpathyCorpus, queries: Mapping[str, Sequence[str]], split: str = "val"
) -> dict[str, Any] | None:
    """`{"bleu4", "split", "num_images", "examples"}` over the `split` images that have both captions and a query
    (image key -> queries), or None when there are none. `examples`: three (image key, query, a caption)."""
    import sacrebleu  # only for this report

    images = [image for image in corpus.split(split) if image.captions and queries.get(image.key)]
    if not images:
        return None
    hypotheses = [queries[image.key][0] for image in images]
    depth = max(len(image.captions) for image in images)
    # one reference stream per caption slot; an image with fewer captions repeats its last (BLEU is unchanged)
    references = [[image.captions[min(j, len(image.captions) - 1)] for image in images] for j in range(depth)]
    bleu = sacrebleu.corpus_bleu(hypotheses, references)
    examples = [[image.key, queries[image.key][0], image.captions[0]] for image in images[:3]]
    return {"bleu4": round(bleu.score, 2), "split": split, "num_images": len(images), "examples": examples}


def write_captioner_output(
    directory: str | os.PathLike, corpus: KarpathyCorpus, queries: Mapping[str, list[str]]
) -> dict[str, Any] | None:
    """Write a captioner's queries (image key -> queries) into `directory` as `pseudo_queries.json` (the original's
    format, by file name) and their BLEU on the val images as `quality.json` (when it can be measured); return that."""
    names = file_names(corpus.images)
    write_pseudo_queries(Path(directory) / PSEUDO_QUERIES_FILE, {names[key]: texts for key, texts in queries.items()})
    quality = pseudo_query_bleu(corpus, queries)
    if quality is not None:
        atomic_write_json(Path(directory) / QUALITY_FILE, quality)
    return quality
