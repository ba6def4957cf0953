"""The text-only baseline: BM25 (`bm25s`) between a query and the texts that teach each candidate image.

A reviewer's first question of a retriever trained on text -> image pairs: how far does plain text matching go?
Each candidate image is one document, the texts that teach it (`teaching_texts`: a train image's human captions,
a val/test image's pseudo-queries), and the same queries as the model's rank the same candidates: the test
captions ranking the test images (and the val captions ranking the val images, for choosing settings). BM25 is
bm25s's Lucene variant (k1 1.5, b 0.75) over lowercased word tokens without English stop words, no stemming; ties
keep the candidates' file order. `train_seconds` is the indexing time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import bm25s
import numpy as np

from grace_hf.data.karpathy import KarpathyCorpus, load_karpathy, teaching_texts
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.metrics import METRICS_FILE, retrieval_metrics
from grace_hf.io_utils import atomic_write_json
from grace_hf.outputs import TEXT_BASELINE, check_output_dir, output_directory

__all__ = ["METHOD", "Bm25Ranker", "evaluate_bm25", "run_text_baseline"]

METHOD = "bm25"


class Bm25Ranker:
    """BM25 over one text document per candidate; `rank` returns candidate positions, best first."""

    def __init__(self, documents: Sequence[str]) -> None:
        self.tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        tokens = self.tokenizer.tokenize(list(documents), return_as="tuple", show_progress=False)
        self.bm25 = bm25s.BM25()
        self.bm25.index(tokens, show_progress=False)
        self.empty_token = self.tokenizer.get_vocab_dict()[""]  # what a query of unknown words becomes
        self.num_documents = len(documents)

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every document for `query` (M,); all zero when it shares no word with them."""
        ids = self.tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)[0]
        return self.bm25.get_scores_from_ids([i for i in ids if i != self.empty_token])

    def rank(self, query: str, k: int) -> list[int]:
        """The positions of the `k` best documents for `query`, best first (ties in document order)."""
        return np.argsort(-self.scores(query), kind="stable")[:k].tolist()


def evaluate_bm25(
    documents: Sequence[str],
    candidate_keys: Sequence[str],
    queries: Sequence[str],
    gold: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
) -> tuple[dict[str, Any], float]:
    """`(retrieval_metrics of the queries ranking the candidates, seconds spent indexing the documents)`;
    `documents[i]` is the text of `candidate_keys[i]`."""
    start = time.perf_counter()
    ranker = Bm25Ranker(documents)
    index_seconds = time.perf_counter() - start
    top_k = min(max(ks), len(candidate_keys))
    start = time.perf_counter()
    rankings = [[candidate_keys[i] for i in ranker.rank(query, top_k)] for query in queries]
    return retrieval_metrics(rankings, gold, len(candidate_keys), time.perf_counter() - start, ks), index_seconds


def candidate_documents(
    corpus: KarpathyCorpus, split: str, pseudo_queries: Mapping[str, list[str]] | None
) -> tuple[list[str], list[str]]:
    """`(image keys, documents)` of a split's images: each document joins the texts that teach the image."""
    images = corpus.split(split)
    return [image.key for image in images], [" ".join(teaching_texts(image, pseudo_queries)[0]) for image in images]


def evaluate_split(
    corpus: KarpathyCorpus, split: str, pseudo_queries: Mapping[str, list[str]] | None
) -> tuple[dict[str, Any], float] | None:
    """`evaluate_bm25` with the split's human captions ranking the split's images; None without captions.
    Records how many candidates had no text to index (they rank last)."""
    pairs = corpus.caption_queries(split)
    if not pairs:
        return None
    keys, documents = candidate_documents(corpus, split, pseudo_queries)
    metrics, index_seconds = evaluate_bm25(documents, keys, [q for q, _ in pairs], [k for _, k in pairs])
    return metrics | {"candidates_without_text": sum(not document.strip() for document in documents)}, index_seconds


def _check_test_texts(
    corpus: KarpathyCorpus, pseudo_queries: Mapping[str, list[str]] | None, source: str | os.PathLike | None
) -> None:
    """Refuse a collection whose test images cannot be ranked by text: none, uncaptioned, or none with texts to index
    (`source`: the pseudo-query file, None when none was given)."""
    if not corpus.caption_queries("test"):
        raise GraceInputError(f"{corpus.json_path}: no test images with captions to evaluate on")
    if not any(document.strip() for document in candidate_documents(corpus, "test", pseudo_queries)[1]):
        if source:
            raise GraceInputError(f"{os.fspath(source)}: names no test image, so no test image has a text to index")
        raise GraceInputError(
            f"{corpus.json_path}: no --pseudo-queries given, so no test image has a text to index (test images are "
            "known by their pseudo-queries)"
        )


def run_text_baseline(
    karpathy_json: str | os.PathLike,
    image_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    pseudo_queries: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Index, evaluate and write the text-only baseline's `metrics.json` (test figures at the top level, val figures
    under "val", as the dense baseline's); returns the metrics."""
    inputs = [karpathy_json, image_root, pseudo_queries]
    check_output_dir(output_dir, TEXT_BASELINE, inputs, overwrite)
    corpus = load_karpathy(karpathy_json, image_root)
    pseudo = load_pseudo_queries(pseudo_queries, corpus) if pseudo_queries else None
    _check_test_texts(corpus, pseudo, pseudo_queries)
    test, index_seconds = evaluate_split(corpus, "test", pseudo)
    val = evaluate_split(corpus, "val", pseudo)
    metrics = {"method": METHOD, **test, "val": None if val is None else val[0], "train_seconds": index_seconds}
    with output_directory(output_dir, TEXT_BASELINE, inputs, overwrite, "grace-hf baseline-bm25") as out:
        atomic_write_json(out / METRICS_FILE, metrics)
    return metrics
