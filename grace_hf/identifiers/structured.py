"""Structured identifiers: an image's path in a hierarchical k-means tree over its embedding (DESIGN.md §3).

The memorized images are split into k clusters; a cluster of more than `leaf_size` images is split
again, a smaller one stops and each member takes its position in it as the last part. Each part is
one new vocabulary token `{level}_{value}`; an identifier joins them with `-`: `0_12-1_5-2_3`.

Embeddings come from one of:
- an open_clip model (`clip_model` a built-in name, a model config JSON file, bare or as open_clip's
  `open_clip_config.json`, or `local-dir:DIR`; `clip_pretrained` a local weights file):
  `encode_image`, L2-normalised;
- a features file (`image_features`): safetensors with tensor `features` (N, d) and metadata
  `image_keys` (JSON list of image keys), as the dense baseline writes it;
- `pixel_features`: the image's 16x16 thumbnail, centred and L2-normalised; no model, for offline demos.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from grace_hf.data.karpathy import KarpathyImage
from grace_hf.errors import GraceInputError
from grace_hf.identifiers.index import IdentifierIndex

__all__ = [
    "build",
    "check_embedding_source",
    "hierarchical_kmeans",
    "path_to_identifier",
    "clip_embeddings",
    "load_image_features",
    "pixel_embeddings",
]

MINIBATCH_ABOVE = 1000  # the original: MiniBatchKMeans (batch 1000) above 1000 points, KMeans below
PIXEL_SIDE = 16


def _cluster(features: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """Cluster labels (n,) for `features` (n, d)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

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
        raise GraceInputError(f"structured identifiers: need k >= 2 and leaf size >= 1, got k={k}, leaf={leaf_size}")
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


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def pixel_embeddings(images: list[KarpathyImage], num_workers: int | None = None) -> np.ndarray:
    """(N, 768) centred, L2-normalised 16x16 RGB thumbnails: carries colour and layout, needs no model."""

    def thumb(image: KarpathyImage) -> np.ndarray:
        small = _read_rgb(image.path).resize((PIXEL_SIDE, PIXEL_SIDE), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0

    with ThreadPoolExecutor(num_workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        rows = list(tqdm(pool.map(thumb, images), total=len(images), desc="pixel features"))
    features = np.stack(rows)  # (N, 768)
    features -= features.mean(axis=0, keepdims=True)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-8)


def _register_config(path: str) -> tuple[str, dict]:
    """Register an open_clip config JSON (bare, or `{"model_cfg", "preprocess_cfg"}` as open_clip saves it);
    return the model name and the preprocessing overrides."""
    import open_clip

    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraceInputError(f"{path}: open_clip model config not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GraceInputError(f"{path}: not valid JSON: {err}") from None
    model_cfg = config.get("model_cfg", config) if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise GraceInputError(f"{path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    name = Path(path).stem
    with tempfile.TemporaryDirectory() as tmp:  # open_clip registers configs from files, read at once
        (Path(tmp) / f"{name}.json").write_text(json.dumps(model_cfg), encoding="utf-8")
        open_clip.add_model_config(Path(tmp) / f"{name}.json")
    preprocess = config.get("preprocess_cfg", {}) if "model_cfg" in config else {}
    return name, {f"image_{k}": preprocess[k] for k in ("mean", "std", "interpolation") if k in preprocess}


def _open_clip_model(clip_model: str, clip_pretrained: str | None):
    import open_clip

    name, overrides = clip_model, {}
    if clip_model.endswith(".json"):
        name, overrides = _register_config(clip_model)
    if not name.startswith("local-dir:"):
        if not clip_pretrained:
            raise GraceInputError(f"--clip-model {clip_model}: needs --clip-pretrained FILE (a local weights file)")
        if not Path(clip_pretrained).is_file():
            raise GraceInputError(f"{clip_pretrained}: CLIP weights file not found")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=clip_pretrained, **overrides)
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as err:
        raise GraceInputError(f"--clip-model {clip_model} --clip-pretrained {clip_pretrained}: {err}") from None
    return model.eval(), preprocess


def clip_embeddings(
    images: list[KarpathyImage],
    clip_model: str,
    clip_pretrained: str | None,
    batch_size: int = 64,
    device: str = "cpu",
    num_workers: int | None = None,
) -> np.ndarray:
    """(N, d) L2-normalised open_clip image embeddings, batched with a progress bar; images read by threads."""
    import torch
    import torch.nn.functional as F

    model, preprocess = _open_clip_model(clip_model, clip_pretrained)
    model.to(device)
    chunks = []
    with torch.inference_mode(), ThreadPoolExecutor(num_workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        for start in tqdm(range(0, len(images), batch_size), desc="CLIP features"):
            batch = images[start : start + batch_size]
            pixels = torch.stack(
                list(pool.map(lambda image: preprocess(_read_rgb(image.path)), batch))
            )  # (B, C, H, W)
            chunks.append(F.normalize(model.encode_image(pixels.to(device)).float(), dim=-1).cpu())  # (B, d)
    return torch.cat(chunks).numpy()


def load_image_features(path: str | os.PathLike, images: list[KarpathyImage]) -> np.ndarray:
    """Rows of a features file for `images`, in their order; every image must be present."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            if "features" not in f.keys():
                raise GraceInputError(f"{path}: no tensor 'features'")
            features = f.get_tensor("features")
    except FileNotFoundError:
        raise GraceInputError(f"{path}: image features file not found") from None
    except SafetensorError as err:
        raise GraceInputError(f"{path}: not a safetensors file: {err}") from None
    try:
        keys = json.loads(metadata["image_keys"])
    except (KeyError, json.JSONDecodeError):
        raise GraceInputError(f"{path}: metadata 'image_keys' must be a JSON list of image keys") from None
    if features.ndim != 2 or not isinstance(keys, list) or len(keys) != len(features):
        raise GraceInputError(f"{path}: 'features' must be (N, d) with N = len(image_keys)")
    row = {key: i for i, key in enumerate(keys)}
    missing = [image.key for image in images if image.key not in row]
    if missing:
        raise GraceInputError(f"{path}: no features for image {missing[0]!r} ({len(missing)} images missing)")
    return features[[row[image.key] for image in images]].astype(np.float32)


def check_embedding_source(clip_model: str | None, image_features: object, pixel_features: bool) -> None:
    """Exactly one embedding source must be given (checked before any image is read)."""
    if sum([clip_model is not None, image_features is not None, bool(pixel_features)]) != 1:
        raise GraceInputError(
            "structured identifiers need exactly one embedding source: --clip-model NAME --clip-pretrained FILE, "
            "--image-features FILE or --pixel-features"
        )


def build(
    images: list[KarpathyImage],
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    image_features: str | os.PathLike | None = None,
    pixel_features: bool = False,
    k: int = 30,
    leaf_size: int = 30,
    seed: int = 0,
    n_init: int = 1,
    batch_size: int = 64,
    device: str = "cpu",
    num_workers: int | None = None,
) -> IdentifierIndex:
    """Structured identifiers from exactly one embedding source; `new_tokens` sorted by (level, value)."""
    check_embedding_source(clip_model, image_features, pixel_features)
    if clip_model is not None:
        features = clip_embeddings(images, clip_model, clip_pretrained, batch_size, device, num_workers)
    elif image_features is not None:
        features = load_image_features(image_features, images)
    else:
        features = pixel_embeddings(images, num_workers)
    paths = hierarchical_kmeans(features, k=k, leaf_size=leaf_size, seed=seed, n_init=n_init)
    pieces = sorted({(level, value) for path in paths for level, value in enumerate(path)})
    return IdentifierIndex(
        "structured",
        {image.key: [path_to_identifier(path)] for image, path in zip(images, paths)},
        new_tokens=[f"{level}_{value}" for level, value in pieces],
        report={"levels": max(len(p) for p in paths), "embedding_dim": int(features.shape[1])},
    )
