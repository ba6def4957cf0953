"""`GraceRetriever`: text queries (or query images) -> ranked images, by beam search constrained to the collection's
identifier trie.

>>> retriever = GraceRetriever.from_pretrained("runs/synthetic-structured")
>>> hits = retriever.retrieve(["a red circle on a blue background"], top_k=5)[0]
>>> [(hit.image_key, round(hit.score, 2)) for hit in hits]
>>> retriever.retrieve(images=["photo.jpg"], top_k=5)  # query by image: the memorization prompt `<image>`
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image

from grace_hf.data.images import QueryImage, read_query_image
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IdentifierIndex
from grace_hf.model_dir import (
    QUERY_IMAGE_MODES,
    GraceConfig,
    read_model_dir,
    write_model_dir,
)
from grace_hf.outputs import MODEL, output_directory
from grace_hf.prompts import image_query_prompt, query_prompt
from grace_hf.retrieval.collection import Collection, load_saved_trie
from grace_hf.retrieval.decoding import GenerateSearch, TrieBeamSearch, choose_decoding, make_decoder
from grace_hf.retrieval.rerank import DenseScorer, Reranker, check_reranker_given, load_reranker
from grace_hf.retrieval.results import RetrievedImage
from grace_hf.retrieval.trie import IdentifierTrie
from grace_hf.training.views import ImageViews

__all__ = ["MAX_IMAGE_VIEWS", "GraceRetriever", "RetrievedImage", "check_image_views"]

logger = logging.getLogger(__name__)

_UNLIMITED = 10**9  # tokenizers without a real limit report ~1e30
Query = str | Image.Image  # a text query, or a query image (already read)


def _model_limit(processor: Any) -> int | None:
    limit = getattr(processor.tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < _UNLIMITED else None


MAX_QUERY_CHARS = 1000  # as `grace-hf serve`'s default
# the crops `retrieve(images=..., image_views=N)` adds to a query image: each keeps 85-100% of a side
QUERY_VIEWS = ImageViews(crop_scale=0.85)
# the most crops a query image may add (`image_views`, `--image-views`): each is one more search of the image
MAX_IMAGE_VIEWS = 32


def check_image_views(views: Any, name: str = "image_views") -> None:
    """`views` is a number of query crops, an integer in [0, `MAX_IMAGE_VIEWS`]: a GraceInputError naming `name`
    otherwise."""
    if isinstance(views, bool) or not isinstance(views, numbers.Integral) or not 0 <= views <= MAX_IMAGE_VIEWS:
        raise GraceInputError(
            f"{name} must be an integer in [0, {MAX_IMAGE_VIEWS}] (each view is one more search of the query "
            f"image), got {views!r}"
        )


class GraceRetriever:
    """Rank images for text queries with a GRACE model: the prompt `caption:<query><image>` is continued by beam
    search that may only write identifiers of the candidate images; the beams, best first, are the ranking.

    An image can be the query too (`retrieve(images=...)`): the model memorized each image by writing its identifier
    after `<image>` (the i2id task), so the prompt is `<image>` with the query image, decoded under the same trie.

    Args:
        model: a `FlamingoForConditionalGeneration` (or any generating model with the same inputs).
        processor: its `FlamingoProcessor`.
        index: the `IdentifierIndex` the model memorized (identifier -> image).
        num_beams: beams = ranked identifiers per query (clamped to the number of candidate identifiers).
        length_penalty: beam score = log-probability / length ** length_penalty. 0.0 (default) ranks by the
            identifier's probability and keeps beam search's early stop exact; the original GRACE used -2.0,
            which favours shorter identifiers (it only matters when identifiers differ in length).
        query_image: "none" (text-only prompt) or "blank" (the constant gray image, as the model was trained with
            `t2id_image: blank`); `from_pretrained` reads it from `grace_config.json`.
        candidates: image keys to rank; default `index.collection` (the test images), or every image when empty.
        batch_size: queries per `generate` call.
        max_length: the model's token limit (default: the tokenizer's `model_max_length`, if it sets one). A query
            whose prompt plus the longest identifier would exceed it is cut at the end to fit, with a warning.
        saved_trie: a trie saved for these candidates; used only as a check (the trie is always built from the
            tokenized identifiers, and a stale saved one is reported).
        decoding: "fast" (`TrieBeamSearch`: static cache, each beam's trie node carried along, no host sync
            between steps; one CUDA graph per call on a GPU), "generate" (transformers' `generate` with
            `TrieLogitsProcessor`), or "auto" (default): fast on a GPU, generate on a CPU, with one beam (greedy
            search) and under DeepSpeed ZeRO-3. Both give the same ranking; `self.decoding` says which is used.
        compile: with fast decoding, also run its step through `torch.compile` (minutes of compilation per batch
            shape on first use; fewer, fused kernels after).
        reranker: a second stage (`grace_hf.retrieval.rerank.Reranker`): the search then runs its `num_beams`
            beams (instead of `num_beams`) and their images are re-ranked by the fused beam score and dense cosine.
    """

    max_query_chars: int = MAX_QUERY_CHARS  # longer queries are refused (`serve --max-query-chars` sets it)

    def __init__(
        self,
        model: Any,
        processor: Any,
        index: IdentifierIndex,
        num_beams: int = 10,
        length_penalty: float = 0.0,
        query_image: str = "none",
        candidates: Sequence[str] | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        saved_trie: IdentifierTrie | None = None,
        decoding: str = "auto",
        compile: bool = False,
        reranker: Reranker | None = None,
    ):
        if query_image not in QUERY_IMAGE_MODES:
            raise GraceInputError(f"query_image must be one of {QUERY_IMAGE_MODES}, got {query_image!r}")
        if num_beams < 1 or batch_size < 1:
            raise GraceInputError(f"num_beams and batch_size must be >= 1, got {num_beams} and {batch_size}")
        self.model, self.processor, self.index = model, processor, index
        self.length_penalty, self.query_image, self.batch_size = length_penalty, query_image, batch_size
        collection = Collection.build(index, processor, candidates, saved_trie)
        self.candidates, self.trie = collection.image_keys, collection.trie
        if reranker is not None:
            reranker.scorer.check_covers(self.candidates, "the collection")
            num_beams = reranker.num_beams
        self.reranker = reranker
        self.identifiers, self.identifier_images = collection.identifiers, collection.identifier_images
        vocab_size = model.config.get_text_config().vocab_size
        if self.trie.vocab_bound > vocab_size:
            raise GraceInputError(
                f"identifier token id {self.trie.vocab_bound - 1} is outside the model's vocabulary ({vocab_size}); "
                "was the model resized after adding the identifier tokens?"
            )
        self.num_beams = min(num_beams, len(self.identifiers))
        self.max_length = max_length if max_length is not None else _model_limit(processor)
        self.decoding, reason = choose_decoding(decoding, model, self.num_beams)
        self.compile = compile
        logger.info(f"GraceRetriever decodes with {self.decoding} ({reason})")
        self._blank_features: torch.Tensor | None = None
        self._decoder_cache: tuple[tuple, TrieBeamSearch | GenerateSearch] | None = None
        self._engine = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir_or_hub_id: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        accelerator: Any = None,
        reranker: str | os.PathLike | DenseScorer | None = None,
        rerank_weight: float | None = None,
        rerank_beams: int | None = None,
        **kwargs: Any,
    ) -> GraceRetriever:
        """Load the model, processor, identifier index and query-image mode from a model directory or Hub repo.

        `reranker`: a dense scorer (a `grace-hf baseline-clip` directory or a `DenseScorer`) that re-ranks the images
        of `rerank_beams` beams (default: as fitted, else 30) with the fusion weight `rerank_weight` (default: the
        model's `rerank.json`, fitted on the validation queries by `grace-hf evaluate --rerank DENSE --split val`).

        `accelerator`: an `accelerate.Accelerator` (`grace_hf.distributed.create_accelerator()`, created before this
        call) whose DeepSpeed plugin (ZeRO-3) shards the model across the processes of `accelerate launch`; every
        process must then call `retrieve` (`distributed=True`). Without it the model goes to `device` (default:
        this process's accelerate device). Other keyword arguments go to `GraceRetriever(...)`.
        """
        check_reranker_given(reranker, rerank_weight, rerank_beams)
        loaded = read_model_dir(model_dir_or_hub_id, dtype=dtype)
        model, engine = loaded.model, None
        if accelerator is not None and accelerator.distributed_type == "DEEPSPEED":
            engine, model = _prepare_for_deepspeed_inference(accelerator, model, kwargs.get("batch_size", 16))
        else:
            model.to(device if device is not None else PartialState().device)
        retriever = cls.from_loaded(
            loaded.path,
            model,
            loaded.processor,
            loaded.index,
            loaded.grace_config,
            reranker,
            rerank_weight,
            rerank_beams,
            **kwargs,
        )
        retriever._engine = engine  # keeps the DeepSpeed engine (and its sharding hooks) alive with the retriever
        return retriever

    @classmethod
    def from_loaded(
        cls,
        directory: Path,
        model: Any,
        processor: Any,
        index: IdentifierIndex,
        grace_config: GraceConfig,
        reranker: str | os.PathLike | DenseScorer | None = None,
        rerank_weight: float | None = None,
        rerank_beams: int | None = None,
        **kwargs: Any,
    ) -> GraceRetriever:
        """The retriever of a model directory whose files are read (`from_pretrained`, the pipeline): its query-image
        mode, its saved trie (for the default candidates), and its reranker (see `from_pretrained`)."""
        if reranker is not None:
            kwargs["reranker"] = load_reranker(directory, reranker, rerank_weight, rerank_beams)
        kwargs.setdefault("query_image", grace_config.query_image)
        if kwargs.get("candidates") is None:
            kwargs.setdefault("saved_trie", load_saved_trie(directory))
        return cls(model, processor, index, **kwargs)

    def for_candidates(
        self, candidates: Sequence[str] | None, reranker: Reranker | None = None, num_beams: int | None = None
    ) -> GraceRetriever:
        """The same model and settings ranking other images (e.g. the val images; None: the index's collection),
        with `reranker` (none by default) and `num_beams` (default: these)."""
        retriever = GraceRetriever(
            self.model,
            self.processor,
            self.index,
            num_beams=num_beams or self.num_beams,
            length_penalty=self.length_penalty,
            query_image=self.query_image,
            candidates=candidates,
            batch_size=self.batch_size,
            max_length=self.max_length,
            decoding=self.decoding,
            compile=self.compile,
            reranker=reranker,
        )
        retriever._engine = self._engine
        return retriever

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> None:
        """Write a self-contained model directory (weights, processor, identifiers, GRACE config, trie); an existing
        directory is replaced only if it is a grace_hf model, or with `overwrite` (see `grace_hf.outputs`)."""
        with output_directory(directory, MODEL, overwrite=overwrite) as tmp:
            write_model_dir(
                tmp,
                self.model,
                self.processor,
                index=self.index,
                grace_config=GraceConfig.for_index(self.index, self.query_image),
                trie=Collection.build(self.index, self.processor).trie,
            )

    # queries -> model inputs
    @staticmethod
    def _check_images(images: Sequence[QueryImage]) -> list[Image.Image]:
        return [read_query_image(image, f"images[{position}]") for position, image in enumerate(images)]

    def _check_queries(self, queries: Sequence[str]) -> list[str]:
        checked = []
        for position, query in enumerate(queries):
            if not isinstance(query, str):
                raise GraceInputError(f"queries[{position}]: expected a string, got {type(query).__name__}")
            if not query.strip():
                raise GraceInputError(f"queries[{position}]: empty query")
            if len(query) > self.max_query_chars:
                raise GraceInputError(
                    f"queries[{position}]: the query is {len(query):,} characters long; at most "
                    f"{self.max_query_chars:,} are accepted (memory and time grow with the length)"
                )
            checked.append(query)
        return checked

    def _prompt_length(self, query: str) -> int:
        return len(self.processor.tokenizer(query_prompt(query)).input_ids)

    def _fit(self, query: str) -> str:
        """`query`, or its longest beginning whose prompt leaves room for the longest identifier."""
        budget = None if self.max_length is None else self.max_length - self.trie.max_depth
        if budget is None or self._prompt_length(query) <= budget:
            return query
        if self._prompt_length("") > budget:
            raise GraceInputError(
                f"the model's limit of {self.max_length} tokens leaves no room for a query next to "
                f"{self.trie.max_depth}-token identifiers"
            )
        fits, too_long = 0, len(query)  # longest prefix (in characters) that fits, by bisection
        while too_long - fits > 1:
            middle = (fits + too_long) // 2
            fits, too_long = (middle, too_long) if self._prompt_length(query[:middle]) <= budget else (fits, middle)
        return query[:fits].rstrip()

    def _inputs(self, queries: list[Query]) -> dict[str, torch.Tensor]:
        """Left-padded prompts and their image features: `caption:{query}<image>` (with the blank image when the
        model was trained so) for text queries, `<image>` with the image for query images (one kind per batch)."""
        images = None if isinstance(queries[0], str) else queries
        prompts = (
            [query_prompt(query) for query in queries] if images is None else [image_query_prompt()] * len(images)
        )
        batch = self.processor(text=prompts, images=images, padding_side="left", return_tensors="pt")
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        device = next(self.model.parameters()).device
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        if images is not None:
            inputs["image_features"] = self._image_features(batch["pixel_values"])
        elif self.query_image == "blank":
            inputs["image_features"] = self._blank_image_features().expand(len(queries), -1, -1, -1)
        return inputs

    @torch.no_grad()
    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, C, H, W) pixels -> (B, 1, num_latents, dim) features, on the model's device."""
        parameter = next(self.model.parameters())
        return self.model.get_image_features(pixel_values.to(device=parameter.device, dtype=parameter.dtype))

    def _blank_image_features(self) -> torch.Tensor:
        """Features of the constant gray image, encoded once: (1, 1, num_latents, dim)."""
        if self._blank_features is None:
            pixel_values = self.processor.image_processor([self.processor.blank_image()], return_tensors="pt")[
                "pixel_values"
            ][:, None, None]  # (1, 1, 1, C, H, W)
            self._blank_features = self._image_features(pixel_values)
        return self._blank_features

    # search
    def _decoder(self) -> TrieBeamSearch | GenerateSearch:
        settings = (self.decoding, self.num_beams, self.length_penalty, self.compile)
        if self._decoder_cache is None or self._decoder_cache[0] != settings:
            decoder = make_decoder(
                self.decoding,
                self.model,
                self.trie,
                self.num_beams,
                eos_token_id=self.processor.end_of_chunk_token_id,
                pad_token_id=self.processor.pad_token_id,
                length_penalty=self.length_penalty,
                compile=self.compile,
            )
            self._decoder_cache = (settings, decoder)
        return self._decoder_cache[1]

    @torch.no_grad()
    def _search(self, queries: list[Query], top_k: int) -> list[list[RetrievedImage]]:
        inputs = self._inputs(queries)
        output = self._decoder()(inputs["input_ids"], inputs["attention_mask"], inputs.get("image_features"))
        found = output.identifiers.tolist()  # identifier index per beam, best first
        scores = output.scores.float().tolist()
        # Beam search fills the slots it could not fill with a finished identifier with beams whose log-probability
        # carries a -1e9 penalty (they may repeat a finished identifier): those are dropped, the query still counts.
        filler = -0.5e9 / self.trie.max_depth ** max(self.length_penalty, 0.0)
        results = []
        for beams, beam_scores in zip(found, scores):
            ranked: dict[str, RetrievedImage] = {}
            for position, score in zip(beams, beam_scores):
                if position < 0 or score <= filler:
                    continue
                image_key = self.identifier_images[position]
                if image_key not in ranked and len(ranked) < top_k:
                    ranked[image_key] = RetrievedImage(image_key, self.identifiers[position], score)
            results.append(list(ranked.values()))
        return results

    def retrieve(
        self,
        queries: Sequence[str] | str | None = None,
        top_k: int = 10,
        batch_size: int | None = None,
        distributed: bool = False,
        rerank: bool = True,
        *,
        images: Sequence[QueryImage] | QueryImage | None = None,
        image_views: int = 0,
    ) -> list[list[RetrievedImage]]:
        """For each query, up to `min(top_k, num_beams)` distinct images, best first.

        Give text `queries` or query `images` (PIL images or image files), not both: an image query is the
        memorization prompt `<image>` with the image, decoded under the same trie (finds the images the model
        memorized from their pixels, e.g. from an edited copy). `image_views` > 0 (at most `MAX_IMAGE_VIEWS`) also
        searches that many crops of each query image (`QUERY_VIEWS`, the same on every call) and ranks the images
        by the probability of their beams averaged over the image and its crops (score: its log); the search costs
        `1 + image_views` times as much.

        `distributed=True` under `accelerate launch`: each process takes a shard of the queries and every process
        gets all results back, in query order; every process must call it (a collective). Under DeepSpeed ZeRO-3
        the shards are padded to equal length so that all processes run `generate` in lockstep.
        With a reranker (and `rerank`), the images of all beams are re-ranked and the best `top_k` returned, their
        `score` the fused one (for query images, with the dense image-image cosine); `rerank=False` gives the beams'
        own ranking.
        """
        if (queries is None) == (images is None):
            raise GraceInputError("retrieve: give either text queries or query images (images=...), exactly one")
        for name, given, expected in (
            ("queries", queries, "a string or a list of strings"),
            ("images", images, "a PIL image, an image file path or a list of them"),
        ):
            if given is not None and (
                isinstance(given, bytes | bytearray) or not isinstance(given, Iterable | os.PathLike | Image.Image)
            ):
                raise GraceInputError(f"{name}: expected {expected}, got {type(given).__name__}")
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise GraceInputError(f"top_k must be an integer, got {type(top_k).__name__} {top_k!r}")
        check_image_views(image_views)
        if images is not None:
            single = isinstance(images, str | os.PathLike | Image.Image)
            queries = self._check_images([images] if single else list(images))
        else:
            queries = self._check_queries([queries] if isinstance(queries, str) else list(queries))
        if top_k < 1:
            raise GraceInputError(f"top_k must be >= 1, got {top_k}")
        if image_views and images is None:
            raise GraceInputError(f"image_views needs query images (images=...), got {image_views}")
        searched = [view for image in queries for view in query_views(image, image_views)] if image_views else queries
        if not rerank or self.reranker is None:
            beams = self._search_all(searched, top_k if not image_views else self.num_beams, batch_size, distributed)
            return [hits[:top_k] for hits in merge_views(beams, 1 + image_views)]
        beams = merge_views(self._search_all(searched, self.num_beams, batch_size, distributed), 1 + image_views)
        return [hits[:top_k] for hits in self.reranker.rerank(queries, beams)]

    def _search_all(
        self, queries: list[Query], top_k: int, batch_size: int | None, distributed: bool
    ) -> list[list[RetrievedImage]]:
        """The beams' ranking of every query (text cut to fit the model's limit), sharded across processes if asked."""
        fitted = [self._fit(query) if isinstance(query, str) else query for query in queries]
        cut = sum(isinstance(a, str) and a != b for a, b in zip(queries, fitted))
        if cut:
            logger.warning(f"{cut} queries were cut to fit the model's limit of {self.max_length} tokens")
        if not distributed:
            return self._retrieve_local(fitted, top_k, batch_size)
        state = PartialState()
        if state.num_processes == 1:
            return self._retrieve_local(fitted, top_k, batch_size)
        with state.split_between_processes(list(range(len(fitted))), apply_padding=True) as positions:
            local = self._retrieve_local([fitted[i] for i in positions], top_k, batch_size)
            rows = [
                (i, [(hit.image_key, hit.identifier, hit.score) for hit in hits]) for i, hits in zip(positions, local)
            ]
        gathered = dict(gather_object(rows))  # padding repeats the last query: the dict keeps one copy
        return [[RetrievedImage(*hit) for hit in gathered[i]] for i in range(len(fitted))]

    def _retrieve_local(self, queries: list[Query], top_k: int, batch_size: int | None) -> list[list[RetrievedImage]]:
        size = batch_size or self.batch_size
        results: list[list[RetrievedImage]] = []
        for start in range(0, len(queries), size):
            results.extend(self._search(queries[start : start + size], top_k))
        return results


def query_views(image: Image.Image, count: int) -> list[Image.Image]:
    """A query image and `count` crops of it (`QUERY_VIEWS`; view `v` is the same crop on every call)."""
    return [image, *(QUERY_VIEWS(image, seed=0, epoch=view, index=0) for view in range(count))]


def merge_views(beams: list[list[RetrievedImage]], views: int) -> list[list[RetrievedImage]]:
    """One ranking per run of `views` consecutive rankings (a query image and its crops): each image scored by the log
    of its beams' probability averaged over the views (absent from a view's beams: 0 there), best first (1: the
    rankings as they are)."""
    if views == 1:
        return beams
    merged = []
    for start in range(0, len(beams), views):
        probability: dict[str, float] = {}
        identifier: dict[str, str] = {}
        for hits in beams[start : start + views]:
            for hit in hits:
                probability[hit.image_key] = probability.get(hit.image_key, 0.0) + math.exp(hit.score)
                identifier.setdefault(hit.image_key, hit.identifier)
        ranked = sorted(probability, key=lambda key: -probability[key])
        merged.append([RetrievedImage(key, identifier[key], math.log(probability[key] / views)) for key in ranked])
    return merged


def _prepare_for_deepspeed_inference(accelerator: Any, model: Any, batch_size: int) -> tuple[Any, Any]:
    """Wrap `model` in a DeepSpeed engine (ZeRO-3 shards its parameters); return the engine and the module to
    generate with (its forward gathers the shards through the engine's hooks)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        # without a dataloader accelerate cannot infer it; inference does not use it
        config["train_micro_batch_size_per_gpu"] = batch_size
    engine = accelerator.prepare(model)
    return engine, accelerator.unwrap_model(engine)
