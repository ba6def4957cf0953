"""The images a retriever ranks: their identifiers, tokenized as the model writes them, in one trie."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IdentifierIndex
from grace_hf.model_dir import TRIE_FILE
from grace_hf.prompts import identifier_text
from grace_hf.retrieval.trie import IdentifierTrie

__all__ = ["Collection", "build_identifier_trie", "identifier_token_ids"]

logger = logging.getLogger(__name__)


def identifier_token_ids(processor, identifiers: Sequence[str]) -> list[list[int]]:
    """Token ids of `id {identifier}<|endofchunk|>` per identifier: what the model writes after `<image>`."""
    texts = [identifier_text(identifier) for identifier in identifiers]
    return processor.tokenizer(texts, add_special_tokens=False)["input_ids"]


def build_identifier_trie(processor, identifiers: Sequence[str]) -> IdentifierTrie:
    """The trie over the token sequences of `identifiers`; an identifier that holds the end token is an error."""
    sequences = identifier_token_ids(processor, identifiers)
    end = processor.end_of_chunk_token_id
    for identifier, sequence in zip(identifiers, sequences):
        if end in sequence[:-1]:
            raise GraceInputError(f"identifier {identifier!r} contains the end-of-chunk token")
    return IdentifierTrie(sequences)


def _same_trie(a: IdentifierTrie, b: IdentifierTrie) -> bool:
    return (
        a.vocab_bound == b.vocab_bound
        and a.num_sequences == b.num_sequences
        and torch.equal(a.edge_keys, b.edge_keys)
        and torch.equal(a.terminal, b.terminal)
    )


@dataclass
class Collection:
    """Candidate images and the identifiers that name them, flattened: identifier `i` names `identifier_images[i]`
    and is sequence `i` of `trie`."""

    image_keys: list[str]
    identifiers: list[str]
    identifier_images: list[str]
    trie: IdentifierTrie

    @classmethod
    def build(
        cls,
        index: IdentifierIndex,
        processor,
        image_keys: Sequence[str] | None = None,
        saved_trie: IdentifierTrie | None = None,
    ) -> Collection:
        """The collection of `image_keys` (default: `index.collection`, else every image of the index).

        The trie is always built from the tokenized identifiers; a `saved_trie` that differs from it (stale, or
        written for another tokenizer) is reported and ignored.
        """
        keys = list(image_keys if image_keys is not None else index.collection or index.images)
        unknown = [key for key in keys if key not in index.images]
        if unknown:
            raise GraceInputError(f"candidates: unknown image key {unknown[0]!r} (not in the model's identifiers)")
        if not keys:
            raise GraceInputError("no candidate images to rank")
        identifiers = [identifier for key in keys for identifier in index.images[key]]
        trie = build_identifier_trie(processor, identifiers)
        if saved_trie is not None and not _same_trie(saved_trie, trie):
            logger.warning("the saved identifier trie does not match the tokenized identifiers: rebuilt")
        return cls(keys, identifiers, [key for key in keys for _ in index.images[key]], trie)


def load_saved_trie(directory: Path) -> IdentifierTrie | None:
    """The trie a model directory saved for its default candidates, or None when it has none or it is corrupt (a
    cache: `Collection.build` rebuilds the trie from the identifiers anyway)."""
    path = directory / TRIE_FILE
    if not path.is_file():
        return None
    try:
        return IdentifierTrie.load(path)
    except (SafetensorError, ValueError, KeyError, OSError):
        return None
