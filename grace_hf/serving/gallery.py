"""A self-contained HTML page of retrieval results: each query with its ranked images as thumbnails (data URIs),
the gold image framed in green when it is known; optionally, images beside the pseudo-queries a captioner wrote."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from grace_hf.data.images import read_rgb
from grace_hf.data.karpathy import image_file
from grace_hf.data.prepared import load_prepared
from grace_hf.io_utils import atomic_write_text
from grace_hf.retrieval.results import RetrievedImage

__all__ = [
    "GALLERY_FILE",
    "CaptionedImage",
    "GalleryEntry",
    "dataset_image_loader",
    "folder_image_loader",
    "render_gallery",
    "write_gallery",
]

GALLERY_FILE = "gallery.html"

ImageLoader = Callable[[str], "Image.Image | None"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
section { margin-bottom: 28px; }
h2 { font-size: 16px; margin: 0 0 4px; }
.gold-key { color: #555; font-size: 13px; margin-bottom: 8px; }
.hits { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: SIZEpx; font-size: 11px; text-align: center; word-break: break-all; }
figure img, figure .missing { width: SIZEpx; height: SIZEpx; object-fit: cover; border: 4px solid #ddd;
  box-sizing: border-box; display: block; background: #f2f2f2; }
figure.gold img, figure.gold .missing { border-color: #1a9c3b; }
figure.gold figcaption { color: #1a9c3b; font-weight: bold; }
figure.absent { opacity: 0.6; }
figure.query img { border-color: #3b6fd1; }
.missing { line-height: SIZEpx; color: #999; }
.captioned { display: flex; gap: 14px; align-items: center; margin-bottom: 10px; font-size: 13px; }
.captioned ul { margin: 0; padding-left: 18px; }
.human { color: #555; }
"""


@dataclass
class GalleryEntry:
    """One query, its ranked results, its gold image key if known, and the query image of a query by image."""

    query: str
    hits: Sequence[RetrievedImage]
    gold: str | None = None
    query_image: Image.Image | None = None


@dataclass
class CaptionedImage:
    """An image with the pseudo-queries a captioner wrote for it and a human caption to compare them with."""

    image_key: str
    pseudo_queries: Sequence[str]
    human_caption: str | None = None


def _captioned_section(images: Sequence[CaptionedImage], load_image: ImageLoader | None, size: int) -> str:
    rows = []
    for item in images:
        picture = _thumbnail(load_image(item.image_key) if load_image is not None else None, size)
        queries = "".join(f"<li>{html.escape(query)}</li>" for query in item.pseudo_queries)
        human = f'<div class="human">human: {html.escape(item.human_caption)}</div>' if item.human_caption else ""
        rows.append(
            f'<div class="captioned" title="{html.escape(item.image_key)}">{picture}'
            f"<div><ul>{queries}</ul>{human}</div></div>"
        )
    return "<section><h2>What the captioner wrote (pseudo-queries)</h2>" + "".join(rows) + "</section>"


def _thumbnail(image: Image.Image | None, size: int) -> str:
    if image is None:
        return '<div class="missing">no image</div>'
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _figure(key: str, caption: str, classes: str, load_image: ImageLoader | None, size: int) -> str:
    image = load_image(key) if load_image is not None else None
    return (
        f'<figure class="{classes}" title="{html.escape(key)}">{_thumbnail(image, size)}'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_gallery(
    entries: Sequence[GalleryEntry],
    load_image: ImageLoader | None = None,
    title: str = "GRACE retrieval",
    size: int = 112,
    captioned: Sequence[CaptionedImage] = (),
) -> str:
    """The page as a string; `load_image(image_key)` gives the picture of a key (None: a placeholder); `captioned`
    adds a last section of images with their pseudo-queries."""
    sections = []
    for entry in entries:
        figures = []
        if entry.query_image is not None:
            figures.append(
                f'<figure class="query">{_thumbnail(entry.query_image, size)}<figcaption>query</figcaption></figure>'
            )
        for rank, hit in enumerate(entry.hits, start=1):
            is_gold = hit.image_key == entry.gold
            caption = f"{rank}. {hit.image_key}" + (" (gold)" if is_gold else "") + f" · {hit.score:.2f}"
            figures.append(_figure(hit.image_key, caption, "gold" if is_gold else "", load_image, size))
        if entry.gold is not None and all(hit.image_key != entry.gold for hit in entry.hits):
            figures.append(_figure(entry.gold, f"gold, not retrieved: {entry.gold}", "gold absent", load_image, size))
        gold_line = f'<div class="gold-key">gold: {html.escape(entry.gold)}</div>' if entry.gold is not None else ""
        sections.append(
            f"<section><h2>{html.escape(entry.query)}</h2>{gold_line}"
            f'<div class="hits">{"".join(figures) or "no results"}</div></section>'
        )
    if captioned:
        sections.append(_captioned_section(captioned, load_image, size))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE.replace('SIZE', str(size))}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_gallery(path: str | os.PathLike, entries: Sequence[GalleryEntry], **kwargs) -> Path:
    """Write `render_gallery(entries, **kwargs)` to `path` atomically; return the path."""
    atomic_write_text(path, render_gallery(entries, **kwargs))
    return Path(path)


def folder_image_loader(image_root: str | os.PathLike) -> ImageLoader:
    """Images as files `<image_root>/<image key>` (the Karpathy layout); None where a file is missing or does not
    decode; a key that leaves the root is a `GraceInputError`."""

    def load(key: str) -> Image.Image | None:
        path = image_file(image_root, key)
        try:
            return read_rgb(path) if path.is_file() else None
        except (OSError, ValueError, Image.DecompressionBombError):  # undecodable, or too large to decode safely
            return None

    return load


def dataset_image_loader(data: str | os.PathLike) -> ImageLoader:
    """Images from the `i2id` split of a prepared dataset (which embeds them); None for unknown keys."""
    split = load_prepared(data)["i2id"]
    row_of: dict[str, int] = {}
    for row, key in enumerate(split["image_key"]):
        row_of.setdefault(key, row)

    def load(key: str) -> Image.Image | None:
        return split[row_of[key]]["image"] if key in row_of else None

    return load
