"""The retriever's two decoders behind one interface: `decoder(input_ids, attention_mask, image_features)` ->
`TrieBeamSearchOutput` (each query's beams: identifier index and score, best first). `make_decoder` builds the one
`choose_decoding` picks:

- "generate" (`GenerateSearch`): transformers' `generate` with the trie's `TrieLogitsProcessor` (CPU, greedy search,
  DeepSpeed ZeRO-3);
- "fast" (`TrieBeamSearch`): beam search constrained to the trie with no host synchronisation between its steps.

The fast search is the search `generate(num_beams=K, early_stopping=False, ...)` runs with a `TrieLogitsProcessor` (the same
top-2K candidates, finishing, ranking and early-stop rules as transformers' beam search, step for step), built so
that a whole search can be one CUDA graph:

- the prompt is encoded once per query, not once per beam; its keys and values are copied to the query's beam rows
  of a `StaticCache` of length prompt + identifier depth, so every decoding step has the same shapes;
- the loop always runs `trie.max_depth` steps; transformers may stop earlier, but only once no running beam can
  beat the finished ones, after which its early-stop rule keeps every later candidate out, so the result is the same;
- each beam carries its trie node, advanced by one token and reordered with the beam, instead of re-walking the
  generated tokens; the finished beams keep the identifier their node ends;
- the beams of a query share the prompt's keys and values, so reordering the cache touches only its generated part.

`graph=True` (CUDA) captures the whole search once per (batch, prompt length) and replays it: one launch per call.
`compile=True` runs the decoding step through `torch.compile(fullgraph=True)` (captured too with `graph=True`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StaticCache

from grace_hf.errors import GraceInputError
from grace_hf.models.flamingo.modeling_flamingo import check_media_count, media_index_from_input_ids
from grace_hf.retrieval.trie import IdentifierTrie

__all__ = [
    "DECODING_MODES",
    "GenerateSearch",
    "TrieBeamSearch",
    "TrieBeamSearchOutput",
    "beam_generation_config",
    "choose_decoding",
    "make_decoder",
]

logger = logging.getLogger(__name__)

DECODING_MODES = ("auto", "fast", "generate")
_FINISHED = -1.0e9  # transformers' penalty for a beam that may no longer run or finish


@dataclass(frozen=True)
class TrieBeamSearchOutput:
    """The finished beams of each query, best first.

    identifiers: (B, K) index of the trie sequence each beam spelled; -1 for filler beams (fewer identifiers than
        beams, or beams that never finished one), whose scores carry beam search's -1e9 penalty.
    scores: (B, K) float32: log-probability / length ** length_penalty, as `generate`'s `sequences_scores`.
    """

    identifiers: torch.Tensor
    scores: torch.Tensor


@dataclass
class _BeamState:
    """What one step hands the next, all fixed-shape: B queries x K beams."""

    running_scores: torch.Tensor  # (B, K) float32
    running_node: torch.Tensor  # (B, K) trie node of each running beam; -1 dead
    last_token: torch.Tensor  # (B * K, 1) the token each running beam feeds the model next
    parent: torch.Tensor  # (B * K,) the row each running beam came from (for the cache reorder)
    finished_scores: torch.Tensor  # (B, K) float32
    finished_ids: torch.Tensor  # (B, K) trie sequence index; -1 none
    finished: torch.Tensor  # (B, K) bool: the slot holds a finished beam
    improvable: torch.Tensor  # (B, 1) bool: transformers' early-stop heuristic still unsatisfied

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.__dict__.values())


@dataclass
class _Shape:
    """The caches and (on CUDA) the captured graph for one (batch, prompt length, image shape): the prompt's (one row
    per query) and the beams' (one row per beam, prompt + identifier depth)."""

    prompt_cache: StaticCache
    cache: StaticCache
    inputs: tuple[torch.Tensor | None, ...] = ()  # static input buffers of the graph
    outputs: tuple[torch.Tensor, torch.Tensor] | None = None
    graph: Any = None


class TrieBeamSearch:
    """Beam search over `model` constrained to `trie`, with fixed shapes and no host sync inside the search.

    Args:
        model: a `FlamingoForConditionalGeneration` in eval mode.
        trie: the identifiers (each ending with `eos_token_id`).
        num_beams: beams per query (>= 1; `GraceRetriever` uses it from 2 on, greedy search below).
        eos_token_id / pad_token_id: the identifiers' end token; the token dead beams feed the model.
        length_penalty: score = log-probability / length ** length_penalty (as `generate`).
        graph: capture the whole search as a CUDA graph per input shape and replay it (default: on CUDA).
        compile: run the decoding step through `torch.compile(fullgraph=True)`; a dict adds `torch.compile` keyword
            arguments (e.g. `{"backend": "eager"}`: traced, so checked for graph breaks and host syncs, not compiled).
        prompt_multiple: prompts are left-padded to a multiple of this length, so that queries of similar length
            share a cache and a graph.
        max_shapes: caches (and graphs) kept, least recently used dropped first.

    Example:
        >>> search = TrieBeamSearch(model, trie, num_beams=10, eos_token_id=eoc, pad_token_id=pad)
        >>> out = search(input_ids, attention_mask)  # left-padded prompts (B, P)
        >>> out.identifiers.shape, out.scores.shape
        (torch.Size([B, 10]), torch.Size([B, 10]))
    """

    def __init__(
        self,
        model: Any,
        trie: IdentifierTrie,
        num_beams: int,
        eos_token_id: int,
        pad_token_id: int,
        length_penalty: float = 0.0,
        graph: bool | None = None,
        compile: bool | dict[str, Any] = False,
        prompt_multiple: int = 8,
        max_shapes: int = 4,
    ):
        self.model, self.trie = model, trie
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.device = next(model.parameters()).device
        self.graph = self.device.type == "cuda" if graph is None else graph
        if self.graph and self.device.type != "cuda":
            raise ValueError("graph=True needs the model on a CUDA device")
        self.compile, self.prompt_multiple, self.max_shapes = compile, prompt_multiple, max_shapes
        self.depth = trie.max_depth
        # length ** length_penalty after each step, as the Python floats transformers divides by (float32 on device)
        self._penalty = torch.tensor([(t + 1) ** length_penalty for t in range(self.depth)], device=self.device)
        self._steps = torch.arange(self.depth, device=self.device)
        self._terminal = trie.tables(self.device)[1].long()  # (N,)
        trie.step_tables(self.device)  # built here, never inside a traced or captured step
        options = compile if isinstance(compile, dict) else {}
        self._decode = torch.compile(self._decode_step, fullgraph=True, **options) if compile else self._decode_step
        self._shapes: OrderedDict[tuple, _Shape] = OrderedDict()

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> TrieBeamSearchOutput:
        """Search for each left-padded prompt `input_ids` (B, P) (mask (B, P)); `image_features` (B, N, L, Dv)."""
        if image_features is not None:
            check_media_count(
                media_index_from_input_ids(input_ids, self.model.config.media_token_id), image_features.shape[1]
            )
        pad = -input_ids.shape[1] % self.prompt_multiple
        if pad:
            input_ids = torch.cat([input_ids.new_full((input_ids.shape[0], pad), self.pad_token_id), input_ids], 1)
            attention_mask = torch.cat([attention_mask.new_zeros(attention_mask.shape[0], pad), attention_mask], 1)
        inputs = (input_ids.to(self.device), attention_mask.to(self.device))
        if image_features is not None:
            inputs += (image_features.to(self.device),)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        shape = self._shape(key, inputs)
        if shape.graph is None:
            identifiers, scores = self._search(shape, *inputs)
        else:
            for buffer, value in zip(shape.inputs, inputs):
                buffer.copy_(value)
            shape.graph.replay()
            identifiers, scores = (t.clone() for t in shape.outputs)
        return TrieBeamSearchOutput(identifiers, scores)

    def _shape(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> _Shape:
        """The cache (and graph) for these input shapes, made on first use."""
        if key in self._shapes:
            self._shapes.move_to_end(key)
            return self._shapes[key]
        while len(self._shapes) >= self.max_shapes:
            self._shapes.popitem(last=False)
        prompt_length = inputs[0].shape[1]
        config = self.model.config
        shape = _Shape(
            StaticCache(config=config, max_cache_len=prompt_length),
            StaticCache(config=config, max_cache_len=prompt_length + self.depth),
        )
        if self.graph:
            self._capture(shape, inputs)
        self._shapes[key] = shape
        return shape

    def _capture(self, shape: _Shape, inputs: tuple[torch.Tensor, ...]) -> None:
        """Warm up on a side stream (lazy initialisations, compilation), then capture the whole search; if the
        capture fails, this shape runs without a graph (same results, slower) and says so."""
        shape.inputs = tuple(t.clone() for t in inputs)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._search(shape, *shape.inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                shape.outputs = self._search(shape, *shape.inputs)
        except RuntimeError as err:
            logger.warning(f"TrieBeamSearch: CUDA graph capture failed, decoding without a graph: {err}")
            return
        shape.graph = graph

    # the search
    def _search(
        self,
        shape: _Shape,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill once per query, then `depth` steps; returns the finished (identifiers, scores), (B, K) each.

        The first call initialises the caches (lazily: under autocast the keys' dtype is not the weights'), so that a
        graph captured after it allocates nothing outside its pool."""
        batch, prompt_length = input_ids.shape
        beams, cache = self.num_beams, shape.cache
        media_index = None
        if image_features is not None:
            media_index = media_index_from_input_ids(input_ids, self.model.config.media_token_id)  # (B, P)
        for layer in shape.prompt_cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_features=image_features,
            media_index=media_index,
            cache=shape.prompt_cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # (B, V)
        if not cache.layers[0].is_initialized:
            keys = shape.prompt_cache.layers[0].keys  # (B, H, P, d)
            cache.early_initialization(batch * beams, keys.shape[1], keys.shape[3], keys.dtype, self.device)
        for static, layer in zip(cache.layers, shape.prompt_cache.layers):
            # every beam of a query starts from the query's prompt: (B, H, P, d) -> rows (B * K, H, P, d)
            static.keys[:, :, :prompt_length].unflatten(0, (batch, beams)).copy_(layer.keys[:, None])
            static.values[:, :, :prompt_length].unflatten(0, (batch, beams)).copy_(layer.values[:, None])
            static.cumulative_length.fill_(prompt_length)
        log_probs = logits.float().log_softmax(-1).repeat_interleave(beams, 0)  # (B * K, V)
        state = self._select(log_probs, self._initial_state(batch), self._steps[0], depth=0)

        context = (
            torch.cat([attention_mask, attention_mask.new_ones(batch, self.depth)], 1).repeat_interleave(beams, 0),
            None if image_features is None else image_features.repeat_interleave(beams, 0),
            None if media_index is None else media_index[:, -1:].repeat_interleave(beams, 0),
        )  # attention mask (B * K, P + depth), image features (B * K, N, L, Dv), media index (B * K, 1)
        for step in range(1, self.depth):
            depth = None if self.compile else step  # a compiled step serves every depth
            state = _BeamState(*self._decode(cache, prompt_length, state.tensors(), context, self._steps[step], depth))
        return state.finished_ids, state.finished_scores

    def _initial_state(self, batch: int) -> _BeamState:
        beams, device = self.num_beams, self.device
        running_scores = torch.zeros(batch, beams, device=device)
        running_scores[:, 1:] = _FINISHED  # only the first beam of a query starts, so the others do not repeat it
        return _BeamState(
            running_scores=running_scores,
            running_node=torch.zeros(batch, beams, dtype=torch.long, device=device),
            last_token=torch.zeros(batch * beams, 1, dtype=torch.long, device=device),
            parent=torch.zeros(batch * beams, dtype=torch.long, device=device),
            finished_scores=torch.full((batch, beams), _FINISHED, device=device),
            finished_ids=torch.full((batch, beams), -1, dtype=torch.long, device=device),
            finished=torch.zeros(batch, beams, dtype=torch.bool, device=device),
            improvable=torch.ones(batch, 1, dtype=torch.bool, device=device),
        )

    def _decode_step(
        self,
        cache: StaticCache,
        prompt_length: int,
        state: tuple[torch.Tensor, ...],
        context: tuple[torch.Tensor | None, ...],
        step: torch.Tensor,
        depth: int | None,
    ) -> tuple[torch.Tensor, ...]:
        """Line the cache's rows up with the running beams, feed each its last token, pick the next beams."""
        attention_mask, image_features, media_index = context
        state = _BeamState(*state)
        # before this step's write: in one compiled graph, inductor may fuse a gather after a scatter into the same
        # buffer and read rows it already overwrote
        for layer in cache.layers:  # rows of one query hold the same prompt: only the generated part moves
            for tensor in (layer.keys, layer.values):
                generated = tensor[:, :, prompt_length:]  # (B * K, H, depth, d)
                generated.copy_(generated.index_select(0, state.parent))
        logits = self.model(
            input_ids=state.last_token,
            attention_mask=attention_mask,
            image_features=image_features,
            media_index=media_index,
            cache=cache,
            use_cache=True,
        ).logits[:, -1]  # (B * K, V)
        return self._select(logits.float().log_softmax(-1), state, step, depth).tensors()

    def _select(self, log_probs: torch.Tensor, state: _BeamState, step: torch.Tensor, depth: int | None) -> _BeamState:
        """One step of transformers' beam search (`_beam_search`, early_stopping=False) on trie-masked log-probs."""
        batch, beams = state.running_scores.shape
        vocab = log_probs.shape[-1]
        node = state.running_node.flatten()  # (B * K,)
        log_probs = self.trie.mask_scores(node, log_probs, self.pad_token_id, depth, inplace=True)  # (B * K, V)
        scores = (log_probs.view(batch, beams, vocab) + state.running_scores[:, :, None]).view(batch, -1)
        # top 2K candidates, so that K can run on however many of them finish
        top_scores, top_index = scores.topk(2 * beams)  # (B, 2K)
        top_beam, top_token = top_index // vocab, top_index % vocab
        top_node = self.trie.advance(state.running_node.gather(1, top_beam).flatten(), top_token.flatten())
        top_node = top_node.view(batch, 2 * beams)  # (B, 2K)
        ends = (top_token == self.eos_token_id) | (step == self.depth - 1)  # end token, or the length limit

        # the K best candidates that did not end run on
        running = top_scores + ends.float() * _FINISHED  # (B, 2K)
        keep = running.topk(beams).indices  # (B, K)
        offset = torch.arange(batch, device=keep.device)[:, None] * beams
        parent = (top_beam.gather(1, keep) + offset).flatten()  # (B * K,) rows of the cache to continue from

        # candidates among the top K that ended compete with the finished beams (transformers' order of penalties)
        length_penalty = self._penalty.take(step)
        ended = ends & (torch.arange(2 * beams, device=keep.device) < beams)  # (B, 2K)
        candidate_scores = top_scores / length_penalty
        candidate_scores = candidate_scores + (~state.improvable).float() * _FINISHED
        candidate_scores = candidate_scores + (~ended) * _FINISHED
        merged_scores = torch.cat([state.finished_scores, candidate_scores], 1)  # (B, 3K)
        best = merged_scores.topk(beams).indices  # (B, K)
        candidate_ids = torch.where(top_node >= 0, self._terminal.take(top_node.clamp(min=0)), -1)  # (B, 2K)
        finished_scores = merged_scores.gather(1, best)
        finished = torch.cat([state.finished, ended], 1).gather(1, best)
        finished_ids = torch.cat([state.finished_ids, candidate_ids], 1).gather(1, best)

        # early stop: can the best running beam still beat the worst finished one?
        running_scores = running.gather(1, keep)  # (B, K)
        best_possible = running_scores[:, :1] / length_penalty
        worst_finished = torch.where(finished, finished_scores.min(1, keepdim=True).values, _FINISHED)
        improvable = state.improvable & (best_possible > worst_finished).any(-1, keepdim=True)
        return _BeamState(
            running_scores=running_scores,
            running_node=top_node.gather(1, keep),
            last_token=top_token.gather(1, keep).view(-1, 1),
            parent=parent,
            finished_scores=finished_scores,
            finished_ids=finished_ids,
            finished=finished,
            improvable=improvable,
        )


def beam_generation_config(
    num_beams: int, max_new_tokens: int, length_penalty: float, eos_token_id: int, pad_token_id: int
) -> GenerationConfig:
    """How the retriever calls `generate`: every beam returned with its score, up to the trie's depth."""
    return GenerationConfig(
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=max_new_tokens,
        length_penalty=length_penalty,
        do_sample=False,
        early_stopping=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=num_beams == 1,  # greedy search returns no sequence scores: computed from these
        use_cache=True,
    )


def choose_decoding(requested: str, model: Any, num_beams: int) -> tuple[str, str]:
    """The decoding `requested` ("auto", "fast" or "generate") resolves to for `model` and `num_beams`, and why."""
    if requested not in DECODING_MODES:
        raise GraceInputError(f"decoding must be one of {DECODING_MODES}, got {requested!r}")
    parameter = next(model.parameters())
    if num_beams < 2:
        blocker = "one beam is greedy search"
    elif hasattr(parameter, "ds_id"):
        blocker = "DeepSpeed ZeRO-3 shards the model"
    else:
        blocker = None
    if requested == "fast" and blocker:
        raise GraceInputError(f"decoding='fast' is not available here: {blocker}")
    if requested != "auto":
        return requested, "requested"
    if blocker:
        return "generate", blocker
    if parameter.device.type != "cuda":
        return "generate", "no GPU"
    return "fast", "GPU: static cache, one CUDA graph per call"


class GenerateSearch:
    """The trie-constrained search through transformers' `generate` and the trie's `TrieLogitsProcessor`; the same
    arguments and output as `TrieBeamSearch` (one beam: greedy search, scored as beam search would)."""

    def __init__(
        self,
        model: Any,
        trie: IdentifierTrie,
        num_beams: int,
        eos_token_id: int,
        pad_token_id: int,
        length_penalty: float = 0.0,
    ):
        self.model, self.trie = model, trie
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> TrieBeamSearchOutput:
        """The identifier index (-1: none) and score of each beam, (B, K), of each left-padded prompt."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if image_features is not None:
            inputs["image_features"] = image_features
        prompt_length = input_ids.shape[1]
        # in place under beam search, which hands the processor a fresh log_softmax every step
        processor = self.trie.logits_processor(prompt_length, self.pad_token_id, inplace=self.num_beams > 1)
        config = beam_generation_config(
            self.num_beams, self.trie.max_depth, self.length_penalty, self.eos_token_id, self.pad_token_id
        )
        output = self.model.generate(**inputs, generation_config=config, logits_processor=[processor])
        found = self.trie.lookup(output.sequences[:, prompt_length:], end_token_id=self.eos_token_id)
        scores = output.sequences_scores if self.num_beams > 1 else self._greedy_scores(output, prompt_length)
        return TrieBeamSearchOutput(found.view(-1, self.num_beams), scores.view(-1, self.num_beams))

    def _greedy_scores(self, output: Any, prompt_length: int) -> torch.Tensor:
        """Beam search's score for one beam: log-probability of the tokens up to the first end token, divided by
        length ** length_penalty. (B,)"""
        tokens = output.sequences[:, prompt_length:]  # (B, T)
        log_probs = torch.stack(output.logits, dim=1).float().log_softmax(-1)  # (B, T, V)
        token_log_probs = log_probs.gather(2, tokens[..., None])[..., 0]  # (B, T)
        is_end = tokens == self.eos_token_id
        length = torch.where(is_end.any(1), is_end.long().argmax(1) + 1, tokens.shape[1])  # (B,)
        inside = torch.arange(tokens.shape[1], device=tokens.device)[None] < length[:, None]  # (B, T)
        return (token_log_probs * inside).sum(1) / length.float() ** self.length_penalty


def make_decoder(
    decoding: str,
    model: Any,
    trie: IdentifierTrie,
    num_beams: int,
    eos_token_id: int,
    pad_token_id: int,
    length_penalty: float = 0.0,
    compile: bool | dict[str, Any] = False,
) -> TrieBeamSearch | GenerateSearch:
    """The decoder of a resolved `decoding` ("fast" or "generate"; see `choose_decoding`)."""
    if decoding == "fast":
        return TrieBeamSearch(
            model, trie, num_beams, eos_token_id, pad_token_id, length_penalty=length_penalty, compile=compile
        )
    return GenerateSearch(model, trie, num_beams, eos_token_id, pad_token_id, length_penalty=length_penalty)
