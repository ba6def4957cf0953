"""Reading images: opening a file as RGB, a query image (a file or a PIL image) with a clear error, and reading many
in threads to encode them in batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from PIL import Image

from grace_hf.errors import GraceInputError
from grace_hf.runtime import default_io_workers, progress_bar

__all__ = ["QueryImage", "encode_images", "read_query_image", "read_rgb"]

QueryImage = Image.Image | str | os.PathLike  # a query image: a PIL image or an image file


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as RGB (gray, palette and RGBA images converted)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def read_query_image(image: QueryImage, where: str) -> Image.Image:
    """A query image as RGB: a PIL image converted, or the file read; anything else (a missing, corrupt or
    truncated file, not an image) is a `GraceInputError` naming the file (or `where`, for a non-file)."""
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
    elif not isinstance(image, str | os.PathLike):
        raise GraceInputError(f"{where}: expected a PIL image or an image file path, got {type(image).__name__}")
    else:
        try:
            rgb = read_rgb(image)
        except FileNotFoundError:
            raise GraceInputError(f"{os.fspath(image)}: no such image file") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise GraceInputError(f"{os.fspath(image)}: not a readable image ({err})") from None
        where = os.fspath(image)
    if 0 in rgb.size:
        raise GraceInputError(f"{where}: an empty image ({rgb.width}x{rgb.height} pixels)")
    return rgb


def encode_images(
    paths: Sequence[str | os.PathLike],
    transform: Callable[[Image.Image], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    desc: str = "image features",
) -> torch.Tensor:
    """L2-normalised embeddings (N, d) of the images at `paths`, in order: files read by threads, `transform` per
    image, `encode` per batch of (B, C, H, W) pixels, with a progress bar."""
    chunks = []
    with torch.inference_mode(), ThreadPoolExecutor(num_workers or default_io_workers()) as pool:
        for start in progress_bar(range(0, len(paths), batch_size), desc=desc):
            batch = paths[start : start + batch_size]
            pixels = torch.stack(list(pool.map(lambda path: transform(read_rgb(path)), batch)))  # (B, C, H, W)
            chunks.append(F.normalize(encode(pixels.to(device)).float(), dim=-1).cpu())  # (B, d)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)
