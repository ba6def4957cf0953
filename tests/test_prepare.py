"""`grace-hf prepare`: the five kinds end to end, self-contained output, determinism, bad input, Hub round trip."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import load_from_disk
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from PIL import Image
from safetensors.numpy import save_file

from grace_hf.commands import cli
from grace_hf.data.prepared import load_prepared
from grace_hf.data.synthetic import ORACLE_PSEUDO_QUERIES_JSON, SYNTHETIC_JSON
from grace_hf.identifiers import IDENTIFIER_KINDS, IdentifierIndex

NUM_IMAGES = 30


@pytest.fixture(scope="module")
def synthetic(synthetic):
    return synthetic(NUM_IMAGES)


def _prepare(syn: Path, out: Path, kind: str, *extra: str, json_name: str = SYNTHETIC_JSON) -> int:
    argv = ["prepare", "--karpathy-json", str(syn / json_name), "--image-root", str(syn)]
    argv += [
        "--identifier-kind",
        kind,
        "--output-dir",
        str(out),
        "--pseudo-queries",
        str(syn / ORACLE_PSEUDO_QUERIES_JSON),
    ]
    argv += ["--num-workers", "2", *extra]
    return cli.main(argv)


def _structured_flags(kind):
    return ("--pixel-features", "--k", "3", "--leaf-size", "5") if kind == "structured" else ()


@pytest.mark.parametrize("kind", [kind for kind in IDENTIFIER_KINDS if kind != "rq"])  # rq: test_rq.py
def test_prepare_each_kind(kind, synthetic, tmp_path):
    out = tmp_path / kind
    assert _prepare(synthetic, out, kind, *_structured_flags(kind)) == 0
    data = json.loads((synthetic / SYNTHETIC_JSON).read_text())["images"]
    pseudo = json.loads((synthetic / ORACLE_PSEUDO_QUERIES_JSON).read_text())
    index = IdentifierIndex.load(out)
    dataset = load_from_disk(str(out))
    assert set(dataset) == {"i2id", "t2id", "queries", "val_queries"}
    assert dataset["i2id"].column_names == ["image", "image_key", "identifier"]
    assert dataset["t2id"].column_names == ["query", "image_key", "identifier"]
    assert dataset["queries"].column_names == ["query", "image_key"]

    keys = [f"images/{image['filename']}" for image in data]
    assert index.kind == kind and list(index.images) == keys
    assert index.collection == [k for k, image in zip(keys, data) if image["split"] == "test"]
    i2id = dataset["i2id"].remove_columns("image")
    assert sorted(zip(i2id["image_key"], i2id["identifier"])) == sorted(
        (key, i) for key, ids in index.images.items() for i in ids
    )
    expected_t2id = []
    for key, image in zip(keys, data):
        queries = [s["raw"] for s in image["sentences"]] if image["split"] == "train" else pseudo[image["filename"]]
        expected_t2id += [(q, key) for q in queries]
    t2id = dataset["t2id"]
    assert list(zip(t2id["query"], t2id["image_key"])) == expected_t2id
    assert all(i in index.images[k] for k, i in zip(t2id["image_key"], t2id["identifier"]))
    test_captions = [
        (s["raw"], k) for k, image in zip(keys, data) if image["split"] == "test" for s in image["sentences"]
    ]
    assert list(zip(dataset["queries"]["query"], dataset["queries"]["image_key"])) == test_captions
    val_captions = [
        (s["raw"], k) for k, image in zip(keys, data) if image["split"] == "val" for s in image["sentences"]
    ]
    assert val_captions and dataset["val_queries"].column_names == ["query", "image_key"]
    assert list(zip(dataset["val_queries"]["query"], dataset["val_queries"]["image_key"])) == val_captions

    record = json.loads((out / "prepare.json").read_text())
    assert record["inputs"]["identifier_kind"] == kind
    assert record["counts"]["t2id_rows"] == len(expected_t2id) and record["counts"]["memorized_images"] == NUM_IMAGES
    if kind == "semantic":
        assert "collisions_dropped" in record["identifiers"]
    if kind in ("structured", "atomic"):
        assert index.new_tokens and record["counts"]["new_tokens"] == len(index.new_tokens)


def test_self_contained_and_deterministic(synthetic, tmp_path):
    source = tmp_path / "copy"
    shutil.copytree(synthetic, source)
    first, second = tmp_path / "first", tmp_path / "second"
    assert _prepare(source, first, "structured", *_structured_flags("structured")) == 0
    assert _prepare(source, second, "structured", *_structured_flags("structured")) == 0
    assert (first / "identifiers.json").read_bytes() == (second / "identifiers.json").read_bytes()
    assert (first / "prepare.json").read_bytes() == (second / "prepare.json").read_bytes()
    a, b = load_from_disk(str(first)), load_from_disk(str(second))
    for split in a:
        assert a[split].with_format("arrow")[:].equals(b[split].with_format("arrow")[:])
    row = load_from_disk(str(first))["i2id"][3]
    with Image.open(source / row["image_key"]) as original:
        pixels = np.asarray(original.convert("RGB"))
    shutil.rmtree(source / "images")
    image = load_from_disk(str(first))["i2id"][3]["image"]
    assert image.size == (64, 64) and np.array_equal(np.asarray(image.convert("RGB")), pixels)


def test_restval_not_memorized(synthetic, tmp_path):
    synthetic = shutil.copytree(synthetic, tmp_path / "syn")
    data = json.loads((synthetic / SYNTHETIC_JSON).read_text())
    train = [i for i, image in enumerate(data["images"]) if image["split"] == "train"]
    for i in train[:3]:
        data["images"][i]["split"] = "restval"
    (synthetic / "restval.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    assert _prepare(synthetic, out, "numeric", json_name="restval.json") == 0
    record = json.loads((out / "prepare.json").read_text())
    assert record["counts"]["restval_not_memorized"] == 3 and record["counts"]["memorized_images"] == NUM_IMAGES - 3
    restval_keys = {f"images/{data['images'][i]['filename']}" for i in train[:3]}
    assert not restval_keys & set(load_from_disk(str(out))["i2id"]["image_key"])
    memorized = [image for image in data["images"] if image["split"] != "restval"]
    assert IdentifierIndex.load(out).images["images/" + memorized[12]["filename"]] == ["1 2"]  # file order


def _damage(kind, root):
    """Return the extra CLI flags for one kind of bad input and the message the error names."""
    data = json.loads((root / SYNTHETIC_JSON).read_text())
    if kind == "malformed-json":
        (root / SYNTHETIC_JSON).write_text('{"images": [')
        return [], "not valid JSON"
    if kind == "missing-key":
        del data["images"][4]["split"]
        message = r"images\[4\] \('synthetic_000004.png'\): missing key 'split'"
    elif kind == "unknown-split":
        data["images"][2]["split"] = "holdout"
        message = "unknown split 'holdout'"
    elif kind == "empty-caption":
        data["images"][5]["sentences"][2]["raw"] = ""
        message = r"images\[5\] \('synthetic_000005.png'\): empty caption in sentences\[2\]"
    elif kind == "duplicate-key":
        data["images"][7]["filename"] = data["images"][6]["filename"]
        message = "duplicate image key 'images/synthetic_000006.png'"
    elif kind == "missing-image":
        (root / "images" / "synthetic_000008.png").unlink()
        return [], "'images/synthetic_000008.png'.*image file not found"
    elif kind == "broken-image":
        (root / "images" / "synthetic_000009.png").write_bytes(b"not a png")
        return [], "'images/synthetic_000009.png'.*does not decode"
    elif kind == "unknown-pseudo-query-image":
        queries = json.loads((root / ORACLE_PSEUDO_QUERIES_JSON).read_text())
        queries["ghost.png"] = ["a ghost"]
        (root / ORACLE_PSEUDO_QUERIES_JSON).write_text(json.dumps(queries))
        return [], "pseudo-queries for unknown image 'ghost.png'"
    elif kind == "unknown-kind":
        return ["--identifier-kind", "semantics"], "unknown identifier kind 'semantics'"
    elif kind == "structured-without-embeddings":
        return ["--identifier-kind", "structured"], "exactly one embedding source"
    (root / SYNTHETIC_JSON).write_text(json.dumps(data))
    return [], message


@pytest.mark.parametrize(
    "kind",
    [
        "malformed-json",
        "missing-key",
        "unknown-split",
        "empty-caption",
        "duplicate-key",
        "missing-image",
        "broken-image",
        "unknown-pseudo-query-image",
        "unknown-kind",
        "structured-without-embeddings",
    ],
)
def test_bad_input_exits_2_and_leaves_nothing(kind, synthetic, tmp_path, capsys):
    root = tmp_path / "syn"
    shutil.copytree(synthetic, root)
    extra, message = _damage(kind, root)
    out = tmp_path / "out" / "prepared"
    assert _prepare(root, out, "numeric", *extra) == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("grace-hf prepare: error: ") and re.search(message, last_line)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


class _LocalHub:
    """Stands in for the Hub: the HfApi network methods `push_to_hub` calls (datasets 5.2, huggingface_hub 1.x)
    write into a folder, and HfFileSystem, through which push_to_hub reads the card and lists old files,
    reads that folder. Every repo stays at one revision, `SHA`."""

    SHA = "0" * 40

    def __init__(self, root: Path):
        self.root = root
        self.uploaded: set[str] = set()

    def repo(self, repo_id: str) -> Path:
        return self.root / "datasets" / f"{repo_id}@{self.SHA}"  # where HfFileSystem paths point

    def patch(self, monkeypatch):
        hub = self

        def repo_info(api, repo_id, *args, **kwargs):
            hub.repo(repo_id).mkdir(parents=True, exist_ok=True)
            return SimpleNamespace(id=repo_id, sha=hub.SHA)

        def create_repo(api, repo_id, *args, **kwargs):
            hub.repo(repo_id).mkdir(parents=True, exist_ok=True)
            return SimpleNamespace(repo_id=repo_id)

        def preupload_lfs_files(api, repo_id, additions, *args, **kwargs):
            for op in additions:  # datasets deletes the shard file right after this call
                hub._write(repo_id, op)
                hub.uploaded.add(op.path_in_repo)

        def create_commit(api, repo_id, operations, *args, **kwargs):
            for op in operations:
                if isinstance(op, CommitOperationDelete):
                    (hub.repo(repo_id) / op.path_in_repo).unlink()
                elif isinstance(op, CommitOperationAdd) and op.path_in_repo not in hub.uploaded:
                    hub._write(repo_id, op)
            return SimpleNamespace(oid=hub.SHA, commit_url=f"local://{repo_id}")

        for name, method in [
            ("repo_info", repo_info),
            ("create_repo", create_repo),
            ("preupload_lfs_files", preupload_lfs_files),
            ("create_commit", create_commit),
        ]:
            monkeypatch.setattr(HfApi, name, method)
        self.root.mkdir(parents=True, exist_ok=True)
        for module in ("datasets.arrow_dataset", "datasets.dataset_dict"):
            monkeypatch.setattr(
                f"{module}.HfFileSystem", lambda *a, **k: DirFileSystem(path=str(self.root), fs=LocalFileSystem())
            )

    def _write(self, repo_id, op):
        target = self.repo(repo_id) / op.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        content = op.path_or_fileobj
        if isinstance(content, (str, Path)):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content if isinstance(content, bytes) else content.read())


def test_push_to_hub_round_trip(synthetic, tmp_path, monkeypatch):
    hub = _LocalHub(tmp_path / "hub")
    hub.patch(monkeypatch)
    out = tmp_path / "prepared"
    assert _prepare(synthetic, out, "atomic", "--push-to-hub", "someone/grace-synthetic") == 0
    repo = hub.repo("someone/grace-synthetic")
    assert (repo / "identifiers.json").read_bytes() == (out / "identifiers.json").read_bytes()
    assert (repo / "prepare.json").is_file() and (repo / "README.md").is_file()
    pushed = load_prepared(str(repo), cache_dir=str(tmp_path / "cache"))
    local = load_prepared(out)
    assert list(pushed) == list(local) == ["i2id", "t2id", "queries", "val_queries"]
    for split in local:
        assert pushed[split].features == local[split].features
        columns = [c for c in local[split].column_names if c != "image"]
        assert pushed[split].select_columns(columns)[:] == local[split].select_columns(columns)[:]
    assert pushed["i2id"][0]["image"].tobytes() == local["i2id"][0]["image"].tobytes()


def test_structured_from_features_file_via_cli(synthetic, tmp_path, capsys):
    keys = [f"images/{image['filename']}" for image in json.loads((synthetic / SYNTHETIC_JSON).read_text())["images"]]
    features = np.random.default_rng(0).normal(size=(len(keys), 6)).astype(np.float32)
    save_file({"features": features}, str(tmp_path / "f.safetensors"), metadata={"image_keys": json.dumps(keys)})
    flags = ["--image-features", str(tmp_path / "f.safetensors"), "--k", "3", "--leaf-size", "5", "--seed", "2"]
    assert _prepare(synthetic, tmp_path / "out", "structured", *flags) == 0
    record = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert record["inputs"]["identifier_options"]["image_features"] == str(tmp_path / "f.safetensors")
    assert record["identifiers"]["embedding_dim"] == 6 and record["identifiers"]["levels"] >= 3
    assert _prepare(synthetic, tmp_path / "bad", "numeric", "--pixel-features") == 2
    assert "numeric identifiers do not take --pixel-features" in capsys.readouterr().err
