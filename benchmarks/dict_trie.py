"""The original GRACE trie: nested Python dicts, one per node, asked once per beam through `generate`'s
`prefix_allowed_tokens_fn`. The reference the benchmarks and tests compare `IdentifierTrie` to."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["NestedDictTrie"]


class NestedDictTrie:
    """A prefix tree of nested dicts (token -> child dict), as the original code kept it."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.root: dict = {}
        for sequence in sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(token, {})

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """The tokens that may follow `prefix` (insertion order); [] if it leaves the trie or ends a leaf."""
        node = self.root
        for token in prefix:
            if token not in node:
                return []
            node = node[token]
        return list(node)

    def prefix_allowed_tokens_fn(self, prompt_length: int, dead_token_id: int) -> Callable[[int, torch.Tensor], list]:
        """The `generate(prefix_allowed_tokens_fn=...)` callback; a row with no continuation may only take
        `dead_token_id` (transformers refuses an empty list)."""

        def allowed_tokens(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            return self.allowed(input_ids[prompt_length:].tolist()) or [dead_token_id]

        return allowed_tokens
