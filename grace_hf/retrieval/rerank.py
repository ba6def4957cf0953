"""Re-ranking the beams with a dense scorer: fuse the generative model's beam score with the query-image cosine.

A query image (query by image) is compared with the images through the dense model's image tower (image-image
cosine), with the same weight and temperature.

The images of a query's beams (default 30 beams) are re-scored by

    fused = weight * log_softmax(beam scores over the beams) + (1 - weight) * logit_scale * cosine(query, image)

a weighted sum of the generative model's log-distribution over its beams and the dense model's logits for the same
images (`logit_scale` is the dense model's learned temperature), and sorted by it. Images the beams did not reach
are not ranked. The weight is fitted on the validation queries only (`fit_fusion_weight`: the val captions ranking
the val images, never a test query) and saved with the model as `rerank.json`.

Everything re-ranking lives here: the scorer, the fusion, the config and its file (`RerankConfig`, `rerank.json`),
fitting (`fit_on_val`), the one fit-or-load of a model's weight (`fit_or_load`: `grace-hf evaluate`, the demo) and
loading it (`load_reranker`: the retriever, the pipeline).

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
from PIL import Image

from grace_hf.dense.directory import DENSE_FILES, FEATURES_FILE, check_dense_directory, load_image_features
from grace_hf.dense.model import load_dual_encoder
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.metrics import recall_at_k
from grace_hf.evaluation.queries import load_eval_queries
from grace_hf.io_utils import atomic_write_json, read_json, sha256_file
from grace_hf.model_dir import RERANK_FILE, resolve_model_dir
from grace_hf.outputs import portable_path, record_written
from grace_hf.retrieval.results import RetrievedImage

__all__ = [
    "DEFAULT_RERANK_BEAMS",
    "WEIGHT_GRID",
    "DenseScorer",
    "RerankConfig",
    "Reranker",
    "check_rerank_settings",
    "check_reranker_given",
    "fit_fusion_weight",
    "fit_on_val",
    "fit_or_load",
    "fuse",
    "load_reranker",
    "read_rerank_config",
    "write_rerank_config",
]

logger = logging.getLogger(__name__)

DEFAULT_RERANK_BEAMS = 30
WEIGHT_GRID = tuple(i / 20 for i in range(21))  # 0.00, 0.05, ..., 1.00


def check_rerank_settings(weight: float, num_beams: int, where: str) -> None:
    """A fusion weight in [0, 1] and at least one beam, or a `GraceInputError` naming `where` they came from."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.0 <= weight <= 1.0:
        raise GraceInputError(f"{where}: the re-ranking weight must be a number in [0, 1], got {weight!r}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise GraceInputError(f"{where}: the re-ranking beams must be a whole number >= 1, got {num_beams!r}")


@dataclass
class RerankConfig:
    """How the model re-ranks its beams with a dense scorer (`rerank.json`), fitted on the validation queries.

    Args:
        weight: fused score = weight * log_softmax(beam scores) + (1 - weight) * logit_scale * cosine.
        num_beams: beams searched per query; their images are re-scored.
        dense: the dense model directory the weight was fitted with.
        dense_fingerprint: sha256 of that dense model's files: another dense model is refused.
        fitted_on: what the weight was fitted on (the val captions of a prepared dataset).
        val_grid: Recall@1/5/10 on val of every weight tried.
    """

    weight: float
    num_beams: int
    dense: str | None = None
    dense_fingerprint: str | None = None
    fitted_on: str | None = None
    val_grid: list[dict[str, float]] = dataclasses.field(default_factory=list)


def read_rerank_config(directory: Path) -> RerankConfig | None:
    """The `rerank.json` of a model directory (checked), or None when the model has none."""
    path = directory / RERANK_FILE
    if not path.is_file():
        return None
    data = read_json(path, "re-ranking config")
    if not isinstance(data, dict) or "weight" not in data or "num_beams" not in data:
        raise GraceInputError(f"{path}: expected a JSON object with 'weight' and 'num_beams'")
    check_rerank_settings(data["weight"], data["num_beams"], str(path))
    for key in ("dense", "dense_fingerprint", "fitted_on"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise GraceInputError(f"{path}: {key!r} must be a string")
    if not isinstance(data.get("val_grid", []), list):
        raise GraceInputError(f"{path}: 'val_grid' must be a list")
    known = {f.name for f in dataclasses.fields(RerankConfig)}
    return RerankConfig(**{key: value for key, value in data.items() if key in known})


def write_rerank_config(directory: Path, config: RerankConfig) -> Path:
    """Write `rerank.json` into a model directory through a temporary file and a rename (recorded in its marker as
    grace_hf's); returns its path."""
    path = directory / RERANK_FILE
    atomic_write_json(path, dataclasses.asdict(config))
    record_written(directory, RERANK_FILE)
    return path


@dataclass
class DenseScorer:
    """Query-image cosines of a dense dual encoder: its text tower (its image tower for query images) and the saved
    embeddings of the images.

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

    def encode_queries(self, queries: Sequence[str | Image.Image]) -> torch.Tensor:
        """L2-normalised embeddings (Q, D): text queries through the text tower, query images (all or none) through
        the image tower."""
        with torch.no_grad():
            if queries and isinstance(queries[0], Image.Image):
                return self.encoder.encode_pil_images(list(queries)).float()
            return self.encoder.encode_texts(list(queries)).float()

    def cosines(self, queries: Sequence[str | Image.Image], image_keys: Sequence[Sequence[str]]) -> list[list[float]]:
        """The cosine of each query (a text or an image) with each of its images."""
        self.check_covers([key for keys in image_keys for key in keys], "the ranking")
        embedded = self.encode_queries(queries)  # (Q, D)
        out = []
        for q, keys in enumerate(image_keys):
            rows = self.features[[self._row[key] for key in keys]]  # (K, D)
            out.append((rows @ embedded[q]).tolist())
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
        self, queries: Sequence[str | Image.Image], results: Sequence[Sequence[RetrievedImage]]
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


def check_reranker_given(
    reranker: object, rerank_weight: float | None, rerank_beams: int | None, where: str = ""
) -> None:
    """`rerank_weight` and `rerank_beams` need a `reranker`; a `GraceInputError` (prefixed by `where`) otherwise."""
    if reranker is None and (rerank_weight is not None or rerank_beams is not None):
        raise GraceInputError(f"{where}rerank_weight and rerank_beams need a reranker (a baseline-clip directory)")


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


def fit_on_val(
    retriever: Any,
    data: str | os.PathLike,
    scorer: DenseScorer,
    num_beams: int = DEFAULT_RERANK_BEAMS,
    batch_size: int | None = None,
    distributed: bool = True,
    model_dir: str | os.PathLike | None = None,
) -> RerankConfig:
    """Fit the fusion weight on the val captions of `data` ranking the val images (no test query is read), with the
    model of `retriever` (a `GraceRetriever`) searching `num_beams` beams; returns the config to save as
    `rerank.json` (in `model_dir`, when given: the dense model and the data are named as seen from there, see
    `grace_hf.outputs.portable_path`)."""
    queries, gold, candidates = load_eval_queries(data, split="val")
    scorer.check_covers(candidates, f"{data}'s val split")
    val_retriever = retriever.for_candidates(candidates, num_beams=num_beams)
    beams = val_retriever.retrieve(
        queries, top_k=val_retriever.num_beams, batch_size=batch_size, distributed=distributed
    )
    weight, table = fit_fusion_weight(beams, queries, gold, scorer)
    dense = scorer.directory
    if model_dir is not None:
        data = portable_path(data, model_dir)
        dense = portable_path(dense, model_dir) if dense else dense
    return RerankConfig(
        weight=weight,
        num_beams=num_beams,
        dense=dense,
        dense_fingerprint=scorer.fingerprint,
        fitted_on=f"{len(queries)} val captions ranking {len(candidates)} val images of {data}",
        val_grid=table,
    )


def fit_or_load(
    model: str | os.PathLike,
    scorer: DenseScorer,
    retriever: Any,
    data: str | os.PathLike,
    weight: float | None = None,
    num_beams: int | None = None,
    refit: bool = False,
    batch_size: int | None = None,
    distributed: bool = True,
    write: bool = True,
) -> tuple[Reranker, RerankConfig | None]:
    """The reranker of the model `model` (a directory or Hub id) with the dense `scorer`: with `weight` given, else
    with the weight of its `rerank.json` (unless `refit`), else fitted on the val captions of `data` by `retriever`
    (`fit_on_val`, `num_beams` beams) and written into the model directory (when `write`: the main process).

    Returns the reranker and the config fitted now (None when it was loaded).
    """
    model_dir = resolve_model_dir(model)
    if weight is not None or (not refit and read_rerank_config(model_dir) is not None):
        return load_reranker(model_dir, scorer, weight, num_beams), None
    if not Path(model).is_dir():
        raise GraceInputError(
            f"--model {model}: fitting the re-ranking weight writes {RERANK_FILE} into the model directory; "
            "give a local copy of the model, or --rerank-weight"
        )
    config = fit_on_val(
        retriever, data, scorer, num_beams or DEFAULT_RERANK_BEAMS, batch_size, distributed, model_dir=model_dir
    )
    if write:
        write_rerank_config(model_dir, config)
    return Reranker(scorer, config.weight, config.num_beams), config
