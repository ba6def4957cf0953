"""Recall@K of the model being trained, with the same retriever a saved model directory gets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from grace_hf.evaluation.metrics import recall_at_k
from grace_hf.identifiers import IdentifierIndex
from grace_hf.retrieval.retriever import GraceRetriever

__all__ = ["evaluate_recall"]


def evaluate_recall(
    model: Any,
    processor: Any,
    index: IdentifierIndex,
    queries: Sequence[str],
    gold: Sequence[str],
    query_image: str,
    num_beams: int,
    batch_size: int,
    distributed: bool = False,
    ks: tuple[int, ...] = (1, 5, 10),
    candidates: Sequence[str] | None = None,
) -> dict[str, float]:
    """Rank `candidates` (default `index.collection`) for each query by constrained beam search; Recall@K against `gold` image keys.

    `model` is the bare (unwrapped) model; it is put in eval mode for the search and back in train mode after.
    `distributed`: every process calls this, searches a shard of the queries and gets all results (also under
    ZeRO-3, where the processes must run each forward together).
    """
    was_training = model.training
    model.eval()
    try:
        retriever = GraceRetriever(
            model, processor, index, num_beams=num_beams, query_image=query_image, candidates=candidates
        )
        with torch.no_grad():
            results = retriever.retrieve(list(queries), top_k=max(ks), batch_size=batch_size, distributed=distributed)
    finally:
        model.train(was_training)
    rankings = [[hit.image_key for hit in hits] for hits in results]
    return recall_at_k(rankings, list(gold), ks=ks)
