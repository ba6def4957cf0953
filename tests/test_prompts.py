"""The task texts and the identifier tokens the trie holds: what the model writes after `<image>`."""

import pytest

from grace_hf.models.flamingo import FlamingoProcessor
from grace_hf.prompts import caption_prompt, caption_text, i2id_text, identifier_text, query_prompt, t2id_text
from grace_hf.retrieval.collection import build_identifier_trie, identifier_token_ids

TEXTS = ["a dog runs in the park", "two kids ride bikes", "a red car", "id 1 2 3", "id 1234"] * 2


@pytest.fixture(scope="module")
def processor():
    return FlamingoProcessor.from_texts(TEXTS, image_size=32, vocab_size=300)


def test_prompt_formats():
    assert i2id_text("1 2") == "<image>id 1 2<|endofchunk|>"
    assert t2id_text("a dog", "1 2") == "caption:a dog<image>id 1 2<|endofchunk|>"
    assert query_prompt("a dog") == "caption:a dog<image>"
    assert identifier_text("1 2") == "id 1 2<|endofchunk|>"
    assert caption_prompt() == "<image>caption:"
    assert caption_text("a dog") == "<image>caption:a dog<|endofchunk|>"


def test_identifier_tokens_are_what_follows_the_image_in_a_sample(processor):
    identifiers = ["1 2", "34", "a red car"]
    sequences = identifier_token_ids(processor, identifiers)
    for identifier, sequence in zip(identifiers, sequences):
        full = processor.tokenizer(t2id_text("two kids", identifier)).input_ids
        after_image = full[full.index(processor.media_token_id) + 1 :]
        assert sequence == after_image
        assert sequence[-1] == processor.end_of_chunk_token_id
        assert full[: len(full) - len(sequence)] == processor.tokenizer(query_prompt("two kids")).input_ids
    trie = build_identifier_trie(processor, identifiers)
    assert len(trie) == 3 and trie.allowed(sequences[1][:-1]) == [processor.end_of_chunk_token_id]
