"""The `grace-hf serve` app: a Gradio page and API that rank a collection's images for typed queries or an uploaded
image (query by image: the images the model memorized that it shows).

`SearchService` is the logic (validation, one batched `retrieve` call for many queries, thumbnails, the gold image
of test captions); `build_app` puts it behind a Gradio `Blocks` page whose queue batches concurrent users' queries
into one call. The API endpoint is `/search`, with inputs `(query, top_k)` and outputs `(gallery, status, answer)`;
`answer` is the machine-readable result:

    {"query": "...", "top_k": 5, "error": null, "gold": "images/0042.png" or null,
     "results": [{"rank": 1, "image_key": "...", "identifier": "...", "score": -0.31, "gold": false}, ...]}

The image endpoint is `/search_image`, with inputs `(image, top_k)` (an uploaded file) and the same outputs; its
answer carries `"image"` (the uploaded file's name) instead of `"query"`, and `"gold": null`.

Bad input (an empty or over-long query, a missing or unreadable image, a top-k out of range) is answered per request
with `error` set and a message, never by failing the batch it arrived in.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr  # the optional `app` extra: only `grace-hf serve` and the Space import this module
from PIL import ImageOps

from grace_hf.data.images import read_query_image
from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_bytes
from grace_hf.retrieval.results import RetrievedImage
from grace_hf.retrieval.retriever import GraceRetriever, check_image_views
from grace_hf.serving.gallery import ImageLoader

__all__ = ["API_NAME", "IMAGE_API_NAME", "SearchService", "build_app", "read_test_captions"]

API_NAME = "search"
IMAGE_API_NAME = "search_image"
GOLD_COLOR = (26, 156, 59)
FRAME_COLOR = (221, 221, 221)
NUM_EXAMPLES = 8

Rank = Callable[[list[str], int], list[list[RetrievedImage]]]
GalleryItem = tuple[str, str]  # (thumbnail file, caption)
Batch = tuple[list[list[GalleryItem]], list[str], list[dict]]  # galleries, status lines, answers


def read_test_captions(path: str | os.PathLike) -> list[tuple[str, str]]:
    """`(query, gold image key)` pairs from JSON lines with "query" and "gold" (or "image_key") fields, as
    `grace-hf evaluate` and the demo write them (`queries.jsonl`)."""
    if not Path(path).is_file():
        raise GraceInputError(f"{path}: no such file of test captions")
    pairs = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise GraceInputError(f"{path}: cannot read the test captions: {err}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GraceInputError(f"{path}: line {number}: not JSON ({err.msg})") from None
        except RecursionError:
            raise GraceInputError(f"{path}: line {number}: not JSON (nested too deeply)") from None
        gold = record.get("gold", record.get("image_key")) if isinstance(record, dict) else None
        if not isinstance(gold, str) or not isinstance(record.get("query"), str):
            raise GraceInputError(f"{path}: line {number}: expected an object with 'query' and 'gold' strings")
        pairs.append((record["query"], gold))
    return pairs


class _Thumbnails:
    """Thumbnail files of the collection's images, written once on first use into a private temporary folder
    (bounded by twice the collection: plain, and framed in green for the gold image)."""

    def __init__(self, load_image: ImageLoader, size: int):
        self.load_image, self.size = load_image, size
        self._folder = tempfile.TemporaryDirectory(prefix="grace-thumbnails-")

    def path(self, image_key: str, gold: bool) -> str | None:
        name = hashlib.sha1(image_key.encode()).hexdigest() + ("-gold" if gold else "") + ".png"
        path = Path(self._folder.name) / name
        if not path.is_file():
            image = self.load_image(image_key)
            if image is None:
                return None
            thumbnail = image.convert("RGB")
            thumbnail.thumbnail((self.size, self.size))
            framed = ImageOps.expand(
                thumbnail, border=max(2, self.size // 32), fill=GOLD_COLOR if gold else FRAME_COLOR
            )
            buffer = io.BytesIO()
            framed.save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())
        return str(path)


class SearchService:
    """Validated, batched search over one retriever, with thumbnails and gold marks.

    Args:
        retriever: the loaded `GraceRetriever`; its `num_beams` is the largest top-k offered.
        load_image: image key -> picture (None: no thumbnail); `gallery.folder_image_loader` or
            `gallery.dataset_image_loader`.
        test_captions: `(query, gold image key)` pairs: the examples shown, and the gold image marked when a query is
            one of them.
        default_top_k: the top-k the page starts with.
        max_query_chars: longer queries are refused with a message (memory and latency stay bounded).
        thumbnail_size: thumbnail side in pixels.
        rank: `rank(queries, top_k)` -> ranked images per query; default `retriever.retrieve`. A second stage (a
            reranker) wraps this call.
        image_views: uploaded images are also searched in this many crops of themselves (`retrieve`'s
            `image_views`, at most `MAX_IMAGE_VIEWS`: more robust to altered copies, that many more searches).
    """

    def __init__(
        self,
        retriever: GraceRetriever,
        load_image: ImageLoader | None = None,
        test_captions: Sequence[tuple[str, str]] = (),
        default_top_k: int = 5,
        max_query_chars: int = 1000,
        thumbnail_size: int = 128,
        rank: Rank | None = None,
        image_views: int = 0,
    ):
        self.retriever = retriever
        self.max_top_k = retriever.num_beams
        if not 1 <= default_top_k <= self.max_top_k:
            raise GraceInputError(f"top-k must be between 1 and {self.max_top_k} (the beams), got {default_top_k}")
        if max_query_chars < 1:
            raise GraceInputError(f"the query length limit must be >= 1 character, got {max_query_chars}")
        self.default_top_k, self.max_query_chars = default_top_k, max_query_chars
        retriever.max_query_chars = max_query_chars
        self.rank: Rank = rank or (lambda queries, top_k: retriever.retrieve(queries, top_k=top_k))
        check_image_views(image_views)
        self.rank_images = lambda images, top_k: retriever.retrieve(
            images=images, top_k=top_k, image_views=image_views
        )
        self.thumbnails = _Thumbnails(load_image, thumbnail_size) if load_image is not None else None
        self.gold_of: dict[str, str] = {}
        for query, gold in test_captions:
            self.gold_of.setdefault(query.strip(), gold)
        self.test_captions = list(test_captions)

    def examples(self, count: int = NUM_EXAMPLES) -> list[str]:
        """Up to `count` test captions of different images, spread over the collection."""
        first_per_image = list({gold: query for query, gold in reversed(self.test_captions)}.values())[::-1]
        return first_per_image[:: max(1, len(first_per_image) // count)][:count]

    def check(self, query: Any, top_k: Any) -> str | None:
        """What is wrong with one request, or None."""
        if not isinstance(query, str):
            return f"the query must be text, got {type(query).__name__}"
        if not query.strip():
            return "the query is empty: type a few words that describe an image"
        if len(query) > self.max_query_chars:
            return f"the query is {len(query):,} characters long; at most {self.max_query_chars:,} are accepted"
        return self._check_top_k(top_k)

    def _check_top_k(self, top_k: Any) -> str | None:
        whole = isinstance(top_k, (int, float)) and not isinstance(top_k, bool) and float(top_k).is_integer()
        if not whole or not 1 <= top_k <= self.max_top_k:
            return f"top-k must be a whole number from 1 to {self.max_top_k}, got {top_k!r}"
        return None

    def search_batch(self, query: list[Any], top_k: list[Any]) -> Batch:
        """Gradio's batched function, one list item per request (the API names its inputs `query` and `top_k`):
        the valid queries go to one `rank` call; every request gets its gallery, status line and answer (an error
        message for an invalid one)."""
        errors = [self.check(text, k) for text, k in zip(query, top_k)]
        return self._answer([{"query": text} for text in query], query, top_k, errors, self.rank)

    def search_image_batch(self, image: list[Any], top_k: list[Any]) -> Batch:
        """The image endpoint's batched function (inputs `image`, Gradio's file data of an upload, and `top_k`): the
        readable images go to one `retrieve(images=...)` call; every request gets its gallery, status and answer."""
        requests, pictures, errors = [], [], []
        for upload, k in zip(image, top_k):
            path = upload.get("path") if isinstance(upload, dict) else None
            name = (upload.get("orig_name") if isinstance(upload, dict) else None) or (path and Path(path).name)
            requests.append({"image": name})
            picture, error = None, "no image: upload the picture to search with"
            if path is not None:
                try:
                    picture, error = read_query_image(path, "the image"), None
                except GraceInputError:
                    error = f"the uploaded file {name!r} is not a readable image"
            pictures.append(picture)
            errors.append(error or self._check_top_k(k))
        return self._answer(requests, pictures, top_k, errors, self.rank_images)

    def _answer(
        self, requests: list[dict], items: list[Any], top_k: list[Any], errors: list[str | None], rank: Callable
    ) -> Batch:
        """Rank the valid `items` in one `rank` call; each request's gallery, status line and answer, which echoes
        `requests` ({"query": text} or {"image": file name})."""
        valid = [i for i, error in enumerate(errors) if error is None]
        ranked: dict[int, list[RetrievedImage]] = {}
        if valid:
            try:
                hits = rank([items[i] for i in valid], max(int(top_k[i]) for i in valid))
                ranked = dict(zip(valid, hits))
            except GraceInputError as err:
                errors = [str(err) if error is None else error for error in errors]
        galleries, statuses, answers = [], [], []
        for i, (request, k) in enumerate(zip(requests, top_k)):
            if i in ranked:
                gallery, status, answer = self._present(request, int(k), ranked[i][: int(k)])
            else:
                gallery, status = [], f"⚠️ {errors[i]}"
                answer = {**request, "top_k": k, "error": errors[i], "gold": None, "results": []}
            galleries.append(gallery)
            statuses.append(status)
            answers.append(answer)
        return galleries, statuses, answers

    def _present(self, request: dict, top_k: int, hits: list[RetrievedImage]) -> tuple[list[GalleryItem], str, dict]:
        gold = self.gold_of.get(request["query"].strip()) if "query" in request else None
        results, gallery = [], []
        for rank, hit in enumerate(hits, start=1):
            is_gold = hit.image_key == gold
            results.append(
                {
                    "rank": rank,
                    "image_key": hit.image_key,
                    "identifier": hit.identifier,
                    "score": hit.score,
                    "gold": is_gold,
                }
            )
            thumbnail = self.thumbnails.path(hit.image_key, is_gold) if self.thumbnails is not None else None
            if thumbnail is not None:
                caption = f"#{rank}{' gold' if is_gold else ''} · {hit.score:.2f} · {hit.identifier}"
                gallery.append((thumbnail, caption))
        status = f"Top {len(hits)} of {len(self.retriever.candidates):,} images."
        if gold is not None:
            gold_rank = next((r["rank"] for r in results if r["gold"]), None)
            status += (
                f" This is a test caption of `{gold}`: ranked **#{gold_rank}** (framed in green)."
                if gold_rank is not None
                else f" This is a test caption of `{gold}`, which is not in the top {top_k}."
            )
        return gallery, status, {**request, "top_k": top_k, "error": None, "gold": gold, "results": results}


def build_app(
    service: SearchService,
    *,
    title: str = "GRACE retrieval",
    max_batch_size: int = 16,
    queue_size: int = 64,
) -> gr.Blocks:
    """The page and its API (`/search`, and `/search_image` for an uploaded image): one search runs at a time, taking
    up to `max_batch_size` waiting requests of one endpoint in one `retrieve` call; at most `queue_size` requests
    wait, later ones are refused with "Queue is full"."""
    if max_batch_size < 1 or queue_size < 1:
        raise GraceInputError(f"max batch size and queue size must be >= 1, got {max_batch_size} and {queue_size}")
    retriever = service.retriever
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            f"# {title}\nThe model writes the identifiers of the images a query describes, by beam search constrained "
            f"to the identifiers of the collection's {len(retriever.candidates):,} images ({retriever.index.kind} "
            "identifiers); the beams, best first, are the ranking."
            + (
                ""
                if retriever.reranker is None
                else f" The images of {retriever.num_beams} beams are re-ranked by a dense model "
                f"({retriever.reranker.scorer.directory}, weight {retriever.reranker.weight:.2f})."
            )
        )
        with gr.Row(equal_height=True):
            query = gr.Textbox(
                label="Query",
                placeholder="describe an image",
                max_length=service.max_query_chars,
                scale=4,
                elem_id="query",
            )
            top_k = gr.Slider(
                1, service.max_top_k, value=service.default_top_k, step=1, label="Top-K", scale=1, elem_id="top-k"
            )
            search = gr.Button("Search", variant="primary", scale=0, elem_id="search")
        with gr.Accordion("Search by image: the images the model memorized that a picture shows", open=False):
            with gr.Row(equal_height=True):
                image = gr.Image(label="Query image", type="filepath", sources=["upload"], elem_id="query-image")
                search_image = gr.Button("Search by image", scale=0, elem_id="search-image")
        status = gr.Markdown(label="Status", elem_id="status")
        gallery = gr.Gallery(label="Ranked images", columns=5, object_fit="contain", elem_id="results")
        with gr.Accordion("Answer as JSON (what the API returns)", open=service.thumbnails is None):
            answer = gr.JSON(label="Answer", elem_id="answer")
        examples = service.examples()
        if examples:
            gr.Examples([[example] for example in examples], inputs=[query], label="Test captions")
        gr.on(
            [search.click, query.submit],
            service.search_batch,
            inputs=[query, top_k],
            outputs=[gallery, status, answer],
            api_name=API_NAME,
            batch=True,
            max_batch_size=max_batch_size,
            concurrency_limit=1,
            concurrency_id=API_NAME,
            preprocess=False,  # checked per query in search_batch: a bad one must not fail its whole batch
        )
        gr.on(
            [search_image.click, image.upload],
            service.search_image_batch,
            inputs=[image, top_k],
            outputs=[gallery, status, answer],
            api_name=IMAGE_API_NAME,
            batch=True,
            max_batch_size=max_batch_size,
            concurrency_limit=1,
            concurrency_id=API_NAME,  # one search at a time, whichever the endpoint
            preprocess=False,  # read per request in search_image_batch: an unreadable file must not fail its batch
        )
    app.queue(max_size=queue_size)
    return app
