"""Re-ranking the beams with a dense scorer: fuse the generative model's beam score with the query-image cosine.

The images of a query's beams (default 30 beams) are re-scored by

    fused = weight * log_softmax(beam scores over the beams) + (1 - weight) * logit_scale * cosine(query, image)

a weighted sum of the generative model's log-distribution over its beams and the dense model's logits for the same
images (`logit_scale` is the dense model's learned temperature), and sorted by it. Images the beams did not reach
are not ranked. The weight is fitted on the validation queries only (`fit_fusion_weight`: the val captions ranking
the val images, never a test query) and saved with the model as `rerank.json`.

    scorer = DenseScorer.from_directory("runs/dense-clip")          # a `grace-hf baseline-clip` output
    retriever = GraceRetriever.from_pretrained("runs/model", reranker=scorer)   # the weight from rerank.json
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grace_hf.dense.directory import FEATURES_FILE, load_image_features
from grace_hf.dense.model import CONFIG_NAME, WEIGHTS_NAME, load_dual_encoder
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.metrics import recall_at_k
from grace_hf.io_utils import sha256_file
from grace_hf.model_dir import RERANK_FILE, check_rerank_settings, read_rerank_config
from grace_hf.retrieval.results import RetrievedImage

__all__ = [
    "DEFAULT_RERANK_BEAMS",
    "WEIGHT_GRID",
    "DenseScorer",
    "Reranker",
    "check_dense_directory",
    "fit_fusion_weight",
    "fuse",
    "load_reranker",
]

logger = logging.getLogger(__name__)

DEFAULT_RERANK_BEAMS = 30
WEIGHT_GRID = tuple(i / 20 for i in range(21))  # 0.00, 0.05, ..., 1.00
DENSE_FILES = (CONFIG_NAME, WEIGHTS_NAME, FEATURES_FILE)


def check_dense_directory(directory: str | os.PathLike) -> Path:
    """`directory` as a path if it holds a `grace-hf baseline-clip` output's files; a `GraceInputError` otherwise."""
    path = Path(directory)
    missing = [name for name in DENSE_FILES if not (path / name).is_file()]
    if missing:
        raise GraceInputError(
            f"{directory}: not a `grace-hf baseline-clip` directory (no {', '.join(missing)}); --rerank takes "
            "the output directory of `grace-hf baseline-clip`"
        )
    return path


@dataclass
class DenseScorer:
    """Query-image cosines of a dense dual encoder: its text tower and the saved embeddings of the images.

    Args:
        encoder: has `encode_texts(texts) -> (Q, D)` L2-normalised embeddings and `model.logit_scale` (a
            `grace_hf.dense.DualEncoder`).
        features: (N, D) L2-normalised image embeddings, one row per key of `image_keys`.
        directory: where it was loaded from (named in messages and in `rerank.json`).
        fingerprint: sha256 of the dense model's files: a weight fitted with another dense model is refused.
    """

    encoder: Any
    features: torch.Tensor
    image_keys: list[str]
    directory: str | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        self._row = {key: i for i, key in enumerate(self.image_keys)}

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> DenseScorer:
        """A `grace-hf baseline-clip` output directory: its encoder and `image_features.safetensors`."""
        path = check_dense_directory(directory)
        features, keys = load_image_features(path / FEATURES_FILE)
        fingerprint = sha256_file(*(path / name for name in DENSE_FILES))
        return cls(load_dual_encoder(path), features.float(), keys, str(directory), fingerprint)

    @property
    def logit_scale(self) -> float:
        """The dense model's learned softmax temperature (exp of its logit scale)."""
        return float(self.encoder.model.logit_scale.detach().exp())

    def check_covers(self, image_keys: Sequence[str], what: str) -> None:
        """Refuse a collection with images the dense features lack (a dense model of another collection)."""
        missing = [key for key in image_keys if key not in self._row]
        if missing:
            source = Path(self.directory) / FEATURES_FILE if self.directory else "the dense image features"
            raise GraceInputError(
                f"{source}: no dense features for {len(missing)} of the {len(image_keys)} images of {what} "
                f"(e.g. {missing[0]!r}); use the `grace-hf baseline-clip` directory trained on this collection"
            )

    def cosines(self, queries: Sequence[str], image_keys: Sequence[Sequence[str]]) -> list[list[float]]:
        """The cosine of each query with each of its images."""
        self.check_covers([key for keys in image_keys for key in keys], "the ranking")
        with torch.no_grad():
            text = self.encoder.encode_texts(list(queries)).float()  # (Q, D)
        out = []
        for q, keys in enumerate(image_keys):
            rows = self.features[[self._row[key] for key in keys]]  # (K, D)
            out.append((rows @ text[q]).tolist())
        return out


def fuse(beam_scores: Sequence[float], cosines: Sequence[float], weight: float, logit_scale: float) -> list[float]:
    """`weight * log_softmax(beam_scores) + (1 - weight) * logit_scale * cosines`, one value per image."""
    if not beam_scores:
        return []
    top = max(beam_scores)
    log_norm = top + math.log(sum(math.exp(score - top) for score in beam_scores))
    return [weight * (s - log_norm) + (1 - weight) * logit_scale * c for s, c in zip(beam_scores, cosines)]


def _reorder(
    results: Sequence[Sequence[RetrievedImage]], cosines: Sequence[Sequence[float]], weight: float, logit_scale: float
) -> list[list[RetrievedImage]]:
    """Each query's hits sorted by the fused score, which becomes their `score`."""
    reranked = []
    for hits, cos in zip(results, cosines):
        fused = fuse([hit.score for hit in hits], cos, weight, logit_scale)
        order = sorted(range(len(hits)), key=lambda i: -fused[i])
        reranked.append([dataclasses.replace(hits[i], score=fused[i]) for i in order])
    return reranked


@dataclass
class Reranker:
    """A dense scorer with the fusion weight and the number of beams whose images it re-scores."""

    scorer: DenseScorer
    weight: float
    num_beams: int = DEFAULT_RERANK_BEAMS

    def __post_init__(self) -> None:
        check_rerank_settings(self.weight, self.num_beams, "re-ranking")

    def rerank(
        self, queries: Sequence[str], results: Sequence[Sequence[RetrievedImage]]
    ) -> list[list[RetrievedImage]]:
        """The beam images of each query sorted by the fused score (the `score` of each returned hit)."""
        cosines = self.scorer.cosines(queries, [[hit.image_key for hit in hits] for hits in results])
        return _reorder(results, cosines, self.weight, self.scorer.logit_scale)


def fit_fusion_weight(
    results: Sequence[Sequence[RetrievedImage]],
    queries: Sequence[str],
    gold: Sequence[str],
    scorer: DenseScorer,
    grid: Sequence[float] = WEIGHT_GRID,
) -> tuple[float, list[dict[str, float]]]:
    """The weight of `grid` with the best Recall@1 (ties: R@5, then R@10, then the weight nearest 0.5) on these
    queries, and the Recall@K of every grid point.

    Give it validation queries and their beams only: the weight is chosen on what it is given.
    """
    if not queries or len(queries) != len(gold) or len(queries) != len(results):
        raise GraceInputError("fitting the re-ranking weight needs as many beam results and gold images as queries")
    cosines = scorer.cosines(queries, [[hit.image_key for hit in hits] for hits in results])
    table = []
    for weight in grid:
        ranked = _reorder(results, cosines, weight, scorer.logit_scale)
        recalls = recall_at_k([[hit.image_key for hit in hits] for hits in ranked], list(gold), (1, 5, 10))
        table.append({"weight": weight, **recalls})
    best = max(table, key=lambda r: (r["recall@1"], r["recall@5"], r["recall@10"], -abs(r["weight"] - 0.5)))
    return best["weight"], table


def load_reranker(
    model_dir: Path,
    reranker: str | os.PathLike | DenseScorer,
    rerank_weight: float | None = None,
    rerank_beams: int | None = None,
) -> Reranker:
    """The reranker of a model directory: the dense scorer (a `baseline-clip` directory or a `DenseScorer`) with the
    weight of `rerank_weight`, else of the model's `rerank.json` (which must have been fitted with this dense model);
    the beams of `rerank_beams`, else of `rerank.json`, else 30."""
    scorer = reranker if isinstance(reranker, DenseScorer) else DenseScorer.from_directory(reranker)
    config = read_rerank_config(model_dir)
    if rerank_weight is None:
        if config is None:
            raise GraceInputError(
                f"{model_dir}: no {RERANK_FILE} (no fitted re-ranking weight): fit it on the validation queries with "
                f"`grace-hf evaluate --model {model_dir} --data PREPARED --rerank {scorer.directory or 'DENSE_DIR'} "
                "--split val`, or pass a weight (rerank_weight, --rerank-weight)"
            )
        _check_same_dense(model_dir / RERANK_FILE, config.dense, config.dense_fingerprint, scorer)
        rerank_weight = config.weight
    if rerank_beams is None:
        rerank_beams = config.num_beams if config is not None else DEFAULT_RERANK_BEAMS
    return Reranker(scorer, rerank_weight, rerank_beams)


def _check_same_dense(path: Path, dense: str | None, fingerprint: str | None, scorer: DenseScorer) -> None:
    """Refuse a weight fitted with another dense model; warn where that cannot be checked."""
    if fingerprint is None or scorer.fingerprint is None:
        logger.warning(f"{path}: cannot check that the weight was fitted with this dense model ({scorer.directory})")
    elif fingerprint != scorer.fingerprint:
        raise GraceInputError(
            f"{path}: the weight was fitted with the dense model {dense} (sha256 {fingerprint[:12]}), not with "
            f"{scorer.directory} (sha256 {scorer.fingerprint[:12]}); fit it again with `grace-hf evaluate ... --rerank "
            f"{scorer.directory} --split val --refit-rerank`, or pass a weight"
        )
