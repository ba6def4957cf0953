"""Read and validate a Karpathy-split JSON (`dataset_flickr30k.json`, `dataset_coco.json`).

The file holds `images[]`, each with `filename`, an optional `filepath` (COCO: `train2014`/`val2014`),
`imgid`, `split` (train, val, test or restval) and `sentences[].raw`. An image's key is
`filepath/filename`, or `filename` when there is no `filepath`; its file is `image_root/key`.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import read_json
from grace_hf.runtime import default_io_workers, progress_bar

__all__ = [
    "SPLITS",
    "MEMORIZED_SPLITS",
    "KarpathyImage",
    "KarpathyCorpus",
    "check_inside_root",
    "image_file",
    "load_karpathy",
    "normalize_key",
    "teaching_texts",
    "verify_images",
]

SPLITS = ("train", "val", "test", "restval")
MEMORIZED_SPLITS = ("train", "val", "test")  # restval is not memorized, as in the original GRACE


@dataclass(frozen=True)
class KarpathyImage:
    """One image of a Karpathy JSON.

    Args:
        key: `filepath/filename` or `filename`; unique in the corpus.
        path: the image file, `image_root/key`.
        split: train, val, test or restval.
        captions: the human captions (`sentences[].raw`, stripped), in file order.
        imgid: the file's `imgid` (the position in `images[]` when the file has none).
    """

    key: str
    path: Path
    split: str
    captions: list[str]
    imgid: int

    @property
    def filename(self) -> str:
        """The file name without `filepath` (what the original pseudo-query file is keyed by)."""
        return self.key.rsplit("/", 1)[-1]


@dataclass
class KarpathyCorpus:
    """All images of a Karpathy JSON, in file order."""

    json_path: Path
    image_root: Path
    images: list[KarpathyImage] = field(default_factory=list)

    def split(self, name: str) -> list[KarpathyImage]:
        """The images of one split, in file order."""
        return [image for image in self.images if image.split == name]

    def memorized(self) -> list[KarpathyImage]:
        """The images that get identifiers: train, val and test (not restval), in file order."""
        return [image for image in self.images if image.split in MEMORIZED_SPLITS]

    def caption_queries(self, split: str) -> list[tuple[str, str]]:
        """`(caption, image key)` for every human caption of the images of `split`: the queries that rank them."""
        return [(caption, image.key) for image in self.split(split) for caption in image.captions]

    def split_counts(self) -> dict[str, int]:
        """Number of images per split, every split listed."""
        return {name: sum(image.split == name for image in self.images) for name in SPLITS}


def teaching_texts(image: KarpathyImage, pseudo_queries: Mapping[str, list[str]] | None) -> tuple[list[str], str]:
    """The texts that teach a memorized image (query -> image), and their source: a train image's human captions
    ("human_caption"), else its pseudo-queries ("pseudo_query"; none when it has none). The human captions of val
    and test images are evaluation queries: they never teach, so they cannot leak into training."""
    if image.split == "train":
        return list(image.captions), "human_caption"
    return list((pseudo_queries or {}).get(image.key, [])), "pseudo_query"


def normalize_key(key: str) -> str | None:
    """`key` with `./`, `//` and trailing `/` removed (`./images//a.png` -> `images/a.png`); None when it is empty,
    absolute, or leaves its root (`..`, `../x`)."""
    if not key or key.startswith("/"):
        return None
    normal = posixpath.normpath(key)
    if normal in (".", "..") or normal.startswith("../"):
        return None
    return normal


def image_file(image_root: str | os.PathLike, key: str) -> Path:
    """The file of image `key` under `image_root`; a key that leaves the root is a `GraceInputError`."""
    normal = normalize_key(key)
    if normal is None:
        raise GraceInputError(f"image key {key!r} is not a path inside the image root {image_root}")
    return check_inside_root(Path(image_root), Path(image_root) / normal, f"image {key!r}")


def check_inside_root(image_root: Path, path: Path, item: str) -> Path:
    """`path`, when it stays inside `image_root` with every symbolic link followed; else a `GraceInputError` naming
    `item` and where the link leads (a file outside the root must not end up in an output)."""
    real = path.resolve()
    if image_root.resolve() not in real.parents:
        raise GraceInputError(
            f"{item}: {path} leads outside the image root {image_root} (to {real}); links out of the root are refused"
        )
    return path


def _item(json_path: Path, index: int, entry: dict) -> str:
    name = entry.get("filename") if isinstance(entry, dict) else None
    return f"{json_path}: images[{index}]" + (f" ({name!r})" if isinstance(name, str) else "")


def _parse_image(json_path: Path, image_root: Path, index: int, entry: object) -> KarpathyImage:
    item = _item(json_path, index, entry)  # type: ignore[arg-type]
    if not isinstance(entry, dict):
        raise GraceInputError(f"{item}: expected an object, got {type(entry).__name__}")
    for key in ("filename", "split", "sentences"):
        if key not in entry:
            raise GraceInputError(f"{item}: missing key {key!r}")
    filename, filepath = entry["filename"], entry.get("filepath")
    if not isinstance(filename, str) or not filename.strip() or "/" in filename or filename in (".", ".."):
        raise GraceInputError(f"{item}: 'filename' must be a non-empty file name, got {filename!r}")
    if filepath is not None and not isinstance(filepath, str):
        raise GraceInputError(f"{item}: 'filepath' must be a string, got {filepath!r}")
    if entry["split"] not in SPLITS:
        raise GraceInputError(f"{item}: unknown split {entry['split']!r} (expected one of {', '.join(SPLITS)})")
    imgid = entry.get("imgid", index)
    if not isinstance(imgid, int) or isinstance(imgid, bool):
        raise GraceInputError(f"{item}: 'imgid' must be an integer, got {imgid!r}")
    sentences = entry["sentences"]
    if not isinstance(sentences, list):
        raise GraceInputError(f"{item}: 'sentences' must be a list")
    captions = []
    for j, sentence in enumerate(sentences):
        if not isinstance(sentence, dict) or "raw" not in sentence:
            raise GraceInputError(f"{item}: sentences[{j}] has no 'raw' caption")
        raw = sentence["raw"]
        if not isinstance(raw, str) or not raw.strip():
            raise GraceInputError(f"{item}: empty caption in sentences[{j}]")
        captions.append(raw.strip())
    key = normalize_key(f"{filepath}/{filename}" if filepath else filename)
    if key is None:
        raise GraceInputError(f"{item}: 'filepath' {filepath!r} leaves the image root {image_root}")
    path = check_inside_root(image_root, image_root / key, item)
    return KarpathyImage(key=key, path=path, split=entry["split"], captions=captions, imgid=imgid)


def _check_one(image: KarpathyImage) -> str | None:
    """None if the file exists and decodes, else why not."""
    if not image.path.is_file():
        return f"image file not found: {image.path}"
    try:
        with Image.open(image.path) as im:
            im.load()
    except Exception as err:  # PIL raises many types for broken files
        return f"image does not decode: {image.path}: {type(err).__name__}: {err}"
    return None


def verify_images(corpus: KarpathyCorpus, num_workers: int | None = None, splits: Collection[str] = SPLITS) -> None:
    """Check in parallel that every image file (of `splits`) exists and decodes; the first failure is a
    GraceInputError."""
    positions = [i for i, image in enumerate(corpus.images) if image.split in splits]
    images = [corpus.images[i] for i in positions]
    workers = num_workers or default_io_workers()
    with ThreadPoolExecutor(workers) as pool:
        problems = list(
            progress_bar(pool.map(_check_one, images, chunksize=64), total=len(images), desc="checking images")
        )
    bad = [(i, p) for i, p in zip(positions, problems) if p is not None]
    if bad:
        i, problem = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise GraceInputError(f"{corpus.json_path}: images[{i}] ({corpus.images[i].key!r}): {problem}{more}")


def load_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    check_images: bool = True,
    num_workers: int | None = None,
) -> KarpathyCorpus:
    """Read and validate a Karpathy JSON; with `check_images`, also every image file.

    Raises `GraceInputError` naming the file and the item for malformed JSON, a missing key, an
    unknown split, an empty caption, a duplicate image key, or an image that is missing or does not decode.

    Example:
        >>> corpus = load_karpathy("data/dataset_flickr30k.json", "data/Flickr30K/flickr30k-images")
        >>> corpus.split_counts()
        {'train': 29000, 'val': 1014, 'test': 1000, 'restval': 0}
    """
    json_path, image_root = Path(json_path), Path(image_root)
    data = read_json(json_path, "Karpathy JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise GraceInputError(f"{json_path}: expected an object with an 'images' list")
    if not data["images"]:
        raise GraceInputError(f"{json_path}: 'images' is empty")
    if not image_root.is_dir():
        raise GraceInputError(f"{image_root}: image root is not a directory (for {json_path})")

    corpus = KarpathyCorpus(json_path=json_path, image_root=image_root)
    first_index: dict[str, int] = {}
    for index, entry in enumerate(data["images"]):
        image = _parse_image(json_path, image_root, index, entry)
        if image.key in first_index:
            raise GraceInputError(
                f"{json_path}: images[{index}]: duplicate image key {image.key!r} (first at images[{first_index[image.key]}])"
            )
        first_index[image.key] = index
        corpus.images.append(image)
    if check_images:
        verify_images(corpus, num_workers)
    return corpus
