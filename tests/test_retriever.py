"""GraceRetriever on a tiny random model directory: exact identifiers, exhaustive beams equal teacher-forced
log-probabilities, batching, errors on bad input, the saved trie, and the query-image modes."""

import logging
from types import SimpleNamespace

import pytest
import torch

from grace_hf.errors import GraceInputError
from grace_hf.prompts import query_prompt
from grace_hf.retrieval import GraceRetriever, IdentifierTrie
from grace_hf.retrieval.collection import identifier_token_ids
from tests.helpers import IMAGES, QUERIES


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model()


@pytest.fixture(scope="module")
def retriever(model_dir):
    return GraceRetriever.from_pretrained(model_dir, device="cpu")


def test_results_are_distinct_collection_images_best_first(retriever):
    results = retriever.retrieve(QUERIES, top_k=5)
    identifier_to_image = retriever.index.identifier_to_image()
    assert len(results) == len(QUERIES)
    for hits in results:
        assert len(hits) == 5
        keys = [hit.image_key for hit in hits]
        assert len(set(keys)) == len(keys) and set(keys) <= set(IMAGES[4:])  # only the collection (test) images
        assert all(identifier_to_image[hit.identifier] == hit.image_key for hit in hits)
        scores = [hit.score for hit in hits]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)


def teacher_forced_log_prob(retriever, query, identifier):
    """log P(`id <identifier><|endofchunk|>` | `caption:<query><image>`) by one forward pass."""
    processor = retriever.processor
    prompt = processor(text=[query_prompt(query)], return_tensors="pt")["input_ids"]
    tokens = torch.tensor(identifier_token_ids(processor, [identifier]))  # (1, L)
    with torch.no_grad():
        logits = retriever.model(input_ids=torch.cat([prompt, tokens], dim=1)).logits  # (1, P + L, V)
    log_probs = logits[0, prompt.shape[1] - 1 : -1].log_softmax(-1)  # (L, V)
    return log_probs.gather(1, tokens.T).sum().item()


def test_exhaustive_beams_equal_teacher_forced_log_probabilities(retriever):
    """With as many beams as identifiers the search is exhaustive: each score must be log P(identifier | prompt)."""
    query = QUERIES[1]
    hits = retriever.retrieve([query], top_k=100)[0]
    assert len(hits) == len(retriever.identifiers)  # 10 beams, clamped to the 8 candidate identifiers
    expected = {
        identifier: teacher_forced_log_prob(retriever, query, identifier) for identifier in retriever.identifiers
    }
    ranked = sorted(expected, key=expected.get, reverse=True)
    assert [hit.identifier for hit in hits] == ranked
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.identifier], abs=1e-4)


def test_batching_does_not_change_results(retriever):
    one_by_one = [retriever.retrieve([q], top_k=4)[0] for q in QUERIES]
    batched = retriever.retrieve(QUERIES, top_k=4, batch_size=3)
    for single, together in zip(one_by_one, batched):
        assert [h.image_key for h in single] == [h.image_key for h in together]
        assert [h.score for h in single] == pytest.approx([h.score for h in together], abs=1e-4)


def test_bad_queries_and_candidates(model_dir, retriever):
    with pytest.raises(GraceInputError, match=r"queries\[1\]: empty query"):
        retriever.retrieve(["a dog", "   "])
    with pytest.raises(GraceInputError, match="top_k must be >= 1"):
        retriever.retrieve(["a dog"], top_k=0)
    with pytest.raises(GraceInputError, match="unknown image key 'nope.png'"):
        GraceRetriever(retriever.model, retriever.processor, retriever.index, candidates=["nope.png"])
    with pytest.raises(GraceInputError, match="query_image must be one of"):
        GraceRetriever(retriever.model, retriever.processor, retriever.index, query_image="photo")
    with pytest.raises(GraceInputError, match="not a model directory"):
        GraceRetriever.from_pretrained(model_dir / "missing")


def test_identifier_tokens_outside_the_model_vocabulary(retriever):
    from grace_hf.models.flamingo import FlamingoConfig

    small = SimpleNamespace(config=FlamingoConfig.from_preset("tiny", text_config={"vocab_size": 8}))
    with pytest.raises(GraceInputError, match=r"outside the model's vocabulary \(8\)"):
        GraceRetriever(small, retriever.processor, retriever.index)


def test_too_long_query_is_cut_to_fit(retriever, caplog):
    limited = GraceRetriever(retriever.model, retriever.processor, retriever.index, max_length=16)
    long_query = " ".join(["a red square"] * 30)
    with caplog.at_level(logging.WARNING, logger="grace_hf.retrieval.retriever"):
        hits = limited.retrieve([long_query], top_k=3)[0]
    assert "1 queries were cut to fit the model's limit of 16 tokens" in caplog.text
    assert len(hits) == 3
    fitted = limited._fit(long_query)
    assert long_query.startswith(fitted) and limited._prompt_length(fitted) + limited.trie.max_depth <= 16
    tiny_limit = GraceRetriever(retriever.model, retriever.processor, retriever.index, max_length=4)
    with pytest.raises(GraceInputError, match="leaves no room for a query"):
        tiny_limit.retrieve(["a red square"])


def test_explicit_candidates_and_beam_clamp(retriever):
    small = GraceRetriever(retriever.model, retriever.processor, retriever.index, candidates=IMAGES[:2], num_beams=10)
    assert small.num_beams == 2
    hits = small.retrieve(["a red square"], top_k=10)[0]
    assert sorted(hit.image_key for hit in hits) == IMAGES[:2]
    # one candidate: one beam, i.e. greedy search, whose score must still be the identifier's log-probability
    single = GraceRetriever(retriever.model, retriever.processor, retriever.index, candidates=IMAGES[1:2])
    assert single.num_beams == 1
    (hit,) = single.retrieve(["a red square"])[0]
    assert hit.image_key == IMAGES[1]
    assert hit.score == pytest.approx(teacher_forced_log_prob(retriever, "a red square", hit.identifier), abs=1e-4)


def test_saved_trie_is_checked_and_a_stale_or_corrupt_one_ignored(tmp_path, retriever, caplog):
    retriever.save_pretrained(tmp_path / "saved")
    trie_file = tmp_path / "saved" / "identifier_trie.safetensors"
    loaded = GraceRetriever.from_pretrained(tmp_path / "saved", device="cpu")
    assert torch.equal(IdentifierTrie.load(trie_file).edge_keys, loaded.trie.edge_keys)
    expected = [[hit.image_key for hit in hits] for hits in retriever.retrieve(QUERIES, top_k=3)]

    IdentifierTrie([[1, 2]]).save(trie_file)  # a stale trie, whatever it claims
    with caplog.at_level(logging.WARNING, logger="grace_hf.retrieval.collection"):
        stale = GraceRetriever.from_pretrained(tmp_path / "saved", device="cpu")
    assert "does not match the tokenized identifiers" in caplog.text
    assert [[hit.image_key for hit in hits] for hits in stale.retrieve(QUERIES, top_k=3)] == expected
    trie_file.write_bytes(b"garbage")
    corrupt = GraceRetriever.from_pretrained(tmp_path / "saved", device="cpu")
    assert len(corrupt.trie) == len(retriever.trie)
    other = GraceRetriever.from_pretrained(tmp_path / "saved", device="cpu", candidates=IMAGES[:3])
    assert len(other.trie) == 3


def test_blank_query_image_and_semantic_identifiers(tiny_model):
    directory = tiny_model("semantic", query_image="blank", seed=1)
    retriever = GraceRetriever.from_pretrained(directory, device="cpu", num_beams=6)
    assert retriever.query_image == "blank"
    hits = retriever.retrieve(QUERIES[:2], top_k=6)
    identifier_to_image = retriever.index.identifier_to_image()
    for query_hits in hits:
        keys = [hit.image_key for hit in query_hits]
        assert len(keys) == len(set(keys)) >= 3  # two identifiers per image, one entry per image
        assert all(identifier_to_image[hit.identifier] == hit.image_key for hit in query_hits)


def assert_same_rankings(fast, slow):
    for fast_hits, slow_hits in zip(fast, slow, strict=True):
        assert [(h.image_key, h.identifier) for h in fast_hits] == [(h.image_key, h.identifier) for h in slow_hits]
        assert [h.score for h in fast_hits] == pytest.approx([h.score for h in slow_hits], rel=1e-5, abs=1e-4)


@pytest.mark.parametrize(
    ("kind", "query_image", "length_penalty"), [("numeric", "none", 0.0), ("semantic", "blank", -2.0)]
)
def test_fast_decoding_ranks_like_generate(tiny_model, kind, query_image, length_penalty):
    directory = tiny_model(kind, query_image=query_image, seed=2)
    queries = [*QUERIES, "a"]  # prompts of different lengths: left padding
    rankings = {}
    for decoding in ("fast", "generate"):
        retriever = GraceRetriever.from_pretrained(
            directory, device="cpu", decoding=decoding, length_penalty=length_penalty, candidates=IMAGES
        )
        assert retriever.decoding == decoding
        rankings[decoding] = retriever.retrieve(queries, top_k=10, batch_size=3)
    assert_same_rankings(rankings["fast"], rankings["generate"])
    assert all(len(hits) >= 5 for hits in rankings["fast"])


def test_decoding_choice_is_logged_and_checked(retriever, caplog):
    with caplog.at_level(logging.INFO, logger="grace_hf.retrieval.retriever"):
        auto = GraceRetriever(retriever.model, retriever.processor, retriever.index)
    assert auto.decoding == "generate"  # the fast path is picked on a GPU
    assert "decodes with generate (no GPU)" in caplog.text
    with pytest.raises(GraceInputError, match="decoding must be one of"):
        GraceRetriever(retriever.model, retriever.processor, retriever.index, decoding="turbo")
    with pytest.raises(GraceInputError, match="decoding='fast' is not available here: one beam is greedy search"):
        GraceRetriever(retriever.model, retriever.processor, retriever.index, candidates=IMAGES[1:2], decoding="fast")
