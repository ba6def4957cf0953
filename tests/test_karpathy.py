"""Reading and validating Karpathy JSONs and pseudo-query files."""

import json

import pytest
from PIL import Image

from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries, write_pseudo_queries
from grace_hf.errors import GraceInputError


def _entry(name, split, captions=("a cat.", "a small cat."), filepath="imgs", imgid=0):
    entry = {"filename": name, "imgid": imgid, "split": split, "sentences": [{"raw": c} for c in captions]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


@pytest.fixture
def corpus_dir(tmp_path):
    """Four images (train, val, test, restval) and their JSON."""
    (tmp_path / "imgs").mkdir()
    entries = []
    for i, split in enumerate(("train", "val", "test", "restval")):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
        entries.append(_entry(f"{i}.png", split, imgid=i))
    return tmp_path, {"images": entries, "dataset": "toy"}


def _write(root, data):
    path = root / "dataset.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_load(corpus_dir):
    root, data = corpus_dir
    corpus = load_karpathy(_write(root, data), root, num_workers=2)
    assert [image.key for image in corpus.images] == ["imgs/0.png", "imgs/1.png", "imgs/2.png", "imgs/3.png"]
    assert corpus.images[2].path == root / "imgs" / "2.png"
    assert corpus.images[2].filename == "2.png" and corpus.images[2].imgid == 2
    assert corpus.images[0].captions == ["a cat.", "a small cat."]
    assert corpus.split_counts() == {"train": 1, "val": 1, "test": 1, "restval": 1}
    assert [image.split for image in corpus.memorized()] == ["train", "val", "test"]


def test_key_without_filepath(corpus_dir):
    root, data = corpus_dir
    data["images"] = [_entry("0.png", "test", filepath=None)]
    (root / "imgs" / "0.png").rename(root / "0.png")
    corpus = load_karpathy(_write(root, data), root)
    assert corpus.images[0].key == "0.png" and corpus.images[0].path == root / "0.png"


def _break(kind, root, data):
    """Apply one kind of damage; return the message the error must match."""
    images = data["images"]
    if kind == "malformed":
        return '{"images": [', "not valid JSON"
    if kind == "no-images":
        return {"annotations": []}, "expected an object with an 'images' list"
    if kind == "missing-key":
        del images[1]["filename"]
        return data, r"images\[1\]: missing key 'filename'"
    if kind == "missing-raw":
        images[2]["sentences"][1] = {"tokens": ["a"]}
        return data, r"images\[2\] \('2.png'\): sentences\[1\] has no 'raw'"
    if kind == "unknown-split":
        images[0]["split"] = "dev"
        return data, r"images\[0\] \('0.png'\): unknown split 'dev'"
    if kind == "empty-caption":
        images[1]["sentences"][1]["raw"] = "  "
        return data, r"images\[1\] \('1.png'\): empty caption in sentences\[1\]"
    if kind == "duplicate":
        images[3]["filename"] = "1.png"
        return data, r"images\[3\]: duplicate image key 'imgs/1.png' \(first at images\[1\]\)"
    if kind == "missing-file":
        (root / "imgs" / "2.png").unlink()
        return data, r"images\[2\] \('imgs/2.png'\): image file not found"
    if kind == "not-an-image":
        (root / "imgs" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        return data, r"images\[1\] \('imgs/1.png'\): image does not decode"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "malformed",
        "no-images",
        "missing-key",
        "missing-raw",
        "unknown-split",
        "empty-caption",
        "duplicate",
        "missing-file",
        "not-an-image",
    ],
)
def test_bad_input(kind, corpus_dir):
    root, data = corpus_dir
    data, message = _break(kind, root, data)
    path = _write(root, data)
    with pytest.raises(GraceInputError, match=message) as info:
        load_karpathy(path, root)
    assert str(path) in str(info.value)


def test_truncated_image_is_caught(corpus_dir):
    root, data = corpus_dir
    Image.new("RGB", (64, 64), "red").save(root / "imgs" / "3.png")
    (root / "imgs" / "3.png").write_bytes((root / "imgs" / "3.png").read_bytes()[:60])
    with pytest.raises(GraceInputError, match=r"'imgs/3.png'.*does not decode"):
        load_karpathy(_write(root, data), root)
    assert len(load_karpathy(_write(root, data), root, check_images=False).images) == 4


def test_pseudo_queries(corpus_dir):
    root, data = corpus_dir
    corpus = load_karpathy(_write(root, data), root)
    path = root / "pq.json"
    write_pseudo_queries(path, {"2.png": [" cat red ", "red cat"], "imgs/1.png": ["cat"]})
    assert load_pseudo_queries(path, corpus) == {"imgs/1.png": ["cat"], "imgs/2.png": ["cat red", "red cat"]}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"2.png": [', "not valid JSON"),
        ('["2.png"]', "expected an object"),
        ('{"9.png": ["a dog"]}', "pseudo-queries for unknown image '9.png'"),
        ('{"2.png": "a dog"}', "'2.png': expected a list of strings"),
        ('{"2.png": ["a dog", ""]}', "'2.png': empty query at position 1"),
        ('{"2.png": ["a"], "imgs/2.png": ["b"]}', "image 'imgs/2.png' is listed twice"),
    ],
)
def test_bad_pseudo_queries(corpus_dir, content, message):
    root, data = corpus_dir
    corpus = load_karpathy(_write(root, data), root, check_images=False)
    path = root / "pq.json"
    path.write_text(content)
    with pytest.raises(GraceInputError, match=message) as info:
        load_pseudo_queries(path, corpus)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "filepath, key",
    [
        ("imgs", "imgs/0.png"),
        ("./imgs", "imgs/0.png"),
        ("imgs/", "imgs/0.png"),
        ("imgs//", "imgs/0.png"),
        ("", "0.png"),
    ],
)
def test_keys_are_normalised(corpus_dir, filepath, key):
    root, data = corpus_dir
    if key == "0.png":
        (root / "imgs" / "0.png").rename(root / "0.png")
    data["images"] = [_entry("0.png", "test", filepath=filepath)]
    corpus = load_karpathy(_write(root, data), root)
    assert corpus.images[0].key == key and corpus.images[0].path == root / key


def test_one_file_named_twice_is_a_duplicate(corpus_dir):
    root, data = corpus_dir
    data["images"] = [_entry("0.png", "train", filepath="imgs"), _entry("0.png", "test", filepath="./imgs")]
    with pytest.raises(
        GraceInputError, match=r"images\[1\]: duplicate image key 'imgs/0.png' \(first at images\[0\]\)"
    ):
        load_karpathy(_write(root, data), root)


@pytest.mark.parametrize("filepath", ["..", "../imgs", "imgs/../..", "/etc"])
@pytest.mark.parametrize("check_images", [True, False])
def test_a_key_outside_the_image_root_is_refused(corpus_dir, filepath, check_images):
    root, data = corpus_dir
    (root.parent / "secret.txt").write_text("not an image")
    data["images"] = [_entry("secret.txt", "test", filepath=filepath)]
    with pytest.raises(GraceInputError, match=r"images\[0\] \('secret.txt'\): 'filepath' .* leaves the image root"):
        load_karpathy(_write(root, data), root, check_images=check_images)
