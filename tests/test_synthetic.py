"""The built-in synthetic data: layout, distinct content, captions, determinism, CLI."""

import hashlib
import json
import signal
from multiprocessing import active_children, get_context

import numpy as np
import pytest
from PIL import Image

from grace_hf.commands import cli
from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.data.synthetic import (
    COLORS,
    EXTENDED_TEMPLATES,
    MAX_IMAGES,
    ORACLE_PSEUDO_QUERIES_JSON,
    SHAPES,
    SYNTHETIC_JSON,
    SyntheticStyle,
    _reset_sigterm,
    write_synthetic,
)
from grace_hf.errors import GraceInputError

NUM_IMAGES = 40


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = write_synthetic(
        tmp_path_factory.mktemp("syn") / "data", NUM_IMAGES, seed=3, num_workers=1, oracle_pseudo_queries=True
    )
    with open(out / SYNTHETIC_JSON) as f:
        data = json.load(f)
    with open(out / ORACLE_PSEUDO_QUERIES_JSON) as f:
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
    again = write_synthetic(tmp_path / "again", NUM_IMAGES, seed=3, num_workers=2, oracle_pseudo_queries=True)
    for name in (SYNTHETIC_JSON, ORACLE_PSEUDO_QUERIES_JSON, "images/synthetic_000007.png"):
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


STYLE = SyntheticStyle(
    image_sizes=(48, 96),
    formats=("png", "jpeg"),
    modes=("RGB", "L", "RGBA"),
    subfolders=3,
    val_fraction=0.2,
    test_fraction=0.15,
    caption_style="extended",
)


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    return write_synthetic(
        tmp_path_factory.mktemp("styled") / "data", 60, seed=3, num_workers=1, style=STYLE, oracle_pseudo_queries=True
    )


def test_style_files_folders_and_splits(styled, synthetic):
    data = json.loads((styled / SYNTHETIC_JSON).read_text())
    seen = set()
    for i, image in enumerate(data["images"]):
        assert image["filepath"] == f"images/part_{i % 3}"
        with Image.open(styled / image["filepath"] / image["filename"]) as im:
            assert im.size[0] == im.size[1] and im.size[0] in (48, 96)
            assert image["filename"].endswith({"PNG": ".png", "JPEG": ".jpg"}[im.format])
            assert im.format == "PNG" or im.mode != "RGBA"  # RGBA images are PNG
            seen.add((im.format, im.mode, im.size[0]))
    assert {f for f, _, _ in seen} == {"PNG", "JPEG"} and {m for _, m, _ in seen} == {"RGB", "L", "RGBA"}
    assert {s for _, _, s in seen} == {48, 96}
    splits = [image["split"] for image in data["images"]]
    assert (splits.count("val"), splits.count("test"), splits.count("train")) == (12, 9, 39)
    corpus = load_karpathy(styled / SYNTHETIC_JSON, styled)  # keys resolve under the sub-folders
    assert len(load_pseudo_queries(styled / ORACLE_PSEUDO_QUERIES_JSON, corpus)) == 21


def test_extended_captions_draw_the_extra_templates(styled):
    data = json.loads((styled / SYNTHETIC_JSON).read_text())
    openings = tuple(template.split("{")[0] for template in EXTENDED_TEMPLATES if not template.startswith("{"))
    captions = [s["raw"] for image in data["images"] for s in image["sentences"]]
    assert any(caption.startswith(openings) for caption in captions)
    assert all(len({s["raw"] for s in image["sentences"]}) == 5 for image in data["images"])


def test_style_is_deterministic_and_default_style_is_the_demo_data(tmp_path, styled, synthetic):
    again = write_synthetic(tmp_path / "again", 60, seed=3, num_workers=2, style=STYLE, oracle_pseudo_queries=True)
    for path in sorted(p for p in styled.rglob("*") if p.is_file()):
        assert (again / path.relative_to(styled)).read_bytes() == path.read_bytes()
    out, _, _ = synthetic
    default = write_synthetic(
        tmp_path / "default", NUM_IMAGES, seed=3, num_workers=1, style=SyntheticStyle(), oracle_pseudo_queries=True
    )
    for name in (SYNTHETIC_JSON, ORACLE_PSEUDO_QUERIES_JSON, "images/synthetic_000007.png"):
        assert (default / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_sizes": (8,)}, "--image-sizes: need sizes of at least 16"),
        ({"formats": ("gif",)}, "--formats: expected some of png, jpeg"),
        ({"modes": ("CMYK",)}, "--modes: expected some of RGB, L, RGBA"),
        ({"subfolders": -1}, "--subfolders must be >= 0"),
        ({"val_fraction": 0.0}, "--val-fraction must be between 0 and 0.5"),
        ({"test_fraction": 0.7}, "--test-fraction must be between 0 and 0.5"),
        ({"caption_style": "poetic"}, "--caption-style: expected one of default, extended"),
    ],
)
def test_bad_style(options, message):
    with pytest.raises(GraceInputError, match=message):
        SyntheticStyle(**options)


def test_fractions_that_leave_no_train_image(tmp_path):
    with pytest.raises(GraceInputError, match="leave no train image of 4"):
        write_synthetic(tmp_path / "out", 4, style=SyntheticStyle(val_fraction=0.4, test_fraction=0.4))
    assert not (tmp_path / "out").exists()


def test_cli_style_flags(tmp_path, capsys):
    argv = ["synthetic", "--output-dir", str(tmp_path / "syn"), "--num-images", "20", "--num-workers", "1"]
    style = ["--image-sizes", "32", "--formats", "jpeg", "--modes", "L", "--subfolders", "2"]
    assert cli.main([*argv, *style, "--val-fraction", "0.25", "--caption-style", "extended"]) == 0
    assert "wrote 20 images (train 13, val 5, test 2)" in capsys.readouterr().out
    with Image.open(tmp_path / "syn" / "images" / "part_1" / "synthetic_000001.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "L", (32, 32))
    assert cli.main([*argv[:2], str(tmp_path / "bad"), "--formats", "gif"]) == 2
    assert "--formats: expected some of png, jpeg" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_no_pseudo_queries_unless_the_oracle_is_asked_for(tmp_path, synthetic):
    """Val/test images get no text from the generator by default: their pseudo-queries must come from pixels."""
    out = write_synthetic(tmp_path / "plain", NUM_IMAGES, seed=3, num_workers=1)
    assert not (out / ORACLE_PSEUDO_QUERIES_JSON).exists()
    assert not list(out.glob("*pseudo*"))
    assert (out / SYNTHETIC_JSON).read_bytes() == (synthetic[0] / SYNTHETIC_JSON).read_bytes()


def test_gray_images_are_captioned_without_colours(tmp_path):
    """A gray image's captions say how light its shape and background look, never a colour it does not show."""
    out = write_synthetic(tmp_path / "gray", 30, seed=5, num_workers=1, style=SyntheticStyle(modes=("L",)))
    data = json.loads((out / SYNTHETIC_JSON).read_text())
    colour_words = set(COLORS) | {"navy", "beige", "lavender"}
    for image in data["images"]:
        assert Image.open(out / image["filepath"] / image["filename"]).mode == "L"
        words = {token for sentence in image["sentences"] for token in sentence["tokens"]}
        assert not words & colour_words, image["filename"]
        assert words & {"dim", "light", "pale", "dark"}, image["filename"]


def test_drawing_pool_under_the_cli_sigterm_handler(tmp_path):
    """Commands turn SIGTERM into KeyboardInterrupt; the drawing pool's forked workers must not inherit that (a worker
    that survives its pool's SIGTERM left `make demo` waiting forever): they end on SIGTERM and leave on their own."""
    with cli._sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        with get_context("fork").Pool(1, initializer=_reset_sigterm) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) is signal.SIG_DFL
        write_synthetic(tmp_path / "data", 20, seed=3, num_workers=2)
        assert active_children() == []  # joined, none left behind
