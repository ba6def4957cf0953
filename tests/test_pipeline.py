"""`transformers.pipeline("text-to-image-retrieval", model=DIR)` end to end on a tiny trained model: the standard call
ranks as `GraceRetriever` does, `batch_size` batches queries into one search, `image_root` adds the pictures, and bad
input is refused with a message."""

import shutil

import pytest
from PIL import Image
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import grace_hf  # noqa: F401  (registers the task)
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.queries import load_eval_queries
from grace_hf.retrieval import GraceRetriever
from grace_hf.serving.pipeline import TASK

QUERIES = ["a big red circle at the top", "two small green squares", "a hollow blue star on white", "a heart", "x"]


@pytest.fixture(scope="module")
def retrieve(trained_model):
    model_dir, _, _ = trained_model
    return pipeline(TASK, model=str(model_dir), device="cpu")


def test_the_task_is_registered_and_ranks_like_the_retriever(retrieve, trained_model):
    assert TASK in PIPELINE_REGISTRY.get_supported_tasks()
    model_dir, data, _ = trained_model
    reference = GraceRetriever.from_pretrained(model_dir, device="cpu")
    _, _, candidates = load_eval_queries(data)
    for query in QUERIES[:3]:
        ranking = retrieve(query, top_k=3)
        expected = reference.retrieve([query], top_k=3)[0]
        assert [set(result) for result in ranking] == [{"image_key", "identifier", "score"}] * 3
        assert [(r["image_key"], r["identifier"]) for r in ranking] == [(h.image_key, h.identifier) for h in expected]
        assert [r["score"] for r in ranking] == pytest.approx([h.score for h in expected], abs=1e-5)
        assert {r["image_key"] for r in ranking} <= set(candidates)
    assert len(retrieve(QUERIES[0])) == 5  # the default top_k


def test_batch_size_puts_queries_in_one_search(retrieve, monkeypatch):
    one_by_one = retrieve(QUERIES, top_k=4)
    calls = []
    search = retrieve.retriever.retrieve

    def counted(queries, **kwargs):
        calls.append(list(queries))
        return search(queries, **kwargs)

    monkeypatch.setattr(retrieve.retriever, "retrieve", counted)
    batched = retrieve(QUERIES, top_k=4, batch_size=2)
    assert calls == [QUERIES[0:2], QUERIES[2:4], QUERIES[4:5]]
    assert len(batched) == len(QUERIES)
    for single, together in zip(one_by_one, batched):
        assert [r["image_key"] for r in single] == [r["image_key"] for r in together]
        assert [r["score"] for r in single] == pytest.approx([r["score"] for r in together], abs=1e-4)


def test_image_root_adds_the_pictures(retrieve, trained_model):
    model_dir, _, image_root = trained_model
    for ranking in (
        retrieve(QUERIES[0], top_k=2, image_root=str(image_root)),
        pipeline(TASK, model=str(model_dir), device="cpu", image_root=str(image_root))(QUERIES[0], top_k=2),
    ):
        assert len(ranking) == 2
        for result in ranking:
            assert result["image"].size == (64, 64)  # the synthetic images' size
            assert result["image"].tobytes() == Image.open(image_root / result["image_key"]).tobytes()


def test_bad_input_is_refused_with_a_message(retrieve, trained_model, tmp_path):
    with pytest.raises(GraceInputError, match="each query must be a non-empty string, got '  '"):
        retrieve("  ")
    with pytest.raises(GraceInputError, match="top_k must be >= 1, got 0"):
        retrieve(QUERIES[0], top_k=0)
    model_dir, _, _ = trained_model
    shutil.copytree(model_dir, tmp_path / "plain", ignore=shutil.ignore_patterns("identifiers.json"))
    with pytest.raises(GraceInputError, match="must come from a GRACE model directory or Hub repo"):
        pipeline(TASK, model=str(tmp_path / "plain"), device="cpu")
