"""rq identifiers: default shape, unique identifiers, balanced codebooks, deterministic coding, codebooks round-trip,
new images coded without renaming anyone, bad options."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from grace_hf.commands import cli
from grace_hf.data.karpathy import KarpathyCorpus, KarpathyImage, load_karpathy
from grace_hf.data.synthetic import SYNTHETIC_JSON
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import Codebooks, IdentifierIndex, build_identifiers, extend_identifiers
from grace_hf.identifiers.rq import (
    ResidualQuantizer,
    RQOptions,
    _capacity_assign,
    default_shape,
    fit_quantizer,
    name_codes,
    parse_identifier,
)
from grace_hf.models.flamingo import FlamingoProcessor
from grace_hf.retrieval.collection import build_identifier_trie, identifier_token_ids

RQ = re.compile(r"^0_\d+-1_\d+-2_\d+(-3_\d+)?$")


def _clusters(n=300, d=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, d))
    return (centers[rng.integers(6, size=n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def _corpus(keys, splits=None):
    images = [
        KarpathyImage(key=key, path=Path(key), split=(splits or {}).get(key, "train"), captions=["c"], imgid=i)
        for i, key in enumerate(keys)
    ]
    return KarpathyCorpus(json_path=Path("toy.json"), image_root=Path("."), images=images)


def _features_file(path, keys, features):
    save_file({"features": np.asarray(features, np.float32)}, str(path), metadata={"image_keys": json.dumps(keys)})
    return str(path)


@pytest.fixture(scope="module")
def synthetic(synthetic):
    out = synthetic(60)
    return load_karpathy(out / SYNTHETIC_JSON, out, check_images=False)


def test_default_shape_grows_with_the_collection():
    assert [default_shape(n) for n in (10, 500, 2000, 2500, 10**9)] == [(3, 8), (3, 16), (3, 28), (3, 28), (3, 256)]


def test_names_are_unique_with_positions_only_in_shared_groups():
    codes = np.array([[1, 2], [1, 2], [1, 3], [0, 2], [1, 2]])
    assert name_codes(codes) == ["0_1-1_2-2_0", "0_1-1_2-2_1", "0_1-1_3", "0_0-1_2", "0_1-1_2-2_2"]
    # new rows continue the positions of existing groups; a bare existing identifier holds position 0
    taken = {(1, 2): [0, 1, 2], (1, 3): [None]}
    assert name_codes(np.array([[1, 2], [1, 3], [4, 4], [1, 3]]), taken) == [
        "0_1-1_2-2_3",
        "0_1-1_3-2_1",
        "0_4-1_4",
        "0_1-1_3-2_2",
    ]
    assert parse_identifier("0_1-1_3-2_2", 2) == ((1, 3), 2) and parse_identifier("0_1-1_3", 2) == ((1, 3), None)
    assert parse_identifier("0_1-2_3", 2) is None and parse_identifier("0_1", 2) is None


@pytest.mark.parametrize("balanced", [False, True])
def test_fit_is_deterministic_and_balanced_codes_respect_the_cap(balanced):
    features = _clusters()
    quantizer, codes = fit_quantizer(features, levels=3, codebook_size=8, seed=0, balanced=balanced)
    again, codes_again = fit_quantizer(features, levels=3, codebook_size=8, seed=0, balanced=balanced)
    assert np.array_equal(codes, codes_again) and np.array_equal(quantizer.centroids, again.centroids)
    assert quantizer.centroids.shape == (3, 8, 12) and quantizer.mean.shape == (12,) and codes.shape == (300, 3)
    counts = [np.bincount(codes[:, level], minlength=8) for level in range(3)]
    if balanced:  # each code of a level holds at most ceil(300 / 8) = 38 images, so every code is used
        assert all(count.max() <= 38 and count.min() > 0 for count in counts)
    else:  # 6 clusters in 8 codes: plain k-means fills some codes far beyond the cap; its codes are the nearest
        assert max(count.max() for count in counts) > 38
        assert np.array_equal(quantizer.encode(features), codes)


def test_quantization_error_falls_with_levels():
    features = _clusters()
    errors = []
    for levels in (1, 2, 3):
        quantizer, codes = fit_quantizer(features, levels, 8)
        approx = quantizer.mean + sum(quantizer.centroids[level][codes[:, level]] for level in range(levels))
        errors.append(float(((features - approx) ** 2).sum()))
    assert errors[0] > errors[1] > errors[2]


def test_fewer_images_than_codes():
    quantizer, codes = fit_quantizer(_clusters(n=5), levels=2, codebook_size=8)
    assert quantizer.centroids.shape == (2, 8, 12) and codes.max() < 5
    assert len(set(name_codes(codes))) == 5


def test_encode_is_the_nearest_centroid_per_level():
    quantizer, _ = fit_quantizer(_clusters(), levels=2, codebook_size=4)
    new = np.random.default_rng(5).normal(size=(3, 12)).astype(np.float32)
    codes = quantizer.encode(new)
    assert np.array_equal(codes, quantizer.encode(new.copy()))
    for row, vector in zip(codes, new):
        residual = vector - quantizer.mean
        for level, code in enumerate(row):
            assert code == np.argmin(np.linalg.norm(quantizer.centroids[level] - residual, axis=1))
            residual = residual - quantizer.centroids[level][code]


def test_build_from_pixels_unique_deterministic_with_codebooks(synthetic, tmp_path):
    index = build_identifiers("rq", synthetic, pixel_features=True)
    identifiers = [i for ids in index.images.values() for i in ids]
    assert len(identifiers) == len(set(identifiers)) == len(synthetic.memorized())
    assert all(RQ.match(identifier) for identifier in identifiers)
    assert set(index.new_tokens) == {piece for i in identifiers for piece in i.split("-")}
    assert index.new_tokens == sorted(index.new_tokens, key=lambda t: tuple(map(int, t.split("_"))))
    report = index.report
    assert (report["levels"], report["codebook_size"], report["balanced"]) == (3, 8, True)  # default_shape(60)
    assert report["codes_used_per_level"] == [8, 8, 8]  # balanced: every code is used
    assert report["images_with_disambiguation_code"] == sum(len(i.split("-")) == 4 for i in identifiers)
    again = build_identifiers("rq", synthetic, pixel_features=True)
    assert again.images == index.images and again.new_tokens == index.new_tokens

    path = index.codebooks.save(tmp_path)
    loaded = Codebooks.load(path)
    assert loaded.kind == "rq" and loaded.metadata == index.codebooks.metadata
    assert loaded.metadata["options"]["levels"] == 3 and loaded.metadata["options"]["codebook_size"] == 8
    assert set(loaded.tensors) == {"centroids", "mean", "pixel_mean"}
    assert all(np.array_equal(loaded.tensors[name], index.codebooks.tensors[name]) for name in loaded.tensors)
    quantizer = ResidualQuantizer.from_codebooks(loaded, "books")
    assert quantizer.centroids.shape[:2] == (3, 8)
    with pytest.raises(GraceInputError, match="books: not rq codebooks"):
        ResidualQuantizer.from_codebooks(Codebooks("rq", {"mean": np.zeros(3, np.float32)}), "books")


def test_pixel_side_sets_the_thumbnail_and_is_recorded_for_added_images(synthetic):
    index = build_identifiers("rq", synthetic, pixel_features=True, pixel_side=8)
    assert index.codebooks.tensors["pixel_mean"].shape == (1, 3 * 8 * 8)
    assert index.codebooks.tensors["centroids"].shape[-1] == 3 * 8 * 8
    assert index.codebooks.metadata["options"]["pixel_side"] == 8
    default = build_identifiers("rq", synthetic, pixel_features=True)
    assert default.codebooks.tensors["pixel_mean"].shape == (1, 3 * 16 * 16)
    assert default.images != index.images


def test_unbalanced_and_explicit_shape(synthetic):
    index = build_identifiers("rq", synthetic, pixel_features=True, levels=2, codebook_size=5, unbalanced=True)
    assert (index.report["levels"], index.report["codebook_size"], index.report["balanced"]) == (2, 5, False)
    assert all(re.match(r"^0_[0-4]-1_[0-4](-2_\d+)?$", i[0]) for i in index.images.values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pixel_features": True, "levels": 0}, "rq identifiers need --levels >= 1 and --codebook-size >= 2"),
        ({"pixel_features": True, "codebook_size": 1}, "rq identifiers need --levels >= 1 and --codebook-size >= 2"),
        ({}, "exactly one embedding source"),
        ({"pixel_features": True, "pixel_side": 0}, r"--pixel-side must be in \[1, 64\], got 0"),
        ({"pixel_features": True, "k": 3}, r"rq identifiers do not take --k \(they take: .*--codebook-size"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(GraceInputError, match=message):
        build_identifiers("rq", _corpus(["a.png", "b.png"], {"b.png": "test"}), **options)
    if "levels" in options or "codebook_size" in options:
        with pytest.raises(GraceInputError, match=message):
            RQOptions(**options)


def test_new_images_take_free_places_never_renaming(tmp_path):
    """Old images in groups and alone; new ones landing on both, on each other and on fresh codes."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(40, 6)).astype(np.float32) * 5
    old_keys = [f"old/{i}.png" for i in range(40)]
    duplicates = points[[0, 0, 0, 1, 2, 2]]  # new images with the same embeddings as old images 0, 1, 2
    new_keys = [f"new/{i}.png" for i in range(len(duplicates))]
    path = _features_file(tmp_path / "f.safetensors", old_keys + new_keys, np.concatenate([points, duplicates]))
    old = build_identifiers("rq", _corpus(old_keys), image_features=path, levels=1, codebook_size=8)
    new = extend_identifiers(old, _corpus(new_keys, {"new/5.png": "test"}), codebooks=old.codebooks)

    assert {key: new.images[key] for key in old.images} == old.images and list(new.images)[:40] == old_keys
    identifiers = [i for ids in new.images.values() for i in ids]
    assert len(identifiers) == len(set(identifiers)) == 46
    quantizer = ResidualQuantizer.from_codebooks(old.codebooks, "books")
    for key, twin in zip(new_keys, [0, 0, 0, 1, 2, 2]):
        codes, position = parse_identifier(new.images[key][0], 1)
        assert codes == tuple(quantizer.encode(points[twin : twin + 1])[0]) and position is not None
    shared = parse_identifier(new.images["new/0.png"][0], 1)[0]
    positions = sorted(p or 0 for codes, p in map(lambda i: parse_identifier(i, 1), identifiers) if codes == shared)
    assert positions == list(range(len(positions)))  # the group's positions stay dense: 0, 1, 2, ...
    assert set(old.new_tokens) <= set(new.new_tokens) and new.new_tokens[: len(old.new_tokens)] == old.new_tokens
    assert set(new.new_tokens) == {piece for i in identifiers for piece in i.split("-")}
    assert new.collection == ["new/5.png"]
    assert new.codebooks.metadata["options"] == old.codebooks.metadata["options"]
    # coding the same images again gives the same identifiers
    again = extend_identifiers(old, _corpus(new_keys, {"new/5.png": "test"}), codebooks=old.codebooks)
    assert again.images == new.images


def test_a_bare_identifier_and_its_longer_twin_are_both_retrievable(tmp_path):
    """An old image alone on its codes keeps `0_3`; a new one on the same codes gets `0_3-1_1`: the trie keeps both,
    because every identifier ends with the end token."""
    keys = ["a.png", "b.png", "c.png"]
    path = _features_file(tmp_path / "f.safetensors", [*keys, "d.png"], [[0, 0], [10, 0], [0, 10], [10, 0]])
    old = build_identifiers("rq", _corpus(keys), image_features=path, levels=1, codebook_size=3)
    new = extend_identifiers(old, _corpus(["d.png"]), codebooks=old.codebooks)
    bare = old.images["b.png"][0]
    assert "-" not in bare and new.images["d.png"] == [f"{bare}-1_1"]
    identifiers = [ids[0] for ids in new.images.values()]
    processor = FlamingoProcessor.from_texts([f"id {i}" for i in identifiers], image_size=32, vocab_size=300)
    processor.add_identifier_tokens(new.new_tokens)
    trie = build_identifier_trie(processor, identifiers)
    sequences = identifier_token_ids(processor, identifiers)
    assert sequences[3][: len(sequences[1]) - 1] == sequences[1][:-1]  # b's tokens begin d's, b's end token does not
    width = max(map(len, sequences))
    padded = torch.tensor([s + [processor.pad_token_id] * (width - len(s)) for s in sequences])
    assert trie.lookup(padded, processor.end_of_chunk_token_id).tolist() == [0, 1, 2, 3]


def test_extension_errors(tmp_path):
    keys = [f"{i}.png" for i in range(12)]
    path = _features_file(tmp_path / "f.safetensors", [*keys, "n.png"], _clusters(13, 4))
    old = build_identifiers("rq", _corpus(keys), image_features=path, levels=2, codebook_size=3)
    books = old.codebooks
    with pytest.raises(GraceInputError, match=r"--levels is fixed by the saved codebooks \(2\)"):
        extend_identifiers(old, _corpus(["n.png"]), codebooks=books, levels=3)
    with pytest.raises(GraceInputError, match="built on image-features embeddings; .* not with --pixel-features"):
        extend_identifiers(old, _corpus(["n.png"]), codebooks=books, image_features=None, pixel_features=True)
    with pytest.raises(GraceInputError, match="no identifier_codebooks.safetensors: rq identifiers"):
        extend_identifiers(old, _corpus(["n.png"]))
    foreign = IdentifierIndex("rq", {**old.images, "0.png": ["0_1-1_7"]})
    with pytest.raises(GraceInputError, match=r"identifier '0_1-1_7' of image '0.png' is not one of their codes"):
        extend_identifiers(foreign, _corpus(["n.png"]), codebooks=books)


def test_prepare_command_takes_rq_flags(synthetic, tmp_path, capsys):
    root = synthetic.image_root
    argv = ["prepare", "--karpathy-json", str(root / SYNTHETIC_JSON), "--image-root", str(root)]
    argv += ["--identifier-kind", "rq", "--pixel-features", "--levels", "2", "--codebook-size", "6", "--unbalanced"]
    assert cli.main([*argv, "--seed", "3", "--output-dir", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "prepare.json").read_text())["identifiers"]
    assert (report["levels"], report["codebook_size"], report["balanced"]) == (2, 6, False)
    options = Codebooks.load(tmp_path / "out" / "identifier_codebooks.safetensors").metadata["options"]
    assert (options["seed"], options["unbalanced"], options["pixel_features"]) == (3, True, True)
    index = IdentifierIndex.load(tmp_path / "out")
    assert index.kind == "rq" and all(re.match(r"^0_[0-5]-1_[0-5](-2_\d+)?$", i[0]) for i in index.images.values())


def test_capacity_assignment_is_taking_pairs_by_increasing_distance():
    distances = np.random.default_rng(2).random((50, 6))
    expected, room = np.full(50, -1), np.full(6, 9)  # ceil(50 / 6) = 9
    for flat in np.argsort(distances, axis=None, kind="stable"):
        point, code = divmod(int(flat), 6)
        if expected[point] < 0 and room[code] > 0:
            expected[point], room[code] = code, room[code] - 1
    labels = _capacity_assign(distances, 9)
    assert np.array_equal(labels, expected) and np.bincount(labels).max() == 9
