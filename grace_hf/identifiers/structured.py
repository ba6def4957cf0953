"""Structured identifiers: an image's path in a hierarchical k-means tree over its embedding.

The memorized images are split into k clusters; a cluster of more than `leaf_size` images is split again, a smaller
one stops and each member takes its position in it as the last part. Each part is one new vocabulary token
`{level}_{value}`; an identifier joins them with `-`: `0_12-1_5-2_3`. The embeddings come from an open_clip model, a
features file or pixel thumbnails (`EmbeddingOptions`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning

from grace_hf.errors import GraceInputError
from grace_hf.identifiers.base import IdentifierInputs, IdentifierKind
from grace_hf.identifiers.embeddings import EmbeddingOptions, embed_images
from grace_hf.identifiers.index import IdentifierIndex

__all__ = ["KIND", "StructuredOptions", "build", "hierarchical_kmeans", "path_to_identifier"]

MINIBATCH_ABOVE = 1000  # the original: MiniBatchKMeans (batch 1000) above 1000 points, KMeans below


@dataclass
class StructuredOptions(EmbeddingOptions):
    """The embedding source, and the tree: `k` clusters per level, leaves of at most `leaf_size` images,
    `kmeans_n_init` restarts per split, `seed`."""

    k: int = field(default=30, metadata={"help": "clusters per level"})
    leaf_size: int = field(default=30, metadata={"help": "largest cluster that is not split again"})
    seed: int = field(default=0, metadata={"help": "k-means seed"})
    kmeans_n_init: int = field(default=1, metadata={"help": "k-means restarts per split"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 2 or self.leaf_size < 1 or self.kmeans_n_init < 1:
            raise GraceInputError(
                f"structured identifiers need --k >= 2, --leaf-size >= 1 and --kmeans-n-init >= 1, got k={self.k}, "
                f"leaf size {self.leaf_size}, n_init {self.kmeans_n_init}"
            )


def _cluster(features: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """Cluster labels (n,) for `features` (n, d)."""
    if len(features) > MINIBATCH_ABOVE:
        model = MiniBatchKMeans(n_clusters=k, batch_size=1000, random_state=seed, n_init=n_init)
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=n_init)
    with warnings.catch_warnings():  # duplicate points: fewer clusters than k, handled by the caller
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit_predict(features)


def hierarchical_kmeans(
    features: np.ndarray, k: int = 30, leaf_size: int = 30, seed: int = 0, n_init: int = 1
) -> list[list[int]]:
    """The tree path of each row of `features` (N, d): cluster numbers per level, then the leaf position.

    `n_init` k-means restarts per split (the original used 100; 1 keeps Flickr30K-sized corpora to minutes
    on a CPU). The same features and seed give the same tree.
    """
    if k < 2 or leaf_size < 1:
        raise ValueError(f"hierarchical k-means needs k >= 2 and leaf_size >= 1, got {k} and {leaf_size}")
    features = np.asarray(features, dtype=np.float32)
    paths: list[list[int]] = [[] for _ in range(len(features))]
    stack = [(np.arange(len(features)), [])]
    while stack:
        members, prefix = stack.pop()
        if len(members) <= leaf_size:
            for position, i in enumerate(members):
                paths[i] = prefix + [position]
            continue
        labels = _cluster(features[members], k, seed, n_init)
        if len(np.unique(labels)) == 1:  # identical embeddings: split in file order so the tree still ends
            labels = np.arange(len(members)) * k // len(members)
        for label in np.unique(labels)[::-1]:
            stack.append((members[labels == label], prefix + [int(label)]))
    return paths


def path_to_identifier(path: list[int]) -> str:
    """`[12, 5, 3]` -> `0_12-1_5-2_3`."""
    return "-".join(f"{level}_{value}" for level, value in enumerate(path))


def build(inputs: IdentifierInputs, options: StructuredOptions) -> IdentifierIndex:
    """Structured identifiers of the memorized images; `new_tokens` sorted by (level, value)."""
    features = embed_images(options, inputs.images, inputs.num_workers)
    paths = hierarchical_kmeans(
        features, k=options.k, leaf_size=options.leaf_size, seed=options.seed, n_init=options.kmeans_n_init
    )
    pieces = sorted({(level, value) for path in paths for level, value in enumerate(path)})
    return IdentifierIndex(
        "structured",
        {image.key: [path_to_identifier(path)] for image, path in zip(inputs.images, paths)},
        new_tokens=[f"{level}_{value}" for level, value in pieces],
        report={"levels": max(len(p) for p in paths), "embedding_dim": int(features.shape[1])},
    )


KIND = IdentifierKind(
    "structured", build, StructuredOptions, description="hierarchical k-means path over image embeddings: `0_12-1_5`"
)
