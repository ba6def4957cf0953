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

A masking step has fixed shapes and no host synchronisation, so it runs inside `torch.compile` and CUDA graphs:
each row writes a fixed number of edge slots (the widest fan-out among the trie's narrow nodes, per depth), and the
few wide nodes (over 1/16 of the token ids, e.g. the first token of atomic identifiers) each keep one dense row of
allowed tokens. Both are derived from the tables once per device (`IdentifierTrie.step_tables`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LogitsProcessor

_FORMAT = "grace_hf.identifier_trie.v1"
_TABLES = ("edge_keys", "terminal")
_WIDE_SHARE = 16  # a node whose children cover over 1/16 of the token ids gets a dense row of allowed tokens


@dataclass(frozen=True)
class TrieStepTables:
    """What a fixed-shape masking step needs, on one device.

    `widths[d]` / `wide_at[d]`: edge slots per row and whether a wide node exists among the nodes at depth `d`
    (entry `max_depth + 1` is the trie-wide maximum, for a step whose depth is not known when it is traced).
    `wide_nodes` (K + 1,): the wide nodes, sorted, then a sentinel larger than any node; `wide_allowed`
    (K + 1, vocab_bound): their allowed tokens, the last row all False.
    """

    widths: tuple[int, ...]
    wide_at: tuple[bool, ...]
    wide_nodes: torch.Tensor
    wide_allowed: torch.Tensor

    def layout(self, depth: int | None) -> tuple[int, bool]:
        """(edge slots, any wide node) for a step at `depth` generated tokens (None: any depth)."""
        index = len(self.widths) - 1 if depth is None else min(depth, len(self.widths) - 2)
        return self.widths[index], self.wide_at[index]


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
        self._step_tables: dict[torch.device, TrieStepTables] = {}

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

    def step_tables(self, device: torch.device | str = "cpu") -> TrieStepTables:
        """The fixed-shape masking layout (see `TrieStepTables`), built once per device."""
        device = torch.device(device)
        if device not in self._step_tables:
            self._step_tables[device] = _build_step_tables(
                self.edge_keys.numpy(), self.num_nodes, self.vocab_bound, self.max_depth, device
            )
        return self._step_tables[device]

    def advance(self, node: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The child each node (R,) reaches through its token (R,); -1 where there is none or the node is -1."""
        keys, _ = self.tables(node.device)
        inside = (node >= 0) & (tokens >= 0) & (tokens < self.vocab_bound)
        key = torch.where(inside, node * self.vocab_bound + tokens, -1)  # (R,) -1 is never a key
        position = torch.searchsorted(keys, key)
        return torch.where(keys.take(position) == key, position + 1, -1)

    def walk(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The node each row of `tokens` (R, T) reaches from the root, -1 where it leaves the trie.

        `lengths` (R,) limits the walk of each row to its first `lengths[r]` tokens (default: all T).
        """
        tokens = tokens.long()
        node = torch.zeros(tokens.shape[0], dtype=torch.int64, device=tokens.device)  # (R,)
        for depth in range(tokens.shape[1]):
            child = self.advance(node, tokens[:, depth]) if depth < self.max_depth else torch.full_like(node, -1)
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

    def mask_scores(
        self,
        node: torch.Tensor,
        scores: torch.Tensor,
        dead_token_id: int | None = None,
        depth: int | None = None,
        inplace: bool = False,
    ) -> torch.Tensor:
        """Keep each row's scores (R, V) at the tokens its node (R,) allows, -inf elsewhere; a row whose node is -1
        or a leaf may only take `dead_token_id` (nothing when None).

        Fixed shapes and no host synchronisation. `depth`: the number of tokens every live row has generated, when
        known (it sizes the step to that depth's nodes); None sizes it for any depth. `inplace` overwrites `scores`.
        The first call on a device builds the tables there (host work): make it outside `torch.compile` or a graph.
        """
        keys, _ = self.tables(scores.device)
        tables = self.step_tables(scores.device)
        width, has_wide = tables.layout(depth)
        start, count = self.edge_ranges(node)  # (R,), (R,)
        kept = None
        if has_wide:
            row = torch.searchsorted(tables.wide_nodes, node)  # (R,) the node's dense row; K (all False) if none
            row = torch.where(tables.wide_nodes.take(row) == node, row, tables.wide_nodes.numel() - 1)
            bound = self.vocab_bound
            kept = scores[:, :bound].masked_fill(~tables.wide_allowed[row], -math.inf)  # (R, vocab_bound)
        # (R, C) edge slots; a row's unused slots repeat its first allowed token (or the dead token), so the scatter
        # writes the same value twice instead of needing a ragged index. A wide row's slots hold its first C edges.
        slot = torch.arange(width, device=scores.device)  # (C,)
        edges = (start[:, None] + slot).clamp(max=keys.numel() - 1)  # (R, C); past a row's edges: unused
        tokens = keys.take(edges) % self.vocab_bound
        dead = dead_token_id if dead_token_id is not None else 0
        first = torch.where(count > 0, tokens[:, 0], dead)  # (R,)
        tokens = torch.where(slot < count[:, None], tokens, first[:, None])  # (R, C)
        values = scores.gather(1, tokens)  # (R, C)
        if dead_token_id is None:  # a dead row writes -inf where everything is -inf already
            values = values.masked_fill((count == 0)[:, None], -math.inf)
        processed = scores.fill_(-math.inf) if inplace else torch.full_like(scores, -math.inf)
        processed.scatter_(1, tokens, values)
        if kept is not None:  # the wide rows' other allowed tokens; everything else there is -inf in both
            processed[:, : self.vocab_bound] = torch.maximum(processed[:, : self.vocab_bound], kept)
        return processed

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

    No host synchronisation and fixed shapes (see `IdentifierTrie.mask_scores`); the walk re-reads the generated
    tokens every step, since `generate` does not tell a processor how it reordered the beams (the retriever's fast
    path, `grace_hf.retrieval.decoding`, keeps each beam's node instead).
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
        generated = input_ids[:, self.prompt_length :].to(scores.device)  # (R, depth): every live row is this deep
        node = self.trie.walk(generated)  # (R,)
        return self.trie.mask_scores(node, scores, self.dead_token_id, generated.shape[1], self.inplace)


def _build_step_tables(
    edge_keys: np.ndarray, num_nodes: int, vocab_bound: int, max_depth: int, device: torch.device
) -> TrieStepTables:
    """Fan-out and depth of every node -> the edge slots per depth, and dense rows for the wide nodes."""
    parent = edge_keys // vocab_bound  # (N - 1,) the parent of node e + 1
    fan_out = np.bincount(parent, minlength=num_nodes)  # (N,)
    depth = np.zeros(num_nodes, dtype=np.int64)
    for _ in range(max_depth):  # breadth-first numbering: one pass per level settles the next level
        depth[1:] = depth[parent] + 1
    wide = fan_out * _WIDE_SHARE > vocab_bound
    widths, wide_at = [], []
    for level in [*range(max_depth + 1), None]:
        at = np.ones(num_nodes, dtype=bool) if level is None else depth == level
        narrow = fan_out[at & ~wide]
        widths.append(max(int(narrow.max()) if narrow.size else 0, 1))
        wide_at.append(bool((at & wide).any()))
    wide_nodes = np.nonzero(wide)[0]
    allowed = np.zeros((wide_nodes.size + 1, vocab_bound), dtype=bool)
    owner = np.searchsorted(wide_nodes, parent)  # edges of wide nodes -> their row
    of_wide = wide[parent]
    allowed[owner[of_wide], edge_keys[of_wide] % vocab_bound] = True
    sentinel = np.array([np.iinfo(np.int64).max])
    return TrieStepTables(
        tuple(widths),
        tuple(wide_at),
        torch.from_numpy(np.concatenate([wide_nodes, sentinel])).to(device),
        torch.from_numpy(allowed).to(device),
    )


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
