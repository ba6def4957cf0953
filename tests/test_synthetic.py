"""The built-in synthetic data: layout, distinct content, captions, determinism, CLI."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from grace_hf import cli
from grace_hf.data.synthetic import (
    COLORS,
    MAX_IMAGES,
    PSEUDO_QUERIES_JSON,
    SHAPES,
    SYNTHETIC_JSON,
    write_synthetic,
)
from grace_hf.errors import GraceInputError

NUM_IMAGES = 40


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = write_synthetic(tmp_path_factory.mktemp("syn") / "data", NUM_IMAGES, seed=3, num_workers=1)
    with open(out / SYNTHETIC_JSON) as f:
        data = json.load(f)
    with open(out / PSEUDO_QUERIES_JSON) as f:
        queries = json.load(f)
    return out, data, queries


def test_layout_and_splits(synthetic):
    out, data, _ = synthetic
    images = data["images"]
    assert len(images) == NUM_IMAGES
    splits = [image["split"] for image in images]
    assert splits.count("test") == splits.count("val") == 4
    assert splits.count("train") == NUM_IMAGES - 8
    for i, image in enumerate(images):
        assert image["filepath"] == "images" and image["imgid"] == i
        assert len(image["sentences"]) == 5
        with Image.open(out / image["filepath"] / image["filename"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)


def test_every_image_distinct(synthetic):
    out, data, _ = synthetic
    pixels = [np.asarray(Image.open(out / "images" / image["filename"])) for image in data["images"]]
    assert len({hashlib.sha256(p.tobytes()).hexdigest() for p in pixels}) == NUM_IMAGES
    assert len({p.reshape(-1, 3)[0].tobytes() for p in pixels}) > 1  # backgrounds vary


def test_captions_name_the_content(synthetic):
    _, data, _ = synthetic
    for image in data["images"]:
        captions = [s["raw"] for s in image["sentences"]]
        assert len(set(captions)) == 5
        full = captions[0].lower()  # the first caption names every attribute
        assert any(shape in full for shape in SHAPES) and any(color in full for color in COLORS)
        assert "background" in full or "backdrop" in full


def test_pseudo_queries_for_non_train_images(synthetic):
    _, data, queries = synthetic
    non_train = {image["filename"] for image in data["images"] if image["split"] != "train"}
    assert set(queries) == non_train
    captions = {s["raw"].lower() for image in data["images"] for s in image["sentences"]}
    for qs in queries.values():
        assert len(qs) == 5 and len(set(qs)) == 5
        assert all(q.islower() and "." not in q and q not in captions for q in qs)  # terse, not a human caption
    all_queries = [q for qs in queries.values() for q in qs]
    assert len(set(all_queries)) == len(all_queries)


def test_same_seed_same_files(tmp_path, synthetic):
    out, _, _ = synthetic
    again = write_synthetic(tmp_path / "again", NUM_IMAGES, seed=3, num_workers=2)
    for name in (SYNTHETIC_JSON, PSEUDO_QUERIES_JSON, "images/synthetic_000007.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    other = write_synthetic(tmp_path / "other", NUM_IMAGES, seed=4, num_workers=1)
    assert (other / SYNTHETIC_JSON).read_bytes() != (out / SYNTHETIC_JSON).read_bytes()


def test_cli(tmp_path, capsys):
    assert (
        cli.main(
            [
                "synthetic",
                "--output-dir",
                str(tmp_path / "syn"),
                "--num-images",
                "12",
                "--seed",
                "1",
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    assert "wrote 12 images" in capsys.readouterr().out
    assert cli.main(["synthetic", "--output-dir", str(tmp_path / "big"), "--num-images", str(MAX_IMAGES + 1)]) == 2
    assert "--num-images must be between" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()
    with pytest.raises(GraceInputError, match="between 3 and"):
        write_synthetic(tmp_path / "tiny", 2)
