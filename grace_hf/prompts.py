"""The GRACE task texts, in one place.

- learning to memorize (i2id): `<image>id {identifier}<|endofchunk|>`: the model sees the image, writes its identifier;
- learning to retrieve (t2id): `caption:{query}<image>id {identifier}<|endofchunk|>`;
- retrieval prompt: `caption:{query}<image>`; beam search continues it with `id {identifier}<|endofchunk|>`, the
  token sequence an identifier trie holds;
- query by image: the memorization prompt `<image>` with the query image; continued the same way;
- the pseudo-query captioner: `<image>caption:{caption}<|endofchunk|>`.
"""

from __future__ import annotations

from grace_hf.models.flamingo.tokenization import END_OF_CHUNK_TOKEN, MEDIA_TOKEN

__all__ = [
    "CAPTION_PREFIX",
    "IDENTIFIER_PREFIX",
    "caption_prompt",
    "caption_text",
    "i2id_text",
    "identifier_text",
    "image_query_prompt",
    "query_prompt",
    "t2id_text",
]

CAPTION_PREFIX = "caption:"
IDENTIFIER_PREFIX = "id "


def identifier_text(identifier: str) -> str:
    """What the model writes after the `<image>` of a prompt: `id {identifier}<|endofchunk|>`."""
    return f"{IDENTIFIER_PREFIX}{identifier}{END_OF_CHUNK_TOKEN}"


def i2id_text(identifier: str) -> str:
    """Memorization sample: `<image>id {identifier}<|endofchunk|>`."""
    return f"{MEDIA_TOKEN}{identifier_text(identifier)}"


def image_query_prompt() -> str:
    """Query-by-image prompt: `<image>`, the beginning of the memorization sample, with the query image."""
    return MEDIA_TOKEN


def query_prompt(query: str) -> str:
    """Retrieval prompt: `caption:{query}<image>`."""
    return f"{CAPTION_PREFIX}{query}{MEDIA_TOKEN}"


def t2id_text(query: str, identifier: str) -> str:
    """Retrieval sample: `caption:{query}<image>id {identifier}<|endofchunk|>`."""
    return f"{query_prompt(query)}{identifier_text(identifier)}"


def caption_prompt() -> str:
    """The captioner's prompt, `<image>caption:`; generation continues with the caption."""
    return f"{MEDIA_TOKEN}{CAPTION_PREFIX}"


def caption_text(caption: str) -> str:
    """Captioner sample: `<image>caption:{caption}<|endofchunk|>`."""
    return f"{caption_prompt()}{caption}{END_OF_CHUNK_TOKEN}"
