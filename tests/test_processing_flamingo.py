"""FlamingoProcessor and the tiny tokenizer: special tokens, padding, save/load."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from grace_hf.models.flamingo import (
    FlamingoConfig,
    FlamingoForConditionalGeneration,
    FlamingoProcessor,
    train_tokenizer,
)
from grace_hf.prompts import query_prompt, t2id_text
from grace_hf.retrieval.collection import identifier_token_ids

TEXTS = ["a dog runs in the park", "two kids ride bikes", "a red car", "id 1 2 3", "id 1234"] * 2


@pytest.fixture(scope="module")
def processor():
    return FlamingoProcessor.from_texts(TEXTS, image_size=32, vocab_size=300)


def test_tokenizer_is_deterministic_with_special_tokens_and_single_digits():
    first, second = train_tokenizer(TEXTS, vocab_size=300), train_tokenizer(TEXTS, vocab_size=300)
    assert first.get_vocab() == second.get_vocab()
    assert first.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"]) == [0, 1, 2]
    assert first.pad_token == "<PAD>" and first.eos_token == "<|endofchunk|>"
    tiny = FlamingoConfig.from_preset("tiny")
    assert (tiny.end_of_chunk_token_id, tiny.media_token_id, tiny.pad_token_id) == (0, 1, 2)
    tokens = first.convert_ids_to_tokens(first("id 1234 and 99").input_ids)
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["1", "2", "3", "4", "9", "9"]


def test_call_pads_left_for_generation_and_shapes_pixels(processor):
    texts = [query_prompt("a dog"), query_prompt("two kids ride bikes in the park")]
    images = [processor.blank_image(), Image.new("RGB", (50, 40), (255, 0, 0))]
    batch = processor(text=texts, images=images, padding_side="left")
    assert batch["pixel_values"].shape == (2, 1, 1, 3, 32, 32)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0, 0] == processor.pad_token_id and mask[0, 0] == 0
    assert (ids[:, -1] == processor.media_token_id).all()
    right = processor(text=texts, padding_side="right")
    assert "pixel_values" not in right and right["input_ids"][0, -1] == processor.pad_token_id
    gray = batch["pixel_values"][0].flatten(0, 2)  # the blank image is one constant color per channel
    assert torch.allclose(gray, gray.mean(dim=(-1, -2), keepdim=True))
    assert processor.blank_image().size == (32, 32)
    with pytest.raises(ValueError, match="one image per text"):
        processor(text=texts, images=images[:1])


def test_add_identifier_tokens_and_model_resize(processor):
    processor = FlamingoProcessor.from_texts(TEXTS, image_size=32, vocab_size=300)
    before = len(processor.tokenizer)
    assert processor.add_identifier_tokens(["0_12", "1_5", "0_12"]) == 2
    assert len(processor.tokenizer) == before + 2
    ids = identifier_token_ids(processor, ["0_12-1_5"])[0]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    assert "0_12" in tokens and "1_5" in tokens


def test_save_load_next_to_the_model(processor, tmp_path):
    config = FlamingoConfig.from_preset("tiny", text_config={"vocab_size": len(processor.tokenizer)})
    FlamingoForConditionalGeneration(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    for loaded in (FlamingoProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, FlamingoProcessor)
        assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        assert loaded.image_size == 32 and loaded.pad_token_id == processor.pad_token_id
        texts, images = [t2id_text("a dog", "1 2")], [processor.blank_image()]
        expected, got = processor(text=texts, images=images), loaded(text=texts, images=images)
        assert all(torch.equal(expected[key], got[key]) for key in expected)
    model = FlamingoForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
