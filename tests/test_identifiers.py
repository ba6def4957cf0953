"""The six identifier kinds (rq in detail: test_rq.py), the registry and `IdentifierIndex`."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from grace_hf.data.karpathy import KarpathyCorpus, KarpathyImage, load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.data.synthetic import ORACLE_PSEUDO_QUERIES_JSON, SYNTHETIC_JSON
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IDENTIFIER_KINDS, IdentifierIndex, build_identifiers
from grace_hf.identifiers.semantic import normalize
from grace_hf.identifiers.structured import hierarchical_kmeans, path_to_identifier

STRUCTURED = re.compile(r"^0_\d+(-\d+_\d+)*$")


@pytest.fixture(scope="module")
def synthetic(synthetic):
    out = synthetic(40)
    corpus = load_karpathy(out / SYNTHETIC_JSON, out, check_images=False)
    return out, corpus, load_pseudo_queries(out / ORACLE_PSEUDO_QUERIES_JSON, corpus)


def _toy_corpus(splits, captions=None):
    captions = captions or [[f"caption {i}"] for i in range(len(splits))]
    images = [
        KarpathyImage(key=f"{i}.jpg", path=Path(f"{i}.jpg"), split=s, captions=c, imgid=i)
        for i, (s, c) in enumerate(zip(splits, captions))
    ]
    return KarpathyCorpus(json_path=Path("toy.json"), image_root=Path("."), images=images)


def test_numbered_kinds_follow_file_order_and_skip_restval():
    corpus = _toy_corpus(["train"] * 11 + ["restval", "test", "val"])
    numeric = build_identifiers("numeric", corpus)
    string = build_identifiers("string", corpus)
    atomic = build_identifiers("atomic", corpus)
    assert "11.jpg" not in numeric.images  # restval is not memorized
    assert numeric.images["0.jpg"] == ["0"] and numeric.images["10.jpg"] == ["1 0"]
    assert numeric.images["12.jpg"] == ["1 1"] and numeric.images["13.jpg"] == ["1 2"]
    assert string.images["10.jpg"] == ["10"] and string.images["13.jpg"] == ["12"]
    assert atomic.images["13.jpg"] == ["<img_12>"]
    assert atomic.new_tokens == [f"<img_{n}>" for n in range(13)] and numeric.new_tokens == string.new_tokens == []
    assert numeric.collection == ["12.jpg"]
    assert list(numeric.images) == [image.key for image in corpus.memorized()]


def test_semantic_captions_and_pseudo_queries(synthetic):
    _, corpus, queries = synthetic
    index = build_identifiers("semantic", corpus, pseudo_queries=queries)
    for image in corpus.memorized():
        texts = image.captions if image.split == "train" else queries[image.key]
        assert set(index.images[image.key]) <= {normalize(t) for t in texts}
        assert index.images[image.key]
    test = corpus.split("test")[0]
    assert index.images[test.key] == [normalize(q) for q in queries[test.key]]
    assert len(index.identifier_to_image()) == sum(len(ids) for ids in index.images.values())


def test_semantic_collisions():
    corpus = _toy_corpus(
        ["train", "train", "test"],
        [["A  dog runs.", "a dog runs."], ["A dog runs.", "A cat sits."], ["x"]],
    )
    index = build_identifiers("semantic", corpus, pseudo_queries={"2.jpg": ["A cat sits.", "a red cat"]})
    assert index.images == {"0.jpg": ["a dog runs."], "1.jpg": ["a cat sits."], "2.jpg": ["a red cat"]}
    assert index.report["collisions_dropped"] == 2
    assert index.report["collision_examples"][1] == {
        "identifier": "a cat sits.",
        "kept_by": "1.jpg",
        "dropped_from": "2.jpg",
    }
    clash = _toy_corpus(["train", "train"], [["a dog."], ["A dog."]])
    with pytest.raises(GraceInputError, match=r"every text of image '1.jpg' also names an earlier image"):
        build_identifiers("semantic", clash)
    with pytest.raises(GraceInputError, match=r"test image '2.jpg' has no pseudo-queries"):
        build_identifiers("semantic", corpus)


def test_hierarchical_kmeans_tree():
    rng = np.random.default_rng(0)
    centers = np.eye(4)[:3] * 10
    features = np.concatenate([c + rng.normal(size=(20, 4)) for c in centers])  # three blobs of 20
    paths = hierarchical_kmeans(features, k=3, leaf_size=8, seed=0)
    top = [p[0] for p in paths]
    assert [len(set(top[i : i + 20])) for i in (0, 20, 40)] == [1, 1, 1] and len(set(top)) == 3
    identifiers = [path_to_identifier(p) for p in paths]
    assert len(set(identifiers)) == 60 and all(STRUCTURED.match(i) for i in identifiers)
    assert max(len(p) for p in paths) >= 3  # 20 > leaf size 8: a second level of clusters, then positions
    assert hierarchical_kmeans(features, k=3, leaf_size=8, seed=0) == paths
    same = hierarchical_kmeans(np.ones((50, 4)), k=3, leaf_size=8)  # identical points still end
    assert len({path_to_identifier(p) for p in same}) == 50
    assert hierarchical_kmeans(features[:5], k=3, leaf_size=8) == [[0], [1], [2], [3], [4]]


def _features_file(path, keys, dim=8, seed=0):
    features = np.random.default_rng(seed).normal(size=(len(keys), dim)).astype(np.float32)
    save_file({"features": features}, str(path), metadata={"image_keys": json.dumps(keys)})
    return path


def test_structured_from_features_file(synthetic, tmp_path):
    _, corpus, _ = synthetic
    keys = [image.key for image in corpus.images][::-1]  # any order, extra keys allowed
    path = _features_file(tmp_path / "f.safetensors", keys + ["extra.png"])
    index = build_identifiers("structured", corpus, image_features=path, k=3, leaf_size=4, seed=1)
    ids = [i for ids in index.images.values() for i in ids]
    assert len(set(ids)) == len(corpus.memorized()) and all(STRUCTURED.match(i) for i in ids)
    pieces = {piece for i in ids for piece in i.split("-")}
    assert set(index.new_tokens) == pieces
    assert index.new_tokens == sorted(index.new_tokens, key=lambda t: tuple(map(int, t.split("_"))))
    again = build_identifiers("structured", corpus, image_features=path, k=3, leaf_size=4, seed=1)
    assert again.images == index.images and again.new_tokens == index.new_tokens
    _features_file(tmp_path / "short.safetensors", keys[1:])
    with pytest.raises(GraceInputError, match=r"short.safetensors: no features for image"):
        build_identifiers("structured", corpus, image_features=tmp_path / "short.safetensors")
    save_file({"x": np.zeros((2, 2), np.float32)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(GraceInputError, match=r"bad.safetensors: no tensor 'features'"):
        build_identifiers("structured", corpus, image_features=tmp_path / "bad.safetensors")


def test_structured_from_open_clip(synthetic, tmp_path):
    """A tiny random open_clip model saved to a local weights file, as a user's CLIP would be."""
    import open_clip
    import torch
    from safetensors.torch import save_file as save_torch

    _, corpus, _ = synthetic
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    config_path = tmp_path / "grace-tiny-clip.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model("grace-tiny-clip")
    save_torch({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    options = {"clip_model": str(config_path), "clip_pretrained": str(tmp_path / "tiny.safetensors")}
    index = build_identifiers("structured", corpus, k=3, leaf_size=6, batch_size=16, **options)
    assert len(index.identifier_to_image()) == len(corpus.memorized())
    assert max(len(i.split("-")) for ids in index.images.values() for i in ids) >= 2
    wrapped = tmp_path / "open_clip_config.json"  # open_clip's own format, as the dense baseline saves it
    wrapped.write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    options["clip_model"] = str(wrapped)
    again = build_identifiers("structured", corpus, k=3, leaf_size=6, num_workers=2, **options)
    assert len(again.identifier_to_image()) == len(corpus.memorized())
    with pytest.raises(GraceInputError, match="CLIP weights file not found"):
        build_identifiers("structured", corpus, clip_model="grace-tiny-clip", clip_pretrained=str(tmp_path / "no"))


def test_structured_pixel_features_carry_content(tmp_path):
    """Images that differ only in background colour split by colour at the first level."""
    (tmp_path / "im").mkdir()
    images = []
    for i in range(24):
        color = (250, 10, 10) if i % 2 else (10, 10, 250)
        Image.new("RGB", (20, 20), color).save(tmp_path / "im" / f"{i}.png")
        images.append(KarpathyImage(f"im/{i}.png", tmp_path / "im" / f"{i}.png", "test", ["x"], i))
    corpus = KarpathyCorpus(tmp_path / "toy.json", tmp_path, images)
    index = build_identifiers("structured", corpus, pixel_features=True, k=2, leaf_size=12)
    top = [index.images[image.key][0].split("-")[0] for image in images]
    assert len(set(top[0::2])) == 1 and len(set(top[1::2])) == 1 and top[0] != top[1]
    with pytest.raises(GraceInputError, match="exactly one embedding source"):
        build_identifiers("structured", corpus)


def test_unknown_kind():
    with pytest.raises(GraceInputError, match="unknown identifier kind 'semantics'.*numeric, string, semantic"):
        build_identifiers("semantics", _toy_corpus(["train"]))
    assert IDENTIFIER_KINDS == ("numeric", "string", "semantic", "structured", "atomic", "rq")


def test_index_save_load_restrict(tmp_path):
    index = build_identifiers("atomic", _toy_corpus(["train", "test", "test"]))
    path = index.save(tmp_path)
    assert path == tmp_path / "identifiers.json"
    assert json.loads(path.read_text()) == {
        "kind": "atomic",
        "images": {"0.jpg": ["<img_0>"], "1.jpg": ["<img_1>"], "2.jpg": ["<img_2>"]},
        "new_tokens": ["<img_0>", "<img_1>", "<img_2>"],
        "collection": ["1.jpg", "2.jpg"],
    }
    loaded = IdentifierIndex.load(tmp_path)
    assert loaded == index and loaded.identifier_to_image()["<img_1>"] == "1.jpg"
    loaded.save(tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == path.read_bytes()
    small = index.restrict(["2.jpg", "0.jpg"])
    assert list(small.images) == ["0.jpg", "2.jpg"] and small.collection == ["2.jpg"]
    assert small.new_tokens == index.new_tokens
    with pytest.raises(GraceInputError, match="unknown image key 'z.jpg'"):
        index.restrict(["z.jpg"])


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"kind": "string"}', "expected an object with 'kind' and 'images'"),
        ('{"kind": "string", "images": {"a": ["1"], "b": ["1"]}}', "identifier '1' names two images: 'a' and 'b'"),
        ('{"kind": "string", "images": {"a": []}}', "image 'a' has no identifier"),
        ('{"kind": "string", "images": {"a": ["1"]}, "collection": ["b"]}', "collection image 'b'"),
    ],
)
def test_index_load_errors(tmp_path, content, message):
    path = tmp_path / "identifiers.json"
    path.write_text(content)
    with pytest.raises(GraceInputError, match=message) as info:
        IdentifierIndex.load(path)
    assert str(path) in str(info.value)
