"""`transformers.pipeline("text-to-image-retrieval", model=...)`: a GRACE model directory or Hub id behind the
standard pipeline call. Importing `grace_hf` registers the task.

>>> from transformers import pipeline
>>> retrieve = pipeline("text-to-image-retrieval", model="demo_output/model-structured", image_root="demo_output/data")
>>> retrieve("a small red star at the top left", top_k=3)  # one query -> its ranking, best first
[{'image_key': 'images/synthetic_000123.png', 'identifier': '3_1-0_2', 'score': -0.12, 'image': <PIL.Image>}, ...]
>>> retrieve(["a red circle", "two green squares"], batch_size=8)  # a list of queries -> a list of rankings
>>> retrieve(Image.open("photo.jpg"), top_k=3)  # query by image (or {"image": PIL image or file path})
>>> retrieve(Image.open("photo.jpg"), image_views=4)  # also search 4 crops of it (5x the time)
>>> reranked = pipeline("text-to-image-retrieval", model="demo_output/model-structured", reranker="runs/dense-clip")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from PIL import Image
from transformers.pipelines import PIPELINE_REGISTRY, Pipeline

from grace_hf.data.images import read_query_image
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IDENTIFIERS_FILE
from grace_hf.model_dir import read_retrieval_files, resolve_model_dir
from grace_hf.models.flamingo import FlamingoForConditionalGeneration
from grace_hf.retrieval.rerank import DenseScorer, check_reranker_given
from grace_hf.retrieval.results import RetrievedImage
from grace_hf.retrieval.retriever import GraceRetriever
from grace_hf.serving.gallery import folder_image_loader

__all__ = ["TASK", "TextToImageRetrievalPipeline"]

TASK = "text-to-image-retrieval"


class TextToImageRetrievalPipeline(Pipeline):
    """Text queries -> ranked images of the model's collection, by trie-constrained beam search (`GraceRetriever`).
    A query may also be an image (a PIL image, or `{"image": PIL image or file path}`): the images the model memorized
    that it shows, found from the memorization prompt `<image>` (`GraceRetriever.retrieve(images=...)`).

    Built by `pipeline("text-to-image-retrieval", model=DIR_or_hub_id, device=...)`; the model directory's
    `identifiers.json`, `grace_config.json` and cached trie come with the model.

    Construction arguments, besides the pipeline's own (`device`, `dtype`, `batch_size`):
        num_beams: beams per query, the most results a query can get (default 10).
        length_penalty: as in `GraceRetriever` (default 0.0).
        candidates: image keys to rank (default: the model's collection).
        reranker: a `grace-hf baseline-clip` directory (or a `DenseScorer`) that re-ranks the images of the beams;
            rerank_weight, rerank_beams: as in `GraceRetriever.from_pretrained` (default: the model's rerank.json).
        image_root, top_k: defaults for the call arguments.

    Call arguments:
        top_k: results per query (default 5, at most `num_beams`).
        image_root: folder of the image files (`<image_root>/<image key>`); each result then carries its "image".
        batch_size: queries per `generate` call.

    Each query gives a list of `{"image_key", "identifier", "score"}` (+ `"image"`, a PIL image), best first.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(
        self,
        *args: Any,
        num_beams: int = 10,
        length_penalty: float = 0.0,
        candidates: Sequence[str] | None = None,
        reranker: str | os.PathLike | DenseScorer | None = None,
        rerank_weight: float | None = None,
        rerank_beams: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        name_or_path = getattr(self.model.config, "_name_or_path", "")
        directory = resolve_model_dir(name_or_path) if name_or_path else None
        if directory is None or not (directory / IDENTIFIERS_FILE).is_file():
            raise GraceInputError(
                f"{TASK}: the model must come from a GRACE model directory or Hub repo (with {IDENTIFIERS_FILE}); "
                f"got {name_or_path!r}"
            )
        index, grace_config = read_retrieval_files(directory, self.processor)
        check_reranker_given(reranker, rerank_weight, rerank_beams, f"{TASK}: ")
        self.retriever = GraceRetriever.from_loaded(
            directory,
            self.model,
            self.processor,
            index,
            grace_config,
            reranker,
            rerank_weight,
            rerank_beams,
            num_beams=num_beams,
            length_penalty=length_penalty,
            candidates=candidates,
        )

    def _sanitize_parameters(
        self, top_k: int | None = None, image_root: str | None = None, image_views: int | None = None
    ):
        if image_root is not None and not os.path.isdir(image_root):
            raise GraceInputError(f"{TASK}: image_root {image_root}: not a directory")
        forward_params = {} if top_k is None else {"top_k": top_k}
        if image_views is not None:
            forward_params["image_views"] = image_views
        postprocess_params = {} if image_root is None else {"image_root": image_root}
        return {}, forward_params, postprocess_params

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, list) and not inputs:  # no queries, no rankings (the base pipeline indexes the first)
            return []
        return super().__call__(inputs, *args, **kwargs)

    def preprocess(self, inputs: str | Image.Image | dict[str, Any]) -> dict[str, str | Image.Image]:
        if isinstance(inputs, dict) and set(inputs) == {"image"}:
            return {"query": read_query_image(inputs["image"], f"{TASK}: the query's 'image'")}
        if isinstance(inputs, Image.Image):
            return {"query": inputs.convert("RGB")}
        if not isinstance(inputs, str) or not inputs.strip():
            raise GraceInputError(
                f"{TASK}: each query must be a non-empty string, got {inputs!r}; an image query is a PIL image or "
                "{'image': PIL image or file path}"
            )
        return {"query": inputs}

    def _forward(self, model_inputs: dict[str, Any], top_k: int = 5, image_views: int = 0) -> dict[str, list]:
        # batch_size > 1: the pipeline's collate turns the queries of a batch into a list (texts and images mixed)
        query = model_inputs["query"]
        queries = query if isinstance(query, list) else [query]
        results: list[list[RetrievedImage]] = [[] for _ in queries]
        for is_text in (True, False):
            positions = [i for i, q in enumerate(queries) if isinstance(q, str) == is_text]
            if positions:
                chosen = [queries[i] for i in positions]
                given = {"queries": chosen} if is_text else {"images": chosen, "image_views": image_views}
                hits = self.retriever.retrieve(top_k=top_k, batch_size=len(positions), **given)
                for i, ranking in zip(positions, hits):
                    results[i] = ranking
        return {"hits": results if isinstance(query, list) else results[0]}

    def postprocess(self, model_outputs: dict[str, list[RetrievedImage]], image_root: str | None = None) -> list[dict]:
        load_image = folder_image_loader(image_root) if image_root is not None else None
        ranking = []
        for hit in model_outputs["hits"]:
            result = {"image_key": hit.image_key, "identifier": hit.identifier, "score": hit.score}
            if load_image is not None:
                result["image"] = load_image(hit.image_key)
            ranking.append(result)
        return ranking


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=TextToImageRetrievalPipeline, pt_model=FlamingoForConditionalGeneration, type="text"
)
