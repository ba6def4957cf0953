"""The collator: sample texts, the loss mask (exactly the identifier part), images, query cutting."""

import pytest
import torch
from PIL import Image

from grace_hf.models.flamingo import FlamingoProcessor
from grace_hf.retrieval.collection import identifier_token_ids
from grace_hf.training.collate import GraceCollator, identifier_labels, truncate_words

IDENTIFIERS = ["1 2", "3 1 2 3", "0_1-1_2"]


@pytest.fixture(scope="module")
def processor():
    texts = ["a red circle on the left", "a small blue square", "caption:a circle"] + [f"id {i}" for i in IDENTIFIERS]
    return FlamingoProcessor.from_texts(texts, image_size=16, vocab_size=300)


def _half_image(left_color, right_color):
    image = Image.new("RGB", (16, 16), left_color)
    image.paste(Image.new("RGB", (8, 16), right_color), (8, 0))
    return image


def _rows():
    return [
        {"image": _half_image("red", "blue"), "identifier": IDENTIFIERS[0], "query": "a red circle on the left"},
        {"image": _half_image("red", "blue"), "identifier": IDENTIFIERS[1], "query": "a small blue square"},
    ]


@pytest.mark.parametrize("task", ["i2id", "t2id", "caption"])
def test_loss_mask_covers_exactly_the_identifier_part(processor, task):
    rows = [dict(row, caption=row["query"]) for row in _rows()]
    batch = GraceCollator(processor, task)(rows)
    media, end = processor.media_token_id, processor.end_of_chunk_token_id
    for ids, mask, labels, row in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], rows):
        real = ids[mask.bool()].tolist()
        media_at = real.index(media)
        kept = labels[labels != -100].tolist()
        # the kept tokens are one contiguous span: right after <image> through the <|endofchunk|>
        assert kept == real[media_at + 1 :]
        assert kept[-1] == end and end not in kept[:-1]
        assert torch.all(labels[: media_at + 1] == -100)
        assert torch.all(labels[~mask.bool()] == -100)
        if task != "caption":
            assert kept == identifier_token_ids(processor, [row["identifier"]])[0]


def test_labels_ignore_everything_after_the_first_end_of_chunk():
    media, end, pad = 1, 0, 2
    input_ids = torch.tensor([[7, media, 5, 6, end, 8, end, pad], [media, 5, end, 9, 9, pad, pad, pad]])
    attention_mask = (input_ids != pad).long()
    labels = identifier_labels(input_ids, attention_mask, media, end)
    assert labels.tolist() == [
        [-100, -100, 5, 6, end, -100, -100, -100],
        [-100, 5, end, -100, -100, -100, -100, -100],
    ]


def test_t2id_image_modes(processor):
    rows = _rows()
    no_image = GraceCollator(processor, "t2id", t2id_image="none")(rows)
    assert "pixel_values" not in no_image
    blank = GraceCollator(processor, "t2id", t2id_image="blank")(rows)
    assert blank["pixel_values"].shape == (2, 1, 1, 3, 16, 16)
    expected = processor(text=["x"], images=[processor.blank_image()])["pixel_values"][0]
    assert torch.equal(blank["pixel_values"][1], expected)
    assert torch.equal(blank["input_ids"], no_image["input_ids"])


def test_queries_are_cut_to_max_words(processor):
    assert truncate_words("  a  b c d ", 2) == "a b"
    rows = _rows()
    short = GraceCollator(processor, "t2id", max_query_words=2)(rows[:1])
    text = processor.tokenizer.decode(short["input_ids"][0], skip_special_tokens=False)
    assert text.startswith("caption:a red<image>")


def test_unknown_task_is_refused(processor):
    with pytest.raises(ValueError, match="unknown task"):
        GraceCollator(processor, "dense")
