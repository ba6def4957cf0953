"""The view of a training image that a step sees: flipped, cropped, JPEG re-encoded, each decided by a hash of
(seed, epoch, row), so that a resumed run sees exactly the views of an unbroken one.

Memorizing one view of each image teaches the model that view; memorizing varied views (i2id) teaches it the image,
which is what query by image needs: a photo of a memorized image is rarely its exact pixels. The retriever's query
crops (`retrieve(images=..., image_views=N)`) are views too (`grace_hf.retrieval.retriever.QUERY_VIEWS`).
"""

from __future__ import annotations

import io
import random
import zlib
from dataclasses import dataclass

from PIL import Image, ImageOps

__all__ = ["ImageViews", "flip_decision"]

MAX_JPEG_QUALITY = 95


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether row `index` is flipped in `epoch`: a hash, so no random state is involved."""
    return zlib.crc32(f"{seed}:{epoch}:{index}".encode()) % 2 == 1


@dataclass(frozen=True)
class ImageViews:
    """Which changes a training image may get.

    Args:
        flip: a horizontal flip for half of the rows of each epoch.
        crop_scale: a random crop keeping between this fraction and all of each side, resized back to the image's
            size (1: no crop).
        jpeg_quality: re-encoding as JPEG of a random quality between this and 95 (0: none).
        original_share: the share of rows (drawn per epoch) that skip the crop and the JPEG, so the exact pixels stay
            among what is memorized.

    Example:
        >>> views = ImageViews(crop_scale=0.7, jpeg_quality=40, original_share=0.25)
        >>> view = views(image, seed=0, epoch=3, index=12)  # the same view on every call with these numbers
    """

    flip: bool = False
    crop_scale: float = 1.0
    jpeg_quality: int = 0
    original_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop scale must be in (0, 1], got {self.crop_scale}")
        if not (self.jpeg_quality == 0 or 1 <= self.jpeg_quality <= MAX_JPEG_QUALITY):
            raise ValueError(f"JPEG quality must be 0 (off) or 1-{MAX_JPEG_QUALITY}, got {self.jpeg_quality}")
        if not 0 <= self.original_share <= 1:
            raise ValueError(f"original share must be in [0, 1], got {self.original_share}")

    @property
    def changes_images(self) -> bool:
        """Whether any view differs from the image (else rows can skip the views)."""
        return self.flip or self.crop_scale < 1 or self.jpeg_quality > 0

    def __call__(self, image: Image.Image, seed: int, epoch: int, index: int) -> Image.Image:
        """The view of `image` (row `index`) in `epoch`, in RGB."""
        image = image.convert("RGB")
        if self.flip and flip_decision(seed, epoch, index):
            image = ImageOps.mirror(image)
        if zlib.crc32(f"{seed}:{epoch}:{index}:original".encode()) < self.original_share * 2**32:
            return image
        rng = random.Random(zlib.crc32(f"{seed}:{epoch}:{index}:view".encode()))
        if self.crop_scale < 1:
            width, height = image.size
            crop_w = max(1, round(width * rng.uniform(self.crop_scale, 1)))
            crop_h = max(1, round(height * rng.uniform(self.crop_scale, 1)))
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            box = (left, top, left + crop_w, top + crop_h)
            image = image.crop(box).resize((width, height), Image.Resampling.BICUBIC)
        if self.jpeg_quality:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=rng.randint(self.jpeg_quality, MAX_JPEG_QUALITY))
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return image
