"""The identifier trie as flat tensors, and the logits processor that constrains beam search to it.

The original GRACE code kept a nested Python dict and asked it for the allowed tokens once per beam through
`prefix_allowed_tokens_fn`. Here the trie is two flat tensors, and one processor call masks every row of a
generation step at once, on the scores' device:

- nodes are numbered breadth first (root = 0), the children of a node in token order, so the edges of a node are
  contiguous and the child reached through edge `e` is node `e + 1`;
- `edge_keys` (N - 1): `parent * vocab_bound + token` of each edge, sorted. A child lookup is one `searchsorted`
  for all rows at once, a node's edges are the keys in `[node * vocab_bound, (node + 1) * vocab_bound)` (CSR
  offsets found by search instead of stored), and an edge's token is `key % vocab_bound`;
- `terminal` (N): the index of the sequence that ends at a node, -1 where none does.

12 bytes per node: a million numeric identifiers (about two million nodes) take 24 MB.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LogitsProcessor

_FORMAT = "grace_hf.identifier_trie.v1"
_TABLES = ("edge_keys", "terminal")


class IdentifierTrie:
    """A prefix tree over token-id sequences: the tokenized identifiers of a collection.

    Args:
        sequences: one non-empty token-id sequence per identifier (for GRACE the tokens of
            `id <ID><|endofchunk|>`). A sequence may be a prefix of another; a repeated sequence maps to its
            first occurrence.
        metadata: string metadata saved with the trie (e.g. a fingerprint of what it was built from).

    Example:
        >>> trie = IdentifierTrie([[5, 7, 2], [5, 8, 2]])
        >>> trie.allowed([5])
        [7, 8]
        >>> trie.lookup(torch.tensor([[5, 8, 2], [5, 9, 2]])).tolist()
        [1, -1]
    """

    def __init__(self, sequences: Sequence[Sequence[int]], metadata: dict[str, str] | None = None):
        keys, terminal, vocab_bound, max_depth = _build_tables(sequences)
        self._init_tables(keys, terminal, vocab_bound, max_depth, len(sequences), metadata)

    def _init_tables(self, edge_keys, terminal, vocab_bound, max_depth, num_sequences, metadata) -> None:
        self.edge_keys = edge_keys  # (N - 1,) int64, sorted
        self.terminal = terminal  # (N,) int32
        self.vocab_bound = int(vocab_bound)
        self.max_depth = int(max_depth)
        self.num_sequences = int(num_sequences)
        self.metadata = dict(metadata or {})
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_nodes(self) -> int:
        return self.terminal.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables: what the trie costs in memory."""
        return sum(t.numel() * t.element_size() for t in (self.edge_keys, self.terminal))

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (
            f"IdentifierTrie(sequences={self.num_sequences}, nodes={self.num_nodes}, "
            f"max_depth={self.max_depth}, vocab_bound={self.vocab_bound})"
        )

    def tables(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """`(edge_keys, terminal)` on `device`, copied once per device; the keys end with one sentinel larger than
        any key, so a search never runs past the end."""
        device = torch.device(device)
        if device not in self._on_device:
            sentinel = torch.tensor([torch.iinfo(torch.int64).max])
            self._on_device[device] = (torch.cat([self.edge_keys, sentinel]).to(device), self.terminal.to(device))
        return self._on_device[device]

    def walk(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The node each row of `tokens` (R, T) reaches from the root, -1 where it leaves the trie.

        `lengths` (R,) limits the walk of each row to its first `lengths[r]` tokens (default: all T).
        """
        keys, _ = self.tables(tokens.device)
        # a token outside [0, vocab_bound) gets a key below every node's range, so it is never found
        outside = -(self.num_nodes + 1) * self.vocab_bound
        tokens = torch.where((tokens >= 0) & (tokens < self.vocab_bound), tokens.long(), outside)  # (R, T)
        node = torch.zeros(tokens.shape[0], dtype=torch.int64, device=tokens.device)  # (R,)
        for depth in range(tokens.shape[1]):
            if depth < self.max_depth:
                key = torch.add(tokens[:, depth], node, alpha=self.vocab_bound)  # (R,) negative for a dead row
                pos = torch.searchsorted(keys, key)
                child = torch.where(keys.take(pos) == key, pos + 1, -1)
            else:
                child = torch.full_like(node, -1)
            node = child if lengths is None else torch.where(depth < lengths, child, node)
        return node

    def edge_ranges(self, node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first edge (R,) and the number of edges (R,) of each node; 0 edges for -1 (no node)."""
        keys, _ = self.tables(node.device)
        bounds = torch.searchsorted(keys, torch.stack([node, node + 1]) * self.vocab_bound)  # (2, R)
        return bounds[0], torch.where(node >= 0, bounds[1] - bounds[0], 0)

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """The tokens that may follow `prefix` (sorted); [] if `prefix` is not in the trie or ends a leaf."""
        node = self.walk(torch.tensor([list(prefix)], dtype=torch.int64).reshape(1, -1))  # (1,)
        start, count = self.edge_ranges(node)
        return (self.edge_keys[start[0] : start[0] + count[0]] % self.vocab_bound).tolist()

    def lookup(self, sequences: torch.Tensor, end_token_id: int | None = None) -> torch.Tensor:
        """The index of the sequence each row of `sequences` (R, T) spells exactly, -1 where it spells none.

        With `end_token_id`, a row is read up to and including its first end token: beam search fills the rest
        of a finished beam with padding (or with the end token itself when the pad id is 0).
        """
        lengths = None
        if end_token_id is not None:
            is_end = (sequences == end_token_id).long()  # (R, T)
            lengths = torch.where(is_end.any(1), is_end.argmax(1) + 1, sequences.shape[1])  # (R,)
        node = self.walk(sequences, lengths)  # (R,)
        _, terminal = self.tables(sequences.device)
        return torch.where(node >= 0, terminal[node.clamp(min=0)].long(), -1)

    def logits_processor(
        self, prompt_length: int, dead_token_id: int | None = None, inplace: bool = False
    ) -> TrieLogitsProcessor:
        """A `LogitsProcessor` that allows only trie continuations of the tokens after `prompt_length`; see
        `TrieLogitsProcessor` for `dead_token_id` and `inplace`."""
        return TrieLogitsProcessor(self, prompt_length, dead_token_id, inplace)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tables and metadata to one safetensors file."""
        header = {
            "format": _FORMAT,
            "vocab_bound": str(self.vocab_bound),
            "max_depth": str(self.max_depth),
            "num_sequences": str(self.num_sequences),
            "metadata": json.dumps(self.metadata),
        }
        save_file({name: getattr(self, name).contiguous() for name in _TABLES}, os.fspath(path), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> IdentifierTrie:
        """Read a trie written by `save` (safetensors; no pickle)."""
        with safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != _FORMAT or set(f.keys()) != set(_TABLES):
                raise ValueError(f"{path}: not an identifier trie ({_FORMAT})")
            tables = {name: f.get_tensor(name) for name in _TABLES}
        trie = cls.__new__(cls)
        trie._init_tables(
            tables["edge_keys"],
            tables["terminal"],
            int(header["vocab_bound"]),
            int(header["max_depth"]),
            int(header["num_sequences"]),
            json.loads(header["metadata"]),
        )
        if trie.edge_keys.numel() != trie.num_nodes - 1:
            raise ValueError(f"{path}: inconsistent trie tables")
        return trie


class TrieLogitsProcessor(LogitsProcessor):
    """Mask every row of a generation step to the continuations its generated tokens allow in an `IdentifierTrie`.

    Each row's tokens after `prompt_length` are walked from the trie root; its scores keep their values at the
    allowed next tokens and become -inf elsewhere (exactly `scores + mask` of `PrefixConstrainedLogitsProcessor`).
    A dead row (it left the trie or finished a leaf: in beam search a finished or filler beam, whose score is
    already -1e9 or -inf) may only take `dead_token_id` (e.g. the pad token, so filler beams feed the model
    padding), or nothing when it is None. Any number of rows (beams, returned sequences) at once, on the scores'
    device. Returns a new tensor, or with `inplace=True` overwrites `scores` (safe in beam search, whose scores
    are a fresh `log_softmax`; on a CPU it saves allocating a (rows x vocabulary) tensor every step).
    """

    def __init__(
        self, trie: IdentifierTrie, prompt_length: int, dead_token_id: int | None = None, inplace: bool = False
    ):
        self.trie = trie
        self.prompt_length = prompt_length
        self.dead_token_id = dead_token_id
        self.inplace = inplace

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.trie.vocab_bound > scores.shape[-1]:
            raise ValueError(
                f"the trie holds token ids up to {self.trie.vocab_bound - 1}, but the scores cover only "
                f"{scores.shape[-1]} tokens"
            )
        keys, _ = self.trie.tables(scores.device)
        node = self.trie.walk(input_ids[:, self.prompt_length :].to(scores.device))  # (R,)
        start, count = self.trie.edge_ranges(node)  # (R,), (R,)
        widest = int(count.max())
        if widest * 4 <= scores.shape[-1]:
            # (R, C) edge slots; a row's unused slots repeat its first allowed token (or the dead token), so the
            # scatter writes the same value twice instead of needing a ragged index
            slot = torch.arange(max(widest, 1), device=scores.device)  # (C,)
            edges = (start[:, None] + slot).clamp(max=keys.numel() - 1)  # (R, C); past a row's edges: unused
            tokens = keys.take(edges) % self.trie.vocab_bound
            dead = self.dead_token_id if self.dead_token_id is not None else 0
            first = torch.where(count > 0, tokens[:, 0], dead)  # (R,)
            tokens = torch.where(slot < count[:, None], tokens, first[:, None])  # (R, C)
            values = scores.gather(1, tokens)  # (R, C)
            if self.dead_token_id is None:  # a dead row writes -inf where everything is -inf already
                values = values.masked_fill((count == 0)[:, None], -math.inf)
            processed = scores.fill_(-math.inf) if self.inplace else torch.full_like(scores, -math.inf)
            return processed.scatter_(1, tokens, values)
        # Rows that allow a large share of the vocabulary (e.g. one new token per image): one boolean row per
        # distinct node.
        nodes, inverse = torch.unique(node, return_inverse=True)  # (U,), (R,)
        node_start, node_count = self.trie.edge_ranges(nodes)
        owners, edges = _expand_ranges(node_start, node_count)
        allowed = torch.zeros((nodes.numel(), scores.shape[-1]), dtype=torch.bool, device=scores.device)  # (U, V)
        allowed[owners, keys.take(edges) % self.trie.vocab_bound] = True
        if self.dead_token_id is not None:
            allowed[node_count == 0, self.dead_token_id] = True
        mask = ~allowed[inverse]
        return scores.masked_fill_(mask, -math.inf) if self.inplace else scores.masked_fill(mask, -math.inf)


class NestedDictTrie:
    """The original's trie (nested Python dicts, one per node): the reference the tests and benchmarks compare to."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.root: dict = {}
        for sequence in sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(token, {})

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        node = self.root
        for token in prefix:
            if token not in node:
                return []
            node = node[token]
        return list(node)

    def prefix_allowed_tokens_fn(self, prompt_length: int, dead_token_id: int):
        """The `generate(prefix_allowed_tokens_fn=...)` callback; a row with no continuation may only take
        `dead_token_id` (transformers refuses an empty list)."""

        def allowed_tokens(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            return self.allowed(input_ids[prompt_length:].tolist()) or [dead_token_id]

        return allowed_tokens


def _expand_ranges(start: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ranges `start[i] : start[i] + count[i]`, the owning range and the value of every element."""
    owner = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)  # (total,)
    shift = start - (torch.cumsum(count, 0) - count)  # (R,) range value minus its position in the output
    return owner, torch.arange(owner.numel(), device=count.device) + shift.take(owner)


def _build_tables(sequences: Sequence[Sequence[int]]):
    """Vectorised construction: sort the padded sequences, find shared prefixes, number new nodes breadth first."""
    num = len(sequences)
    if num == 0:
        raise ValueError("IdentifierTrie needs at least one sequence")
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=num)
    if (lengths == 0).any():
        raise ValueError(f"IdentifierTrie: sequence {int(np.argmin(lengths))} is empty")
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    if flat.min() < 0 or flat.max() >= np.iinfo(np.int32).max:
        raise ValueError("IdentifierTrie: token ids must be in [0, 2**31 - 1)")
    depth = int(lengths.max())
    padded = np.full((num, depth), -1, dtype=np.int32)  # (S, L), -1 after the end sorts a prefix first
    padded[np.arange(depth) < lengths[:, None]] = flat
    order = np.lexsort((np.arange(num),) + tuple(padded[:, d] for d in reversed(range(depth))))
    padded, lengths = padded[order], lengths[order]

    # common prefix with the previous sorted sequence; a sequence adds the nodes past it
    same = np.cumprod(padded[1:] == padded[:-1], axis=1, dtype=np.int8)  # (S - 1, L)
    shared = np.concatenate([[0], same.sum(axis=1, dtype=np.int64)])  # (S,)
    columns = np.arange(depth)
    new = np.ascontiguousarray(((columns >= shared[:, None]) & (columns < lengths[:, None])).T)  # (L, S)
    num_nodes = int(new.sum()) + 1
    node_ids = np.zeros((depth, num), dtype=np.int64)  # (L, S) depth-major order = breadth first
    node_ids[new] = np.arange(1, num_nodes)
    node_ids = np.maximum.accumulate(node_ids, axis=1)  # node of each (depth, sequence) prefix

    level, member = np.nonzero(new)  # in breadth-first order: the children 1 .. N - 1
    parents = np.where(level > 0, node_ids[np.maximum(level - 1, 0), member], 0)
    vocab_bound = int(flat.max()) + 1
    keys = parents * vocab_bound + padded[member, level]

    terminal = np.full(num_nodes, -1, dtype=np.int32)
    first = shared < depth  # a repeat of the previous sequence shares all L padded positions
    first[0] = True
    terminal[node_ids[lengths[first] - 1, np.nonzero(first)[0]]] = order[first]
    return torch.from_numpy(keys), torch.from_numpy(terminal), vocab_bound, depth
