"""FlamingoProcessor: the tokenizer (with the model's special tokens) and CLIP image processing."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from PIL import Image
from transformers import BatchFeature, CLIPImageProcessor, ProcessorMixin

from .tokenization import END_OF_CHUNK_TOKEN, MEDIA_TOKEN, PAD_TOKEN, train_tokenizer

__all__ = ["FlamingoProcessor"]


class FlamingoProcessor(ProcessorMixin):
    """Turns texts (and one image per text) into Flamingo inputs; knows the model's special tokens only (the task
    texts live in `grace_hf.prompts`).

    Args:
        image_processor (`CLIPImageProcessor`): bicubic resize + center crop + OpenAI CLIP normalisation.
        tokenizer (`PreTrainedTokenizerFast`): must know `<|endofchunk|>`, `<image>` and `<PAD>` (added if missing).

    Example:
        >>> processor = FlamingoProcessor.from_texts(["a dog", "id 1 2"], image_size=32, vocab_size=300)
        >>> batch = processor(text=["<image>a dog"], images=[processor.blank_image()])
        >>> batch["pixel_values"].shape
        torch.Size([1, 1, 1, 3, 32, 32])
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        missing = [t for t in (END_OF_CHUNK_TOKEN, MEDIA_TOKEN) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        tokenizer.eos_token = END_OF_CHUNK_TOKEN
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_texts(cls, texts: Iterable[str], image_size: int, vocab_size: int = 2000) -> FlamingoProcessor:
        """A processor with a freshly trained tokenizer and a CLIP image processor for `image_size` pixels."""
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        return cls(image_processor=image_processor, tokenizer=train_tokenizer(texts, vocab_size))

    # ids of the special tokens
    @property
    def media_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)

    @property
    def end_of_chunk_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def image_size(self) -> int:
        return self.image_processor.crop_size["height"]

    def add_identifier_tokens(self, new_tokens: list[str]) -> int:
        """Add identifier tokens (structured/atomic/rq kinds) as whole tokens; returns how many were new.
        Resize the model afterwards: `model.resize_token_embeddings(len(processor.tokenizer))`."""
        return self.tokenizer.add_tokens(list(new_tokens))

    def blank_image(self) -> Image.Image:
        """The constant mid-gray "pad image" of the model's image size."""
        return Image.new("RGB", (self.image_size, self.image_size), (128, 128, 128))

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Image.Image | list[Image.Image] | None = None,
        padding_side: str = "right",
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Tokenize `text` (padded to the longest, `padding_side` "left" for generation) and, when given, one image
        per text as `pixel_values` (B, 1, 1, C, H, W). Extra keyword arguments go to the tokenizer."""
        if text is None:
            raise ValueError("FlamingoProcessor needs text")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        encoding = self.tokenizer(
            texts, padding=True, padding_side=padding_side, return_tensors=return_tensors, **kwargs
        )
        data = dict(encoding)
        if images is not None:
            image_list = [images] if isinstance(images, Image.Image) else list(images)
            if len(image_list) != len(texts):
                raise ValueError(f"got {len(image_list)} images for {len(texts)} texts; pass one image per text")
            pixel_values = self.image_processor(image_list, return_tensors="pt")["pixel_values"]  # (B, C, H, W)
            data["pixel_values"] = pixel_values[:, None, None]  # (B, 1, 1, C, H, W)
        return BatchFeature(data=data)

    def batch_decode(self, sequences: torch.Tensor | list[list[int]], **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, **kwargs)

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)
