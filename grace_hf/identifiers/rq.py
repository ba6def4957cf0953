"""Residual-quantized (rq) identifiers: L codes per image from L k-means codebooks fitted on the residuals.

The embeddings (any `EmbeddingOptions` source) are centred on their mean; level 0 clusters them into
`codebook_size` codes, level l clusters what is left after subtracting the centroids of levels 0 .. l-1. Each
(level, code) is one new vocabulary token `{level}_{code}` and an identifier joins an image's L tokens with `-`:
`0_12-1_5-2_3`. Unlike a k-means tree path, a code means the same thing under every prefix (level 1's code 5 is
the same residual centroid whatever level 0 said), so each token is shared by many images and a decoder learns it
from many captions. Where images share all L codes, each of them gets one more code, its position in the group
(`3_0`, `3_1`, ...), so identifiers are unique.

By default the k-means of each level is balanced: a code holds at most ceil(N / codebook_size) images (Lloyd steps
whose assignment respects that capacity), so every code is used and none swallows a large part of the collection
(plain k-means on residuals gives a few huge codes and many collisions); `unbalanced` turns it off.

The codebooks (`centroids` (L, K, d), the `mean` (d,), the embedding source's own tensors and the options) are the
index's `Codebooks`. An image added later is coded deterministically, the nearest centroid at each level; when its
L codes are those of existing images, it takes the next free position of their group (an existing image without a
position keeps its identifier and counts as position 0: identifiers end with the end token, so it stays apart from
its group's longer ones). No existing image is renamed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from grace_hf.errors import GraceInputError
from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind, extended_index
from grace_hf.identifiers.codebooks import Codebooks
from grace_hf.identifiers.embeddings import (
    EmbeddingOptions,
    check_same_source,
    embed,
    embed_new_images,
    recorded_options,
)
from grace_hf.identifiers.index import IdentifierIndex

__all__ = [
    "KIND",
    "RQOptions",
    "ResidualQuantizer",
    "build",
    "default_shape",
    "extend",
    "fit_quantizer",
    "name_codes",
    "parse_identifier",
]

DEFAULT_LEVELS = 3
QUANTIZER_OPTIONS = ("levels", "codebook_size", "seed", "unbalanced")  # fixed once the codebooks are fitted
BALANCE_ITERATIONS = 10
Codes = tuple[int, ...]


@dataclass
class RQOptions(EmbeddingOptions):
    """The embedding source, and the quantizer: `levels` codebooks of `codebook_size` codes (both default to
    `default_shape` of the collection), balanced k-means unless `unbalanced`, `seed`."""

    levels: int | None = field(default=None, metadata={"help": f"codebooks (default {DEFAULT_LEVELS})"})
    codebook_size: int | None = field(
        default=None, metadata={"help": "codes per level (default 2 N^(1/3), a multiple of 4 in [8, 256])"}
    )
    unbalanced: bool = field(
        default=False, metadata={"help": "plain k-means per level (default: a code holds at most N / size images)"}
    )
    seed: int = field(default=0, metadata={"help": "k-means seed"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.levels is not None and self.levels < 1) or (
            self.codebook_size is not None and self.codebook_size < 2
        ):
            raise GraceInputError(
                f"rq identifiers need --levels >= 1 and --codebook-size >= 2, got levels {self.levels}, "
                f"codebook size {self.codebook_size}"
            )


def default_shape(num_images: int) -> tuple[int, int]:
    """(levels, codebook size) for a collection of `num_images`: 3 levels of K = 2 N^(1/3) codes, rounded up to a
    multiple of 4, between 8 and 256 (K^3 is ~8 N, so few images share all three codes).

    Example:
        >>> default_shape(500), default_shape(2500), default_shape(10)
        ((3, 16), (3, 28), (3, 8))
    """
    size = 4 * math.ceil(2 * num_images ** (1 / 3) / 4)
    return DEFAULT_LEVELS, int(min(256, max(8, size)))


def _distances(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared distances (n, K) of `features` (n, d) to `centroids` (K, d)."""
    return (features**2).sum(1, keepdims=True) - 2 * features @ centroids.T + (centroids**2).sum(1)


@dataclass
class ResidualQuantizer:
    """Fitted codebooks: `centroids` (L, K, d), and the `mean` (d,) subtracted first."""

    centroids: np.ndarray
    mean: np.ndarray

    @property
    def levels(self) -> int:
        return self.centroids.shape[0]

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Codes (N, L) of `features` (N, d): the nearest centroid to each level's residual (deterministic)."""
        residual = np.asarray(features, dtype=np.float32) - self.mean  # (N, d)
        codes = np.zeros((len(residual), self.levels), dtype=np.int64)
        for level, centroids in enumerate(self.centroids):  # (K, d)
            codes[:, level] = _distances(residual, centroids).argmin(1)
            residual = residual - centroids[codes[:, level]]
        return codes

    def to_codebooks(self, options: RQOptions, tensors: Mapping[str, np.ndarray]) -> Codebooks:
        """The codebooks file's content: the centroids and mean, the embedding source's `tensors`, the options."""
        arrays = {"centroids": self.centroids.astype(np.float32), "mean": self.mean.astype(np.float32), **tensors}
        return Codebooks("rq", arrays, {"options": recorded_options(options)})

    @classmethod
    def from_codebooks(cls, codebooks: Codebooks, source: str) -> ResidualQuantizer:
        """The quantizer `to_codebooks` saved; a malformed one is a `GraceInputError` naming `source`."""
        centroids, mean = codebooks.tensors.get("centroids"), codebooks.tensors.get("mean")
        if centroids is None or mean is None or centroids.ndim != 3 or mean.shape != centroids.shape[2:]:
            shapes = [None if a is None else a.shape for a in (centroids, mean)]
            raise GraceInputError(f"{source}: not rq codebooks (centroids (L, K, d) and mean (d,); got {shapes})")
        return cls(centroids, mean)


def _kmeans(features: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) and centroids (k, d) of plain k-means, k = min(size, n)."""
    model = KMeans(n_clusters=min(size, len(features)), random_state=seed, n_init=1)
    with warnings.catch_warnings():  # duplicate points: fewer distinct clusters than k
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = model.fit_predict(features)
    return labels.astype(np.int64), model.cluster_centers_.astype(np.float32)


def _capacity_assign(distances: np.ndarray, capacity: int) -> np.ndarray:
    """Labels (n,) from `distances` (n, K), each code taking at most `capacity` points (capacity * K >= n).

    The result is what taking (point, code) pairs by increasing distance gives (a point takes the code of its pair
    when it has none and the code has room), found by deferred acceptance, one vectorised round at a time: every
    point without a code asks for the nearest code it has not asked yet, and each code keeps the `capacity` nearest
    of the points it holds and the new ones, sending the others back.
    """
    num_points = len(distances)
    preferences = np.argsort(distances, axis=1, kind="stable")  # (n, K): each point's codes, nearest first
    asked = np.zeros(num_points, dtype=np.int64)
    labels = np.full(num_points, -1, dtype=np.int64)
    while (free := np.flatnonzero(labels < 0)).size:
        labels[free] = preferences[free, asked[free]]
        asked[free] += 1
        contested = np.flatnonzero(np.isin(labels, labels[free]))  # the points held by a code that was asked
        codes = labels[contested]
        order = np.lexsort((contested, distances[contested, codes], codes))  # by code, distance, point
        codes = codes[order]
        rank = np.arange(len(order)) - np.searchsorted(codes, codes)  # position among the code's points
        labels[contested[order[rank >= capacity]]] = -1
    return labels


def _balanced_kmeans(features: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means whose clusters hold at most ceil(n / k) points: plain k-means, then Lloyd steps with the
    capacity-bound assignment (a code left empty keeps its centroid)."""
    labels, centroids = _kmeans(features, size, seed)
    capacity = math.ceil(len(features) / len(centroids))
    for _ in range(BALANCE_ITERATIONS):
        new = _capacity_assign(_distances(features, centroids), capacity)
        for code in np.unique(new):
            centroids[code] = features[new == code].mean(0)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels, centroids


def fit_quantizer(
    features: np.ndarray, levels: int, codebook_size: int, seed: int = 0, balanced: bool = True
) -> tuple[ResidualQuantizer, np.ndarray]:
    """Fit `levels` codebooks of `codebook_size` centroids on the residuals of `features` (N, d); return the
    quantizer and the fitted codes (N, levels). Balanced codes may differ from `encode`'s nearest centroids (the
    capacity moved some images); the fitted ones name the memorized images, `encode` names new ones."""
    features = np.asarray(features, dtype=np.float32)
    mean = features.mean(0)  # (d,)
    residual = features - mean  # (N, d)
    books, codes = [], []
    for level in range(levels):
        fit = _balanced_kmeans if balanced else _kmeans
        labels, centroids = fit(residual, codebook_size, seed + level)
        if len(centroids) < codebook_size:  # fewer images than codes: unused centroids far away
            far = np.full((codebook_size - len(centroids), features.shape[1]), 1e6, dtype=np.float32)
            centroids = np.concatenate([centroids, far])
        books.append(centroids)
        codes.append(labels)
        residual = residual - centroids[labels]
    return ResidualQuantizer(np.stack(books), mean), np.stack(codes, axis=1)


def parse_identifier(identifier: str, levels: int) -> tuple[Codes, int | None] | None:
    """`0_12-1_5-2_3-3_1` -> ((12, 5, 3), 1) for 3 levels (position None without the last code); None when
    `identifier` is not an rq identifier of `levels` levels."""
    parts = identifier.split("-")
    if len(parts) not in (levels, levels + 1):
        return None
    values = []
    for level, part in enumerate(parts):
        prefix, _, value = part.partition("_")
        if prefix != str(level) or not value.isdigit():
            return None
        values.append(int(value))
    return tuple(values[:levels]), (values[levels] if len(parts) > levels else None)


def name_codes(codes: np.ndarray, taken: Mapping[Codes, list[int | None]] | None = None) -> list[str]:
    """An identifier per row of `codes` (N, L): its L codes, plus its position in its group where rows share all
    L codes. `taken`: the positions existing images already hold per group (None: one without a position, which
    counts as position 0); the rows then take the positions after them, even a row alone among the rows.

    Example:
        >>> name_codes(np.array([[1, 2], [1, 2], [0, 2]]))
        ['0_1-1_2-2_0', '0_1-1_2-2_1', '0_0-1_2']
        >>> name_codes(np.array([[0, 2]]), taken={(0, 2): [None]})
        ['0_0-1_2-2_1']
    """
    taken = taken or {}
    groups: dict[Codes, list[int]] = defaultdict(list)
    for row, values in enumerate(codes.tolist()):
        groups[tuple(values)].append(row)
    levels = codes.shape[1]
    identifiers = [""] * len(codes)
    for values, rows in groups.items():
        held = [0 if position is None else position for position in taken.get(values, [])]
        start = max(held) + 1 if held else 0
        for offset, row in enumerate(rows):
            parts = [f"{level}_{code}" for level, code in enumerate(values)]
            if held or len(rows) > 1:
                parts.append(f"{levels}_{start + offset}")
            identifiers[row] = "-".join(parts)
    return identifiers


def _tokens(identifiers: list[str]) -> list[str]:
    """The tokens of `identifiers`, sorted by (level, value)."""
    pieces = {tuple(map(int, part.split("_"))) for identifier in identifiers for part in identifier.split("-")}
    return [f"{level}_{value}" for level, value in sorted(pieces)]


def build(inputs: IdentifierInputs, options: RQOptions) -> IdentifierIndex:
    """rq identifiers of the memorized images; `new_tokens` sorted by (level, code); the quantizer as the index's
    codebooks (the options recorded with the levels and codebook size used)."""
    default_levels, default_size = default_shape(len(inputs.images))
    options = dataclasses.replace(
        options, levels=options.levels or default_levels, codebook_size=options.codebook_size or default_size
    )
    embeddings = embed(options, inputs.images, inputs.num_workers)
    quantizer, codes = fit_quantizer(
        embeddings.features, options.levels, options.codebook_size, options.seed, balanced=not options.unbalanced
    )
    identifiers = name_codes(codes)
    return IdentifierIndex(
        "rq",
        {image.key: [identifier] for image, identifier in zip(inputs.images, identifiers)},
        new_tokens=_tokens(identifiers),
        report={
            "levels": options.levels,
            "codebook_size": options.codebook_size,
            "balanced": not options.unbalanced,
            "embedding_dim": int(embeddings.features.shape[1]),
            "images_with_disambiguation_code": sum(len(i.split("-")) > options.levels for i in identifiers),
            "codes_used_per_level": [len(np.unique(codes[:, level])) for level in range(options.levels)],
        },
        codebooks=quantizer.to_codebooks(options, embeddings.tensors),
    )


def extend(
    index: IdentifierIndex, inputs: IdentifierInputs, options: RQOptions, codebooks: Codebooks | None
) -> IdentifierIndex:
    """The new images coded with the saved codebooks (see the module docstring), embedded by the source that built
    them."""
    source = "rq codebooks"
    quantizer = ResidualQuantizer.from_codebooks(codebooks, source)
    recorded = codebooks.metadata.get("options", {})
    fixed = [name for name in QUANTIZER_OPTIONS if getattr(options, name) != recorded.get(name)]
    if fixed:
        raise GraceInputError(
            f"rq identifiers: --{fixed[0].replace('_', '-')} is fixed by the saved codebooks "
            f"({recorded.get(fixed[0])}); new images are coded with them as they are"
        )
    check_same_source("rq", RQOptions(**recorded), options)
    taken: dict[Codes, list[int | None]] = defaultdict(list)
    for key, identifiers in index.images.items():
        parsed = parse_identifier(identifiers[0], quantizer.levels)
        if parsed is None or max(parsed[0]) >= quantizer.centroids.shape[1]:
            raise GraceInputError(
                f"{source}: identifier {identifiers[0]!r} of image {key!r} is not one of their codes: the codebooks "
                "belong to another collection"
            )
        taken[parsed[0]].append(parsed[1])
    embeddings = embed_new_images(
        "rq",
        options,
        inputs.images,
        inputs.num_workers,
        codebooks.tensors,
        quantizer.mean.shape[0],
        "the saved codebooks",
    )
    identifiers = name_codes(quantizer.encode(embeddings.features), taken)
    codebooks = quantizer.to_codebooks(options, embeddings.tensors)
    return extended_index(index, inputs.images, identifiers, _tokens(identifiers), codebooks)


KIND = IdentifierKind(
    "rq",
    build,
    RQOptions,
    description="residual-quantized codes of image embeddings, one token per (level, code): `0_12-1_5-2_3`",
    extend=extend,
    needs_codebooks=True,
)
