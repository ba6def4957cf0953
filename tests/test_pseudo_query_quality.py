"""BLEU of pseudo-queries against the held-out val captions, and the captioner's output folder."""

import json

import pytest

from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.pseudo_queries import PSEUDO_QUERIES_FILE, load_pseudo_queries
from grace_hf.data.synthetic import SYNTHETIC_JSON, write_synthetic
from grace_hf.evaluation.captions import QUALITY_FILE, pseudo_query_bleu, write_captioner_output
from grace_hf.serving.gallery import CaptionedImage, render_gallery


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = write_synthetic(tmp_path_factory.mktemp("syn") / "data", 30, seed=2, num_workers=1)
    return load_karpathy(root / SYNTHETIC_JSON, root)


def test_bleu_rewards_the_captions_and_punishes_noise(corpus):
    val = corpus.split("val")
    exact = pseudo_query_bleu(corpus, {image.key: [image.captions[1]] for image in val})
    noise = pseudo_query_bleu(corpus, {image.key: ["zebra quantum violin"] for image in val})
    assert exact["bleu4"] == pytest.approx(100.0)
    assert noise["bleu4"] < 5.0
    assert exact["num_images"] == len(val) and exact["split"] == "val"
    assert pseudo_query_bleu(corpus, {}) is None  # nothing to measure


def test_captioner_output_is_the_original_format_with_its_quality(corpus, tmp_path):
    queries = {image.key: ["a shape", "another shape"] for image in corpus.images if image.split != "train"}
    quality = write_captioner_output(tmp_path, corpus, queries)
    assert json.loads((tmp_path / QUALITY_FILE).read_text()) == quality
    assert load_pseudo_queries(tmp_path / PSEUDO_QUERIES_FILE, corpus) == queries


def test_gallery_shows_the_captioner_examples(corpus):
    image = corpus.split("val")[0]
    page = render_gallery([], captioned=[CaptionedImage(image.key, ["a red <star>"], image.captions[0])])
    assert "What the captioner wrote" in page and "a red &lt;star&gt;" in page and image.captions[0] in page
