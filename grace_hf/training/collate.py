"""Rows of the prepared datasets -> model batches, with the loss on the identifier part only.

Three sample kinds share one collator (texts from `grace_hf.prompts`):

- i2id:    `<image>id {identifier}<|endofchunk|>` with the row's image;
- t2id:    `caption:{query}<image>id {identifier}<|endofchunk|>`, with no image or the constant blank image;
- caption: `<image>caption:{caption}<|endofchunk|>` (the pseudo-query captioner).

Labels copy the tokens after the first `<image>` up to and including the first `<|endofchunk|>` after it and are
-100 everywhere else (prompt, `<image>`, padding, anything after the end of the chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from grace_hf.prompts import caption_text, i2id_text, t2id_text

__all__ = ["GraceCollator", "identifier_labels", "truncate_words"]

IGNORE_INDEX = -100


def truncate_words(text: str, max_words: int) -> str:
    """The first `max_words` whitespace-separated words of `text`."""
    return " ".join(text.split()[:max_words])


def identifier_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, media_token_id: int, end_token_id: int
) -> torch.Tensor:
    """Labels that keep only the tokens after the first `<image>` through the first `<|endofchunk|>` after it.

    Args:
        input_ids: (B, T) token ids, right padded.
        attention_mask: (B, T) 1 on real tokens.
    Returns:
        (B, T) labels: `input_ids` on those tokens, -100 elsewhere.
    """
    seen_media = (input_ids == media_token_id).cumsum(dim=-1) > 0  # (B, T) at or after the first <image>
    after_media = F.pad(seen_media[:, :-1], (1, 0), value=False)  # (B, T) strictly after it
    is_end = (input_ids == end_token_id) & after_media  # (B, T)
    ended_before = F.pad(is_end.cumsum(dim=-1)[:, :-1], (1, 0), value=0) > 0  # (B, T) an end strictly before
    keep = after_media & ~ended_before & attention_mask.bool()  # (B, T)
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


@dataclass
class GraceCollator:
    """Collate rows of one task into `input_ids`, `attention_mask`, `labels` and (when the task has one)
    `pixel_values` (B, 1, 1, C, H, W).

    Args:
        processor: a `FlamingoProcessor`.
        task: "i2id" (rows: image, identifier), "t2id" (rows: query, identifier) or "caption" (rows: image,
            caption); images are used as given (their training views come from `grace_hf.training.views`).
        t2id_image: "none" (t2id batches carry no pixel values) or "blank" (the processor's constant pad image).
        max_query_words: t2id queries and captions are cut to this many words.

    Example:
        >>> collate = GraceCollator(processor, "t2id")
        >>> batch = collate([{"query": "a red circle", "identifier": "0_1-1_2"}])
        >>> sorted(batch)
        ['attention_mask', 'input_ids', 'labels']
    """

    processor: Any
    task: Literal["i2id", "t2id", "caption"]
    t2id_image: Literal["none", "blank"] = "none"
    max_query_words: int = 25

    def __post_init__(self) -> None:
        if self.task not in ("i2id", "t2id", "caption"):
            raise ValueError(f"unknown task {self.task!r}")
        if self.t2id_image not in ("none", "blank"):
            raise ValueError(f"t2id_image must be 'none' or 'blank', got {self.t2id_image!r}")

    def _text(self, row: dict[str, Any]) -> str:
        if self.task == "i2id":
            return i2id_text(row["identifier"])
        if self.task == "t2id":
            return t2id_text(truncate_words(row["query"], self.max_query_words), row["identifier"])
        return caption_text(truncate_words(row["caption"], self.max_query_words))

    @cached_property
    def _blank_pixel_values(self) -> torch.Tensor:
        """The pad image, processed once: (1, 1, 1, C, H, W)."""
        return self.processor(text=[""], images=[self.processor.blank_image()])["pixel_values"]

    def _images(self, rows: Sequence[dict[str, Any]]) -> list[Image.Image] | None:
        if self.task == "t2id":
            return None
        return [row["image"].convert("RGB") for row in rows]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor(text=[self._text(row) for row in rows], images=self._images(rows), padding_side="right")
        batch = dict(batch)
        if self.task == "t2id" and self.t2id_image == "blank":
            batch["pixel_values"] = self._blank_pixel_values.expand(len(rows), -1, -1, -1, -1, -1).clone()
        batch["labels"] = identifier_labels(
            batch["input_ids"],
            batch["attention_mask"],
            self.processor.media_token_id,
            self.processor.end_of_chunk_token_id,
        )
        return batch
