"""More of a hostile new user: the demo on a collection it cannot evaluate, a checkpoint that is no checkpoint, new
images added without any text, and odd arguments to the Python API and the pipeline. Each CLI refusal is one line,
exit status 2, and nothing is lost; each API misuse is a `GraceInputError` that names it."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import pipeline

from grace_hf.data.karpathy import KarpathyImage
from grace_hf.dense.directory import save_image_features
from grace_hf.errors import GraceInputError
from grace_hf.identifiers.embeddings import EmbeddingOptions, embed, recorded_options
from grace_hf.retrieval import GraceRetriever
from grace_hf.serving.pipeline import TASK
from tests.test_hostile_input import ADD, PREPARE, PREPARE_NUMERIC, _corrupt, _recipe, _run, _tree, assets, work  # noqa: F401  (fixtures)


def _collection(root: Path, name: str, keep) -> str:
    """The synthetic Karpathy JSON with each image entry passed through `keep` (None drops it)."""
    data = json.loads((root / "data" / "dataset_synthetic.json").read_text())
    data["images"] = [entry for entry in map(keep, data["images"]) if entry is not None]
    (root / "data" / name).write_text(json.dumps(data))
    return f"data/{name}"


def _without_val_captions(entry: dict) -> dict:
    return {**entry, "sentences": []} if entry["split"] == "val" else entry


def _first_train_only():
    kept = []

    def keep(entry: dict) -> dict | None:
        if entry["split"] == "train":
            kept.append(entry)
            return entry if len(kept) == 1 else None
        return entry

    return keep


def _demo(json_name: str) -> list[str]:
    return ["demo", "--karpathy-json", json_name, "--image-root", "data", "--output-dir", "d", "--max-steps", "1"]


CASES = [
    (
        "demo-no-val-captions",  # used to fail only after training every stage, naming the deleted build directory
        lambda w: _demo(_collection(w, "noval.json", _without_val_captions)),
        r"data/noval.json: no val images with captions: the demo needs their captions to fit the re-ranking weight",
    ),
    (
        "demo-one-train-image",
        lambda w: _demo(_collection(w, "onetrain.json", _first_train_only())),
        r"data/onetrain.json: 1 train images with captions; the dense baseline and the captioner learn from them",
    ),
    (
        "baseline-clip-one-train-image",  # used to say "1 training images with texts" without naming the file
        lambda w: [
            "baseline-clip",
            "--karpathy-json",
            _collection(w, "onetrain.json", _first_train_only()),
            *PREPARE[3:5],
            "--output-dir",
            "b",
        ],
        r"data/onetrain.json: 1 images with texts to learn from \(train captions, or pseudo-queries\); the contrastive",
    ),
    (
        "pseudo-queries-unknown-split",  # used to say "no images in split(s) ['foo']"
        lambda w: ["pseudo-queries", "--model", "runs/m", *PREPARE[1:5], "--output-dir", "pq", "--splits", "foo"],
        r"argument --splits: invalid choice: 'foo' \(choose from 'train', 'val', 'test', 'restval'\)",
    ),
    (
        "convert-checkpoint-not-a-pickle",  # torch's own text ran many lines and suggested weights_only=False
        lambda w: [
            "convert-openflamingo",
            "--preset",
            "tiny",
            "--openflamingo-checkpoint",
            _corrupt(w, "checkpoint.pt"),
            "--mpt-weights",
            _corrupt(w, "mpt.pt"),
            "--clip-weights",
            _corrupt(w, "clip.pt"),
            "--output-dir",
            "converted",
        ],
        r"checkpoint.pt: not a PyTorch checkpoint of tensors \(\w+; read with torch.load\(weights_only=True\)",
    ),
]


@pytest.mark.parametrize("build_argv, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_exits_2_in_one_line_and_loses_nothing(build_argv, message, work, capsys):  # noqa: F811
    argv = build_argv(work)
    before = _tree(work.parent)
    code, err = _run(argv, capsys)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"grace-hf {argv[0]}: error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), err[-2000:]
    assert err.rstrip().endswith(errors[0])  # nothing after the one line
    assert _tree(work.parent) == before


def test_prepare_and_add_images_warn_of_images_that_no_query_teaches(work, capsys):  # noqa: F811
    code, err = _run([*PREPARE_NUMERIC, "--output-dir", "unqueried"], capsys)  # val/test images without pseudo-queries
    assert code == 0, err[-2000:]
    assert re.search(
        r"warning: data/dataset_synthetic.json: \d+ memorized images have no query \(val/test images need "
        r"--pseudo-queries\); they are memorized \(i2id\) but never learned from a query",
        err,
    ), err
    images = work / "data" / "images"
    entries = []
    for name, split, captions in (("new_train.png", "train", ["a new red square"]), ("new_val.png", "val", [])):
        shutil.copy(images / "synthetic_000000.png", images / name)
        entries.append(
            {"filepath": "images", "filename": name, "split": split, "sentences": [{"raw": c} for c in captions]}
        )
    (work / "new.json").write_text(json.dumps({"images": entries}))
    assert _run(["train", "--config", _recipe(work)], capsys)[0] == 0  # a model trained on `prepared`
    code, err = _run([*ADD[:2], "new.json", *ADD[3:], "--model", "runs/new", "--output-dir", "added"], capsys)
    assert code == 0, err[-2000:]
    assert (
        "warning: new.json: 1 new images have no query (val/test images need --pseudo-queries or --captioner)" in err
    )


def test_a_features_file_recorded_in_an_unfinished_output_is_found_after_it_completes(tmp_path):
    # the demo prepares from `.OUT.grace-partial/dense-clip/`, renamed to `OUT/dense-clip/` when complete: add-images
    # on its model read the codebooks' record and failed with "image features file not found"; a run still building
    # (a benchmark adding images inside its work directory) reads the file where it was recorded
    images = [KarpathyImage(key, tmp_path / key, "train", [], n) for n, key in enumerate(["a.png", "b.png"])]
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    built = tmp_path / ".demo_output.grace-partial" / "dense-clip" / "image_features.safetensors"
    recorded = recorded_options(EmbeddingOptions(image_features=str(built)))
    assert recorded["image_features"] == str(built)
    built.parent.mkdir(parents=True)
    save_image_features(built, features, ["a.png", "b.png"])
    assert embed(EmbeddingOptions(**recorded), images).features.tolist() == features.tolist()  # still building
    (tmp_path / ".demo_output.grace-partial").rename(tmp_path / "demo_output")
    assert embed(EmbeddingOptions(**recorded), images[::-1]).features.tolist() == features.flip(0).tolist()
    with pytest.raises(GraceInputError, match="image features file not found"):
        embed(EmbeddingOptions(image_features=str(tmp_path / "elsewhere.safetensors")), images)


@pytest.fixture(scope="module")
def retriever(tiny_model):
    return GraceRetriever.from_pretrained(tiny_model(), device="cpu")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r: r.retrieve(["a red square"], top_k=1.5), "top_k must be an integer, got float 1.5"),
        (lambda r: r.retrieve(["a red square"], top_k="3"), "top_k must be an integer, got str '3'"),
        (lambda r: r.retrieve(["a red square"], top_k=None), "top_k must be an integer, got NoneType None"),
        (lambda r: r.retrieve(b"a red square"), "queries: expected a string or a list of strings, got bytes"),
        (lambda r: r.retrieve(5), "queries: expected a string or a list of strings, got int"),
        (lambda r: r.retrieve(images=[Image.new("RGB", (0, 0))]), r"images\[0\]: an empty image \(0x0 pixels\)"),
        (lambda r: r.retrieve(images=Image.new("RGB", (5, 0))), r"images\[0\]: an empty image \(5x0 pixels\)"),
    ],
    ids=["top-k-float", "top-k-str", "top-k-none", "queries-bytes", "queries-int", "image-0x0", "image-5x0"],
)
def test_retrieve_names_a_programmer_error(retriever, call, message):
    with pytest.raises(GraceInputError, match=message):
        call(retriever)


def test_the_pipeline_takes_no_queries_and_refuses_an_image_root_that_is_no_folder(tiny_model, tmp_path):
    retrieve = pipeline(TASK, model=str(tiny_model()), device="cpu")
    assert retrieve([]) == []  # was an IndexError inside transformers
    (tmp_path / "notes.txt").write_text("not a folder")
    for root in (tmp_path / "nodir", tmp_path / "notes.txt"):  # was every result's "image": None, silently
        with pytest.raises(GraceInputError, match=f"image_root {re.escape(str(root))}: not a directory"):
            retrieve("a red square", image_root=str(root))
        with pytest.raises(GraceInputError, match="not a directory"):
            pipeline(TASK, model=str(tiny_model()), device="cpu", image_root=str(root))
