"""Structured identifiers: an image's path in a hierarchical k-means tree over its embedding.

The memorized images are split into k clusters; a cluster of more than `leaf_size` images is split again, a smaller
one stops and each member takes its position in it as the last part. Each part is one new vocabulary token
`{level}_{value}`; an identifier joins them with `-`: `0_12-1_5-2_3`. The embeddings come from an open_clip model, a
features file or pixel thumbnails (`EmbeddingOptions`).

The tree is saved as the index's codebooks (`KMeansTree`: the centroid of every child of every split, the size of
every leaf, the options). An image added later descends it, nearest centroid first, and takes the next position in
the leaf it reaches; when that leaf is full, a new leaf beside it (the next value at that level, its centroid the
image's embedding) takes it. No existing image is renamed.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
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
    "KMeansTree",
    "StructuredOptions",
    "build",
    "extend",
    "hierarchical_kmeans",
    "identifier_to_path",
    "path_to_identifier",
]

TREE_OPTIONS = ("k", "leaf_size", "seed", "kmeans_n_init")  # fixed once the tree is built
Node = tuple[int, ...]

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


def identifier_to_path(identifier: str) -> list[int] | None:
    """`0_12-1_5-2_3` -> `[12, 5, 3]`; None when `identifier` is not a tree path."""
    path = []
    for level, part in enumerate(identifier.split("-")):
        prefix, _, value = part.partition("_")
        if prefix != str(level) or not value.isdigit():
            return None
        path.append(int(value))
    return path


@dataclass
class KMeansTree:
    """A hierarchical k-means tree, as codebooks: `children[node][label]` is the centroid (d,) of the images under
    `node + (label,)` (nodes are paths of cluster labels, the root is `()`), `leaves[leaf]` the number of images
    in a leaf; a leaf holds at most `leaf_size` images, except the root when it is a leaf; `dim` is d."""

    children: dict[Node, dict[int, np.ndarray]]
    leaves: dict[Node, int]
    leaf_size: int
    dim: int

    @classmethod
    def from_paths(cls, paths: list[list[int]], features: np.ndarray, leaf_size: int) -> KMeansTree:
        """The tree `hierarchical_kmeans` built: each child's centroid is the mean of the rows of `features` (N, d)
        under it."""
        members: dict[Node, list[int]] = defaultdict(list)
        for row, path in enumerate(paths):
            for depth in range(1, len(path)):
                members[tuple(path[:depth])].append(row)
        children: dict[Node, dict[int, np.ndarray]] = defaultdict(dict)
        for child, rows in sorted(members.items()):
            children[child[:-1]][child[-1]] = features[rows].mean(axis=0)
        leaves = dict(Counter(tuple(path[:-1]) for path in paths))
        return cls(dict(children), leaves, leaf_size, features.shape[1])

    def code(self, embedding: np.ndarray) -> list[int]:
        """The path of a new image with `embedding` (d,): down to the nearest leaf, its next position (a new leaf
        beside it when it is full); the tree records the image."""
        node: Node = ()
        while node in self.children:
            labels = list(self.children[node])
            centroids = np.stack([self.children[node][label] for label in labels])  # (k, d)
            node += (labels[int(np.argmin(np.linalg.norm(centroids - embedding, axis=1)))],)
        position = self.leaves[node]
        if position >= self.leaf_size and node:
            parent = node[:-1]
            label = max(self.children[parent]) + 1
            self.children[parent][label] = np.asarray(embedding, dtype=np.float32)
            node, position = parent + (label,), 0
        self.leaves[node] = position + 1
        return [*node, position]

    def check(self, index: IdentifierIndex, source: str) -> None:
        """Every identifier of `index` is a position inside a leaf of this tree."""
        for key, identifiers in index.images.items():
            path = identifier_to_path(identifiers[0])
            if path is None or self.leaves.get(tuple(path[:-1]), 0) <= path[-1]:
                raise GraceInputError(
                    f"{source}: the saved k-means tree has no place for identifier {identifiers[0]!r} of image "
                    f"{key!r}: the codebooks belong to another collection"
                )

    def to_codebooks(self, options: StructuredOptions, tensors: dict[str, np.ndarray]) -> Codebooks:
        """The tree, the options that built it (paths absolute) and the embedding source's `tensors`."""
        child_paths = [[*node, label] for node in sorted(self.children) for label in sorted(self.children[node])]
        centroids = np.zeros((len(child_paths), self.dim), dtype=np.float32)  # (C, d); none when the root is a leaf
        for row, path in enumerate(child_paths):
            centroids[row] = self.children[tuple(path[:-1])][path[-1]]
        metadata = {
            "options": recorded_options(options),
            "child_paths": child_paths,
            "leaves": [[list(leaf), size] for leaf, size in sorted(self.leaves.items())],
        }
        return Codebooks("structured", {"centroids": centroids, **tensors}, metadata)

    @classmethod
    def from_codebooks(cls, codebooks: Codebooks, source: str) -> KMeansTree:
        """The tree `to_codebooks` saved; a malformed one is a `GraceInputError` naming `source`."""
        try:
            centroids, metadata = codebooks.tensors["centroids"], codebooks.metadata
            if centroids.ndim != 2 or len(centroids) != len(metadata["child_paths"]):
                raise ValueError(f"{len(centroids)} centroids for {len(metadata['child_paths'])} tree nodes")
            children: dict[Node, dict[int, np.ndarray]] = defaultdict(dict)
            for path, centroid in zip(metadata["child_paths"], centroids):
                children[tuple(path[:-1])][int(path[-1])] = centroid
            leaves = {tuple(leaf): int(size) for leaf, size in metadata["leaves"]}
            dangling = [
                path for path in metadata["child_paths"] if tuple(path) not in children and tuple(path) not in leaves
            ]
            if dangling:
                raise ValueError(f"node {dangling[0]} is neither split nor leaf")
            return cls(dict(children), leaves, int(metadata["options"]["leaf_size"]), centroids.shape[1])
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise GraceInputError(f"{source}: not a structured k-means tree ({err})") from None


def _tokens(paths: list[list[int]]) -> list[str]:
    """The tokens of `paths`, sorted by (level, value)."""
    pieces = sorted({(level, value) for path in paths for level, value in enumerate(path)})
    return [f"{level}_{value}" for level, value in pieces]


def build(inputs: IdentifierInputs, options: StructuredOptions) -> IdentifierIndex:
    """Structured identifiers of the memorized images; `new_tokens` sorted by (level, value); the tree as the
    index's codebooks."""
    embeddings = embed(options, inputs.images, inputs.num_workers)
    features = embeddings.features
    paths = hierarchical_kmeans(
        features, k=options.k, leaf_size=options.leaf_size, seed=options.seed, n_init=options.kmeans_n_init
    )
    tree = KMeansTree.from_paths(paths, features, options.leaf_size)
    return IdentifierIndex(
        "structured",
        {image.key: [path_to_identifier(path)] for image, path in zip(inputs.images, paths)},
        new_tokens=_tokens(paths),
        report={"levels": max(len(p) for p in paths), "embedding_dim": int(features.shape[1])},
        codebooks=tree.to_codebooks(options, embeddings.tensors),
    )


def extend(
    index: IdentifierIndex, inputs: IdentifierInputs, options: StructuredOptions, codebooks: Codebooks | None
) -> IdentifierIndex:
    """The new images descend the saved tree (see the module docstring), embedded by the source that built it."""
    source = "structured codebooks"
    tree = KMeansTree.from_codebooks(codebooks, source)
    tree.check(index, source)
    recorded = codebooks.metadata["options"]
    fixed = [name for name in TREE_OPTIONS if getattr(options, name) != recorded[name]]
    if fixed:
        raise GraceInputError(
            f"structured identifiers: --{fixed[0].replace('_', '-')} is fixed by the saved tree "
            f"({recorded[fixed[0]]}); new images descend the tree as it is"
        )
    check_same_source("structured", StructuredOptions(**recorded), options)
    width = codebooks.tensors["centroids"].shape[1]
    embeddings = embed_new_images(
        "structured",
        options,
        inputs.images,
        inputs.num_workers,
        codebooks.tensors,
        width,
        "the saved tree's centroids",
    )
    paths = [tree.code(features) for features in embeddings.features]
    identifiers = [path_to_identifier(path) for path in paths]
    codebooks = tree.to_codebooks(options, embeddings.tensors)
    return extended_index(index, inputs.images, identifiers, _tokens(paths), codebooks)


KIND = IdentifierKind(
    "structured",
    build,
    StructuredOptions,
    description="hierarchical k-means path over image embeddings: `0_12-1_5`",
    extend=extend,
    needs_codebooks=True,
)
