"""Every command, tried as a hostile new user would: each bad input ends in exit status 2 and a message that names
the item, with no traceback, and nothing is lost: the inputs, the working directory and the output's parent are the
same byte for byte afterwards."""

import json
import os
import re
import shutil
import socket
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from grace_hf.commands import cli
from grace_hf.commands import demo as demo_module
from grace_hf.commands import serve as serve_module
from grace_hf.dense.directory import FEATURES_FILE, save_image_features
from grace_hf.dense.model import DualEncoder
from grace_hf.errors import GraceInputError
from grace_hf.outputs import DEMO, MARKER_FILE, begin_output, output_directory, read_marker
from grace_hf.training import loop as train_module
from grace_hf.training.preparation import prepare
from tests.helpers import IMAGES, MICRO, QUERIES, reset_accelerate, write_prepared


@pytest.fixture(scope="module")
def assets(tmp_path_factory, synthetic, prepared, tiny_model):
    """Read-only originals: synthetic data, a prepared dataset, a tiny model and its evaluation data."""
    root = tmp_path_factory.mktemp("assets")
    shutil.copytree(synthetic(12), root / "data")
    shutil.copytree(prepared("structured", num_images=12, k=3, leaf_size=4), root / "prepared")
    shutil.copytree(tiny_model(), root / "model")
    shutil.copytree(tiny_model("semantic"), root / "model-semantic")
    queries = [f"{q} number {n}" for n, q in enumerate(QUERIES)]
    write_prepared(root / "eval-data", queries, IMAGES[4:7])
    torch.manual_seed(0)
    for name, keys in (("dense", IMAGES), ("dense-partial", IMAGES[:6])):  # an untrained baseline-clip layout
        (root / name).mkdir()
        DualEncoder.from_config(MICRO).save(root / name)
        save_image_features(
            root / name / FEATURES_FILE, torch.nn.functional.normalize(torch.randn(len(keys), 32)), keys
        )
    return root


@pytest.fixture
def work(assets, tmp_path, monkeypatch):
    """A working directory with copies of the assets and some files of the user's own."""
    work = tmp_path / "work"
    shutil.copytree(assets, work)
    (work / "notes.txt").write_text("the user's notes")
    (work / "thesis").mkdir()
    (work / "thesis" / "chapter1.tex").write_text("years of work")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".bashrc").write_text("export PATH")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    return work


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors (unknown or renamed flags)
        code = exit_.code
    finally:
        reset_accelerate()
    return code, capsys.readouterr().err


def _recipe(work: Path, **fields) -> str:
    recipe = {"model_preset": "tiny", "data": "prepared", "output_dir": "runs/new", "max_steps": 2}
    recipe.update({"report_to": "none", "save_steps": 0, "eval_num_queries": 0, "torch_num_threads": 1, **fields})
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return "recipe.yaml"


def _deep_json(work: Path) -> str:
    (work / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    return "deep.json"


def _escaping_json(work: Path) -> str:
    data = json.loads((work / "data" / "dataset_synthetic.json").read_text())
    data["images"][3]["filepath"] = "../../.."
    data["images"][3]["filename"] = "notes.txt"
    (work / "escaping.json").write_text(json.dumps(data))
    return "escaping.json"


def _broken_model(work: Path, damage: str) -> str:
    model = work / "model"
    if damage == "truncated":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "foreign-identifiers":
        index = json.loads((model / "identifiers.json").read_text())
        index["new_tokens"] = ["0_0", "0_1"]
        (model / "identifiers.json").write_text(json.dumps(index))
    elif damage == "fewer-identifiers":
        (model / "grace_config.json").write_text(json.dumps({"identifier_kind": "numeric", "num_identifiers": 12}))
        index = json.loads((model / "identifiers.json").read_text())
        index["images"].pop("images/000.png")
        (model / "identifiers.json").write_text(json.dumps(index))
    elif damage == "foreign-weights":  # every key renamed: nothing would load, all weights random
        weights = model / "model.safetensors"
        save_file({f"foreign.{key}": value for key, value in load_file(weights).items()}, weights)
    elif damage == "unfinished":
        (model / ".grace_hf_output.json").write_text(json.dumps({"kind": "model", "complete": False}))
    else:
        (model / damage).unlink()
    return "model"


def _new_images(work: Path, name: str, captions: list[str]) -> str:
    """A Karpathy JSON with one new train image `images/<name>` (a copy of a synthetic image) and its captions."""
    shutil.copy(work / "data" / "images" / "synthetic_000000.png", work / "data" / "images" / name)
    entry = {"filepath": "images", "filename": name, "split": "train", "sentences": [{"raw": c} for c in captions]}
    (work / f"{name}.json").write_text(json.dumps({"images": [entry]}))
    return f"{name}.json"


def _truncated_image(work: Path) -> str:
    """The first half of a synthetic image's PNG file."""
    data = (work / "data" / "images" / "synthetic_000000.png").read_bytes()
    (work / "truncated.png").write_bytes(data[: len(data) // 2])
    return "truncated.png"


def _broken_image(work: Path, index: int, damage: str) -> str:
    """The synthetic Karpathy JSON, its image `index` deleted ("missing") or overwritten by bytes that are no image
    ("garbage")."""
    image = work / "data" / "images" / f"synthetic_{index:06d}.png"
    if damage == "missing":
        image.unlink()
    else:
        image.write_bytes(bytes(range(256)) * 2)
    return "data/dataset_synthetic.json"


def _captioner_recipe(work: Path, karpathy_json: str) -> str:
    return _recipe(work, task="captioner", data=None, karpathy_json=karpathy_json, image_root="data")


def _with_rerank_json(work: Path, text: str) -> str:
    """The tiny model with this `rerank.json`."""
    (work / "model" / "rerank.json").write_text(text)
    return "model"


def _structured_without_codebooks(work: Path) -> str:
    """The tiny model relabelled as a structured retriever whose directory lacks the k-means tree."""
    index = json.loads((work / "model" / "identifiers.json").read_text())
    index.update(kind="structured", images={key: [f"0_{n}"] for n, key in enumerate(index["images"])})
    (work / "model" / "identifiers.json").write_text(json.dumps(index))
    (work / "model" / "grace_config.json").write_text(json.dumps({"identifier_kind": "structured"}))
    return "model"


def _marker_into_thesis(work: Path, how: str) -> str:
    """The user's `thesis/` with the marker of a genuine grace_hf output copied, linked or nested into it."""
    marker = work / "thesis" / MARKER_FILE
    if how == "copied":
        shutil.copy(work / "prepared" / MARKER_FILE, marker)
    elif how == "linked":
        os.symlink(work / "prepared" / MARKER_FILE, marker)
    else:
        marker.write_text("[" * 100_000 + "]" * 100_000)
    return "thesis"


def _with_user_file(work: Path, output: str) -> str:
    """A grace_hf output with a file of the user's added to it."""
    (work / output / "my-notes.txt").write_text("the user's notes on this output")
    return output


def _recipe_folder(work: Path) -> str:
    """`recipes/recipe.yaml` with other files of the user's beside it."""
    (work / "recipes").mkdir()
    (work / "recipes" / "other.yaml").write_text("seed: 1")
    _recipe(work)
    shutil.move(work / "recipe.yaml", work / "recipes" / "recipe.yaml")
    return "recipes/recipe.yaml"


def _linked_image_root(work: Path) -> str:
    """An image root that is a symbolic link to `data/` (its Karpathy JSON copied beside it)."""
    os.symlink(work / "data", work / "imglink")
    shutil.copy(work / "data" / "dataset_synthetic.json", work / "k.json")
    return "imglink"


def _leaking_image(work: Path) -> str:
    """A Karpathy JSON whose image is a symbolic link inside the image root to the user's notes outside it."""
    data = json.loads((work / "data" / "dataset_synthetic.json").read_text())
    os.symlink(work / "notes.txt", work / "data" / "images" / "leak.png")
    data["images"][2].update(filepath="images", filename="leak.png")
    (work / "leaking.json").write_text(json.dumps(data))
    return "leaking.json"


def _checkpoint(work: Path, damage: str) -> str:
    """A checkpoint directory that is truncated or was not written by grace_hf."""
    checkpoint = work / "ckpt"
    checkpoint.mkdir()
    if damage == "foreign":
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    else:
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 3, "scheduler": {}, "train_seconds": 1}))
        (checkpoint / "model.safetensors").write_bytes(b"\x00" * 100)
    return "ckpt"


def _micro_clip_config(work: Path) -> str:
    (work / "micro.json").write_text(json.dumps(MICRO))
    return "micro.json"


def _corrupt(work: Path, name: str) -> str:
    (work / name).write_bytes(b"not weights at all" * 10)
    return name


def _prepared_with_garbage_image(work: Path) -> str:
    """A dataset prepared with --skip-image-check from the synthetic set whose image 3 is no image."""
    prepare(_broken_image(work, 3, "garbage"), "data", "numeric", "prepared-bad", check_images=False)
    return "prepared-bad"


PREPARE = ["prepare", "--karpathy-json", "data/dataset_synthetic.json", "--image-root", "data"]
PREPARE_NUMERIC = [*PREPARE, "--identifier-kind", "numeric"]
PREPARE_RQ = [*PREPARE, "--identifier-kind", "rq", "--pixel-features"]
EVALUATE = ["evaluate", "--data", "eval-data"]
RERANK = [*EVALUATE, "--model", "model", "--output-dir", "e", "--rerank"]
ADD = ["add-images", "--karpathy-json", "data/dataset_synthetic.json", "--image-root", "data", "--max-steps", "1"]

GARBAGE_IMAGE_5 = (
    r"data/dataset_synthetic.json: images\[5\] \('images/synthetic_000005.png'\): image does not decode: "
    r"data/images/synthetic_000005.png: UnidentifiedImageError"
)
OTHER_DENSE = {"weight": 0.5, "num_beams": 5, "dense": "runs/old-dense", "dense_fingerprint": "0" * 64}

# (id, argv builder, message the error must contain as a regex)
RETRIEVE_IMAGE = ["retrieve", "--model", "model", "--image"]
CASES = [
    ("synthetic-cwd", lambda w: ["synthetic", "--output-dir", "."], "working directory"),
    ("synthetic-parent", lambda w: ["synthetic", "--output-dir", ".."], "working directory or one of its parents"),
    ("synthetic-home", lambda w: ["synthetic", "--output-dir", "~"], "is the home directory"),
    ("synthetic-file", lambda w: ["synthetic", "--output-dir", "notes.txt"], "notes.txt: is a file"),
    ("synthetic-user-dir", lambda w: ["synthetic", "--output-dir", "thesis"], "thesis: exists and is not a grace_hf"),
    ("synthetic-positional", lambda w: ["synthetic", "data2"], "required: --output-dir"),
    (
        "synthetic-bad-mode",
        lambda w: ["synthetic", "--output-dir", "data2", "--modes", "RGB", "CMYK"],
        "--modes: expected some of RGB, L, RGBA",
    ),
    (
        "synthetic-no-train-left",
        lambda w: [
            "synthetic",
            "--output-dir",
            "data2",
            "--num-images",
            "4",
            "--val-fraction",
            "0.4",
            "--test-fraction",
            "0.4",
        ],
        "leave no train image of 4",
    ),
    ("prepare-into-image-root", lambda w: [*PREPARE_NUMERIC, "--output-dir", "data"], "holds the input"),
    ("prepare-cwd", lambda w: [*PREPARE_NUMERIC, "--output-dir", "."], "working directory"),
    ("prepare-cwd-abs", lambda w: [*PREPARE_NUMERIC, "--output-dir", os.getcwd()], "working directory"),
    ("prepare-existing-file", lambda w: [*PREPARE_NUMERIC, "--output-dir", "notes.txt"], "is a file"),
    (
        "prepare-other-output",
        lambda w: [*PREPARE_NUMERIC, "--output-dir", "model"],
        "model: exists and is not a grace_hf output",
    ),
    (
        "prepare-json-is-directory",
        lambda w: [
            "prepare",
            "--karpathy-json",
            "data",
            "--image-root",
            "data",
            "--identifier-kind",
            "numeric",
            "--output-dir",
            "out",
        ],
        "data: is a directory, not a Karpathy JSON",
    ),
    (
        "prepare-deep-json",
        lambda w: [
            "prepare",
            "--karpathy-json",
            _deep_json(w),
            "--image-root",
            "data",
            "--identifier-kind",
            "numeric",
            "--output-dir",
            "out",
        ],
        "deep.json: not valid JSON",
    ),
    (
        "prepare-key-outside-root",
        lambda w: [
            "prepare",
            "--karpathy-json",
            _escaping_json(w),
            "--image-root",
            "data",
            "--identifier-kind",
            "numeric",
            "--output-dir",
            "out",
            "--skip-image-check",
        ],
        r"images\[3\] \('notes.txt'\): 'filepath' '../../..' leaves the image root",
    ),
    (
        "prepare-structured-garbage-image-unchecked",
        lambda w: [
            *PREPARE[:2],
            _broken_image(w, 5, "garbage"),
            *PREPARE[3:],
            "--identifier-kind",
            "structured",
            "--pixel-features",
            "--k",
            "3",
            "--leaf-size",
            "4",
            "--skip-image-check",
            "--output-dir",
            "out",
        ],
        GARBAGE_IMAGE_5,
    ),
    (
        "prepare-rq-garbage-image-unchecked",
        lambda w: [
            *PREPARE_RQ[:2],
            _broken_image(w, 5, "garbage"),
            *PREPARE_RQ[3:],
            "--skip-image-check",
            "--output-dir",
            "out",
        ],
        GARBAGE_IMAGE_5,
    ),
    (
        "prepare-unknown-kind",
        lambda w: [*PREPARE, "--identifier-kind", "nope", "--output-dir", "o"],
        "unknown identifier kind 'nope'",
    ),
    (
        "prepare-old-flag",
        lambda w: [*PREPARE, "--identifier", "numeric", "--output-dir", "o"],
        "--identifier was renamed: use --identifier-kind",
    ),
    (
        "prepare-option-of-another-kind",
        lambda w: [*PREPARE_NUMERIC, "--k", "3", "--output-dir", "o"],
        "numeric identifiers do not take --k",
    ),
    (
        "prepare-rq-no-levels",
        lambda w: [*PREPARE_RQ, "--levels", "0", "--output-dir", "o"],
        "argument --levels: must be >= 1, got 0",
    ),
    (
        "prepare-rq-one-code",
        lambda w: [*PREPARE_RQ, "--codebook-size", "1", "--output-dir", "o"],
        "rq identifiers need --levels >= 1 and --codebook-size >= 2, got levels None, codebook size 1",
    ),
    (
        "prepare-rq-no-source",
        lambda w: [*PREPARE, "--identifier-kind", "rq", "--levels", "2", "--output-dir", "o"],
        "exactly one embedding source",
    ),
    (
        "prepare-rq-tree-option",
        lambda w: [*PREPARE_RQ, "--leaf-size", "4", "--output-dir", "o"],
        "rq identifiers do not take --leaf-size",
    ),
    ("train-cwd", lambda w: ["train", "--config", _recipe(w), "--output-dir", "."], "working directory"),
    (
        "train-into-data",
        lambda w: ["train", "--config", _recipe(w), "--output-dir", "prepared"],
        "holds the input prepared",
    ),
    (
        "train-into-user-dir",
        lambda w: ["train", "--config", _recipe(w), "--output-dir", "thesis"],
        "not a grace_hf output",
    ),
    ("train-seed-list", lambda w: ["train", "--config", _recipe(w, seed=[1, 2])], r"seed: \[1, 2\] is not int"),
    (
        "train-bad-preset",
        lambda w: ["train", "--config", _recipe(w), "--model-preset", "huge"],
        "unknown Flamingo preset 'huge'; choose one of",
    ),
    (
        "train-negative-size",
        lambda w: ["train", "--config", _recipe(w, config_overrides={"text_config": {"d_model": -8}})],
        "config_overrides",
    ),
    (
        "train-bogus-override",
        lambda w: ["train", "--config", _recipe(w, config_overrides={"bogus_field": 3})],
        r"unknown FlamingoConfig field\(s\) \['bogus_field'\]",
    ),
    (
        "train-old-flag",
        lambda w: ["train", "--config", _recipe(w), "--data_dir", "prepared"],
        "--data_dir was renamed: use --data",
    ),
    (
        "train-old-recipe-key",
        lambda w: ["train", "--config", _recipe(w, data_dir="prepared")],
        "'data_dir' was renamed: use 'data'",
    ),
    (
        "train-captioner-missing-image",
        lambda w: ["train", "--config", _captioner_recipe(w, _broken_image(w, 3, "missing"))],
        r"data/dataset_synthetic.json: images\[3\] \('images/synthetic_000003.png'\): image file not found",
    ),
    (
        "train-captioner-garbage-image",
        lambda w: ["train", "--config", _captioner_recipe(w, _broken_image(w, 3, "garbage"))],
        r"data/dataset_synthetic.json: images\[3\] \('images/synthetic_000003.png'\): image does not decode",
    ),
    ("train-no-data", lambda w: ["train", "--config", _recipe(w, data="nowhere")], "nowhere: not a prepared dataset"),
    (
        "train-resume-nothing",
        lambda w: ["train", "--config", _recipe(w), "--resume-from-checkpoint", "latest"],
        "no checkpoint to resume from",
    ),
    (
        "evaluate-no-weights",
        lambda w: [*EVALUATE, "--model", _broken_model(w, "model.safetensors"), "--output-dir", "e"],
        "missing model.safetensors",
    ),
    (
        "evaluate-no-tokenizer",
        lambda w: [*EVALUATE, "--model", _broken_model(w, "tokenizer.json"), "--output-dir", "e"],
        "missing tokenizer.json",
    ),
    (
        "evaluate-no-processor",
        lambda w: [*EVALUATE, "--model", _broken_model(w, "processor_config.json"), "--output-dir", "e"],
        "missing processor_config.json",
    ),
    (
        "evaluate-no-config",
        lambda w: [*EVALUATE, "--model", _broken_model(w, "config.json"), "--output-dir", "e"],
        "missing config.json",
    ),
    (
        "evaluate-truncated-weights",
        lambda w: [*EVALUATE, "--model", _broken_model(w, "truncated"), "--output-dir", "e"],
        "model.safetensors: corrupt or truncated",
    ),
    (
        "evaluate-foreign-identifiers",
        lambda w: [*EVALUATE, "--model", _broken_model(w, "foreign-identifiers"), "--output-dir", "e"],
        "identifiers.json: identifier token '0_0' is not in the model's tokenizer",
    ),
    (
        "evaluate-identifiers-of-another-model",
        lambda w: [*EVALUATE, "--model", _broken_model(w, "fewer-identifiers"), "--output-dir", "e"],
        "11 identifiers, but the model memorized 12",
    ),
    (
        "evaluate-unfinished-model",
        lambda w: [*EVALUATE, "--model", _broken_model(w, "unfinished"), "--output-dir", "e"],
        "has not finished",
    ),
    (
        "evaluate-output-is-file",
        lambda w: [*EVALUATE, "--model", "model", "--output-dir", "notes.txt"],
        "notes.txt: is a file",
    ),
    (
        "evaluate-output-is-model",
        lambda w: [*EVALUATE, "--model", "model", "--output-dir", "model"],
        "holds the input model",
    ),
    ("evaluate-old-flag", lambda w: [*EVALUATE, "--model", "model", "--output", "m.json"], "--output was renamed"),
    (
        "evaluate-split-val-old-data",
        lambda w: [*EVALUATE, "--model", "model", "--output-dir", "e", "--split", "val"],
        "eval-data: the prepared dataset has no 'val_queries' split",
    ),
    ("evaluate-rerank-not-dense", lambda w: [*RERANK, "thesis"], "thesis: not a `grace-hf baseline-clip` directory"),
    (
        "evaluate-rerank-dense-of-other-images",
        lambda w: [*RERANK, "dense-partial"],
        r"dense-partial/image_features.safetensors: no dense features for 6 of the 8 images of eval-data.s test split",
    ),
    ("evaluate-rerank-fit-without-val", lambda w: [*RERANK, "dense"], "no 'val_queries' split"),
    ("evaluate-rerank-weight-range", lambda w: [*RERANK, "dense", "--rerank-weight", "1.5"], r"must be in \[0, 1\]"),
    ("evaluate-rerank-no-beams", lambda w: [*RERANK, "dense", "--rerank-beams", "0"], "--rerank-beams: must be >= 1"),
    (
        "evaluate-rerank-weight-alone",
        lambda w: [*EVALUATE, "--model", "model", "--output-dir", "e", "--rerank-weight", "0.5"],
        "need --rerank DENSE_DIR",
    ),
    (
        "evaluate-rerank-weight-and-refit",
        lambda w: [*RERANK, "dense", "--rerank-weight", "0.5", "--refit-rerank"],
        "not both",
    ),
    (
        "evaluate-rerank-json-weight",
        lambda w: (
            [*EVALUATE, "--model", _with_rerank_json(w, '{"weight": 2, "num_beams": 5}'), "--output-dir", "e"]
            + ["--rerank", "dense"]
        ),
        r"model/rerank.json: the re-ranking weight must be a number in \[0, 1\], got 2",
    ),
    (
        "evaluate-rerank-json-malformed",
        lambda w: [*EVALUATE, "--model", _with_rerank_json(w, "{weight"), "--output-dir", "e", "--rerank", "dense"],
        "model/rerank.json: not valid JSON",
    ),
    (
        "retrieve-rerank-unfitted",
        lambda w: ["retrieve", "--model", "model", "a dog", "--rerank", "dense"],
        "no rerank.json .*grace-hf evaluate --model model .*--split val",
    ),
    (
        "retrieve-rerank-other-dense",
        lambda w: ["retrieve", "--model", _with_rerank_json(w, json.dumps(OTHER_DENSE)), "a dog", "--rerank", "dense"],
        "fitted with the dense model runs/old-dense",
    ),
    ("serve-rerank-not-dense", lambda w: ["serve", "--model", "model", "--rerank", "notes.txt"], "notes.txt: not a"),
    (
        "retrieve-cwd",
        lambda w: ["retrieve", "--model", "model", "a red square", "--output-dir", "."],
        "working directory",
    ),
    ("retrieve-empty-query", lambda w: ["retrieve", "--model", "model", "  "], r"queries\[0\]: empty query"),
    (
        "retrieve-image-missing",
        lambda w: ["retrieve", "--model", "model", "--image", "nope.png", "--output-dir", "out"],
        "nope.png: no such image file",
    ),
    ("retrieve-image-not-an-image", lambda w: RETRIEVE_IMAGE + ["notes.txt"], "notes.txt: not a readable image"),
    ("retrieve-image-folder", lambda w: RETRIEVE_IMAGE + ["thesis"], "thesis: not a readable image"),
    (
        "retrieve-image-truncated",
        lambda w: RETRIEVE_IMAGE + ["data/images/synthetic_000001.png", _truncated_image(w)],
        "truncated.png: not a readable image",
    ),
    (
        "retrieve-image-and-text",
        lambda w: ["retrieve", "--model", "model", "a dog", "--image", "data/images/synthetic_000000.png"],
        "--image takes the place of text queries",
    ),
    (
        "retrieve-image-views-without-images",
        lambda w: ["retrieve", "--model", "model", "a dog", "--image-views", "2"],
        "--image-views goes with --image",
    ),
    (
        "retrieve-negative-image-views",
        lambda w: RETRIEVE_IMAGE + ["data/images/synthetic_000000.png", "--image-views", "-1"],
        r"argument --image-views: must be in \[0, 32\], got -1",
    ),
    (
        "retrieve-old-flag",
        lambda w: ["retrieve", "--model", "model", "a dog", "--html", "g.html"],
        "--html was renamed",
    ),
    (
        "baseline-into-image-root",
        lambda w: [
            "baseline-clip",
            "--karpathy-json",
            "data/dataset_synthetic.json",
            "--image-root",
            "data",
            "--output-dir",
            "data",
        ],
        "holds the input",
    ),
    (
        "baseline-bm25-into-image-root",
        lambda w: [
            "baseline-bm25",
            "--karpathy-json",
            "data/dataset_synthetic.json",
            "--image-root",
            "data",
            "--output-dir",
            "data",
        ],
        "holds the input",
    ),
    ("compare-cwd", lambda w: ["compare", "model", "--output-dir", "."], "working directory"),
    ("compare-no-metrics", lambda w: ["compare", "thesis"], "thesis: no metrics.json"),
    (
        "pseudo-queries-into-image-root",
        lambda w: [
            "pseudo-queries",
            "--model",
            "model",
            "--karpathy-json",
            "data/dataset_synthetic.json",
            "--image-root",
            "data",
            "--output-dir",
            "data",
        ],
        "holds the input",
    ),
    (
        "convert-cwd",
        lambda w: [
            "convert-openflamingo",
            "--openflamingo-checkpoint",
            "nothing.pt",
            "--mpt-weights",
            "m",
            "--clip-weights",
            "c.pt",
            "--output-dir",
            ".",
        ],
        "working directory",
    ),
    (
        "convert-missing-checkpoint",
        lambda w: [
            "convert-openflamingo",
            "--openflamingo-checkpoint",
            "nothing.pt",
            "--mpt-weights",
            "m",
            "--clip-weights",
            "c.pt",
            "--output-dir",
            "converted",
        ],
        "nothing.pt: no such weights file",
    ),
    (
        "add-images-image-already-in-collection",
        lambda w: [
            *ADD[:2],
            _new_images(w, "003.png", ["a red square"]),
            *ADD[3:],
            "--model",
            "model",
            "--data",
            "prepared",
            "--output-dir",
            "added",
        ],
        r"003.png.json: image 'images/003.png' is already in model/identifiers.json",
    ),
    (
        "add-images-identifier-clash",
        lambda w: [
            *ADD[:2],
            _new_images(w, "clash.png", ["Shape 3", "A picture of shape number 3"]),
            *ADD[3:],
            "--model",
            "model-semantic",
            "--data",
            "prepared",
            "--output-dir",
            "added",
        ],
        r"every text of image 'images/clash.png' also names an earlier image \(e.g. 'shape 3' names 'images/003.png'\)",
    ),
    (
        "add-images-no-codebooks",
        lambda w: [*ADD, "--model", _structured_without_codebooks(w), "--data", "prepared", "--output-dir", "added"],
        "model/identifiers.json: no identifier_codebooks.safetensors: structured identifiers of new images",
    ),
    (
        "add-images-no-training-record",
        lambda w: [*ADD, "--model", "model", "--output-dir", "added"],
        "model: no training_args.json says which prepared dataset the model was trained on; pass --data",
    ),
    (
        "add-images-replays-another-models-data",
        lambda w: [*ADD, "--model", "model", "--data", "prepared", "--output-dir", "added"],
        r"prepared: i2id\[0\]: identifier '.+' of image 'images/synthetic_000000.png' is not the model's identifier",
    ),
    (
        "add-images-into-the-model",
        lambda w: [*ADD, "--model", "model", "--data", "prepared", "--output-dir", "model"],
        "holds the input model",
    ),
    (
        "add-images-other-query-image",
        lambda w: [*ADD, "--model", "model", "--t2id-image", "blank", "--output-dir", "added"],
        r"t2id_image 'blank': model was trained with 'none' \(grace_config.json\)",
    ),
    (
        "add-images-captioner-is-a-retriever",
        lambda w: [*ADD, "--model", "model", "--data", "prepared", "--output-dir", "added", "--captioner", "model"],
        "--captioner model: a retrieval model .it has identifiers.json., not a captioner",
    ),
    (
        "add-images-no-new-images",
        lambda w: ["add-images", "--model", "model", "--output-dir", "a"],
        "needs karpathy_json",
    ),
    # issue 20: data loss, inputs that are outputs, system paths, leaks, numbers and files that were tracebacks
    (
        "synthetic-forged-marker",
        lambda w: ["synthetic", "--output-dir", _marker_into_thesis(w, "copied"), "--overwrite"],
        "thesis: exists and is a grace_hf prepared-dataset output whose files are not those its marker lists",
    ),
    (
        "synthetic-linked-marker",
        lambda w: ["synthetic", "--output-dir", _marker_into_thesis(w, "linked"), "--overwrite"],
        "thesis: exists and is not a grace_hf output; nothing was deleted",
    ),
    (
        "synthetic-nested-marker",
        lambda w: ["synthetic", "--output-dir", _marker_into_thesis(w, "nested"), "--overwrite"],
        "thesis: exists and is not a grace_hf output; nothing was deleted",
    ),
    (
        "synthetic-rerun-keeps-user-files",
        lambda w: ["synthetic", "--output-dir", _with_user_file(w, "data"), "--num-images", "12"],
        "data: exists and is a grace_hf synthetic-data output that also holds files grace_hf did not write: "
        "my-notes.txt; nothing was deleted",
    ),
    (
        "prepare-rerun-keeps-user-files-with-overwrite",
        lambda w: [*PREPARE_NUMERIC, "--output-dir", _with_user_file(w, "prepared"), "--overwrite"],
        "prepared: exists and is a grace_hf prepared-dataset output that also holds files grace_hf did not write",
    ),
    (
        "prepare-inside-image-root",
        lambda w: [*PREPARE_NUMERIC, "--output-dir", "data/prepared"],
        "--output-dir data/prepared: is inside the input data",
    ),
    (
        "prepare-into-linked-image-root",
        lambda w: [
            "prepare",
            "--karpathy-json",
            "k.json",
            "--image-root",
            _linked_image_root(w),
            "--identifier-kind",
            "numeric",
            "--output-dir",
            "data",
            "--overwrite",
        ],
        "--output-dir data: holds the input imglink",
    ),
    (
        "prepare-image-links-outside-root",
        lambda w: [
            "prepare",
            "--karpathy-json",
            _leaking_image(w),
            "--image-root",
            "data",
            "--identifier-kind",
            "numeric",
            "--output-dir",
            "p",
        ],
        r"leaking.json: images\[2\] \('leak.png'\): data/images/leak.png leads outside the image root data",
    ),
    (
        "evaluate-rerank-is-the-output",
        lambda w: [*EVALUATE, "--model", "model", "--rerank", "dense", "--output-dir", "dense", "--overwrite"],
        "--output-dir dense: holds the input dense",
    ),
    (
        "retrieve-rerank-is-the-output",
        lambda w: [
            "retrieve",
            "--model",
            "model",
            "a dog",
            "--rerank",
            "dense",
            "--output-dir",
            "dense",
            "--overwrite",
        ],
        "--output-dir dense: holds the input dense",
    ),
    (
        "train-into-the-recipe-folder",
        lambda w: ["train", "--config", _recipe_folder(w), "--output-dir", "recipes", "--overwrite"],
        "--output-dir recipes: holds the input recipes/recipe.yaml",
    ),
    ("synthetic-etc", lambda w: ["synthetic", "--output-dir", "/etc", "--overwrite"], "/etc: is / or a directory"),
    (
        "synthetic-usr",
        lambda w: ["synthetic", "--output-dir", "/usr/share/grace", "--overwrite"],
        "/usr/share/grace: is a system directory",
    ),
    (
        "synthetic-var-lib",
        lambda w: ["synthetic", "--output-dir", "/var/lib/grace", "--overwrite"],
        "/var/lib/grace: is a system directory",
    ),
    (
        "synthetic-home-dot-folder",
        lambda w: ["synthetic", "--output-dir", "~/.ssh", "--overwrite"],
        "~/.ssh: is in the dot-folder .*/home/.ssh of the home directory",
    ),
    (
        "synthetic-git-checkout",
        lambda w: ["synthetic", "--output-dir", str(Path(__file__).resolve().parents[1]), "--overwrite"],
        "is the root of a git checkout",
    ),
    (
        "synthetic-name-too-long",
        lambda w: ["synthetic", "--output-dir", "x" * 250],
        "the name is too long to build the output beside it",
    ),
    (
        "retrieve-query-too-long",
        lambda w: ["retrieve", "--model", "model", "a" * 100_000],
        r"queries\[0\]: the query is 100,000 characters long; at most 1,000 are accepted",
    ),
    (
        "pseudo-queries-from-a-retriever",
        lambda w: [
            "pseudo-queries",
            "--model",
            "model",
            "--karpathy-json",
            "data/dataset_synthetic.json",
            "--image-root",
            "data",
            "--output-dir",
            "pq",
            "--device",
            "cpu",
        ],
        "--model model: a retrieval model .it has identifiers.json., not a captioner",
    ),
    (
        "pseudo-queries-cuda-without-gpu",
        lambda w: [
            "pseudo-queries",
            "--model",
            "model",
            "--karpathy-json",
            "data/dataset_synthetic.json",
            "--image-root",
            "data",
            "--output-dir",
            "pq",
            "--device",
            "cuda" if not torch.cuda.is_available() else "cuda:99",
        ],
        "no CUDA GPU is available here" if not torch.cuda.is_available() else "cuda:99",
    ),
    (
        "evaluate-no-beams",
        lambda w: [*EVALUATE, "--model", "model", "--output-dir", "e", "--num-beams", "0"],
        "--num-beams: must be >= 1",
    ),
    ("retrieve-no-batch", lambda w: ["retrieve", "--model", "model", "a", "--batch-size", "0"], "--batch-size: must"),
    (
        "serve-negative-port",
        lambda w: ["serve", "--model", "model", "--port", "-1"],
        r"--port: must be in \[1, 65535\]",
    ),
    ("serve-port-too-large", lambda w: ["serve", "--model", "model", "--port", "70000"], "--port: must be in"),
    (
        "serve-deep-queries",
        lambda w: ["serve", "--model", "model", "--queries", _deep_json(w)],
        "deep.json: line 1: not JSON .nested too deeply.",
    ),
    (
        "baseline-nan-lr",
        lambda w: ["baseline-clip", *PREPARE[1:5], "--output-dir", "b", "--lr", "nan"],
        "--lr: must be a finite number, got nan",
    ),
    (
        "baseline-slip-without-views",
        lambda w: ["baseline-clip", *PREPARE[1:5], "--output-dir", "b", "--crop-scale", "1", "--jpeg-quality", "0"],
        "--image-loss-weight must be >= 0, and above 0 it needs views that change images",
    ),
    (
        "baseline-negative-jpeg",
        lambda w: ["baseline-clip", *PREPARE[1:5], "--output-dir", "b", "--jpeg-quality", "-5"],
        "--jpeg-quality: must be >= 0, got -5",
    ),
    (
        "serve-negative-image-views",
        lambda w: ["serve", "--model", "model", "--image-views", "-2"],
        r"--image-views: must be in \[0, 32\], got -2",
    ),
    (
        "synthetic-negative-workers",
        lambda w: ["synthetic", "--output-dir", "s", "--num-workers", "-1"],
        "--num-workers: must be >= 0",
    ),
    (
        "prepare-negative-workers",
        lambda w: [*PREPARE_NUMERIC, "--output-dir", "o", "--num-workers", "-2"],
        "--num-workers: must be >= 0",
    ),
    (
        "train-nan-learning-rate",
        lambda w: ["train", "--config", _recipe(w), "--learning-rate", "nan"],
        "learning_rate must be a finite number >= 0, got nan",
    ),
    (
        "train-negative-learning-rate",
        lambda w: ["train", "--config", _recipe(w), "--learning-rate", "-1"],
        "learning_rate must be a finite number >= 0, got -1",
    ),
    (
        "train-negative-workers",
        lambda w: ["train", "--config", _recipe(w), "--dataloader-num-workers", "-1"],
        "dataloader_num_workers must be >= 0, got -1",
    ),
    (
        "add-images-nan-replay-ratio",
        lambda w: [*ADD, "--model", "model", "--replay-ratio", "nan", "--output-dir", "a"],
        "replay_ratio must be a finite number >= 0, got nan",
    ),
    (
        "train-resume-foreign-checkpoint",
        lambda w: ["train", "--config", _recipe(w), "--resume-from-checkpoint", _checkpoint(w, "foreign")],
        "ckpt/trainer_state.json: not a grace_hf trainer state",
    ),
    (
        "train-resume-truncated-checkpoint",
        lambda w: ["train", "--config", _recipe(w), "--resume-from-checkpoint", _checkpoint(w, "truncated")],
        "ckpt: cannot resume from this checkpoint",
    ),
    (
        "convert-corrupt-safetensors",
        lambda w: [
            "convert-openflamingo",
            "--openflamingo-checkpoint",
            _corrupt(w, "bad.safetensors"),
            "--mpt-weights",
            "m",
            "--clip-weights",
            "c.pt",
            "--output-dir",
            "converted",
        ],
        "bad.safetensors: not a readable safetensors file",
    ),
    (
        "prepare-corrupt-clip-weights",
        lambda w: [
            *PREPARE,
            "--identifier-kind",
            "rq",
            "--clip-model",
            _micro_clip_config(w),
            "--clip-pretrained",
            _corrupt(w, "clip.safetensors"),
            "--output-dir",
            "o",
        ],
        "--clip-pretrained clip.safetensors: cannot load: ",
    ),
    (
        "retrieve-foreign-weights",
        lambda w: ["retrieve", "--model", _broken_model(w, "foreign-weights"), "a dog"],
        r"model/model.safetensors: the weights do not fit the model of config.json: \d+ missing keys, e.g. ",
    ),
    ("demo-cwd", lambda w: ["demo", "--output-dir", "."], "working directory"),
    ("demo-too-few-images", lambda w: ["demo", "--output-dir", "d", "--num-images", "2"], "between 3 and"),
    (
        "compare-not-metrics",
        lambda w: ["compare", "data/dataset_synthetic.json"],
        "not the metrics of an evaluated run",
    ),
    ("demo-user-dir", lambda w: ["demo", "--output-dir", "thesis"], "thesis: exists and is not a grace_hf"),
    ("demo-old-flag", lambda w: ["demo", "--kinds", "all"], "--kinds was renamed: use --identifier-kind"),
    # a model that is none, an image that does not decode, an output under a file, an image root (serve: below)
    (
        "train-model-missing",
        lambda w: ["train", "--config", _recipe(w, model="nodir", model_preset=None)],
        "nodir: not a model directory, and not a Hub model that can be fetched",
    ),
    (
        "train-model-not-a-model-directory",
        lambda w: ["train", "--model", "thesis", "--data", "prepared", "--output-dir", "m", "--report-to", "none"],
        "thesis: not a complete model directory: missing config.json",
    ),
    (
        "train-model-a-file",
        lambda w: ["train", "--config", _recipe(w, model="notes.txt", model_preset=None)],
        r"notes.txt: not a model directory \(a file\)",
    ),
    (
        "train-garbage-image-unchecked",
        lambda w: ["train", "--config", _recipe(w, data=_prepared_with_garbage_image(w), batch_size_i2id=12)],
        r"prepared-bad: i2id\[3\] \(image 'images/synthetic_000003.png'\): the image does not decode .*"
        "prepared with --skip-image-check",
    ),
    (
        "train-garbage-image-unchecked-in-a-worker",
        lambda w: [
            "train",
            "--config",
            _recipe(w, data=_prepared_with_garbage_image(w), batch_size_i2id=12, dataloader_num_workers=1),
        ],
        r"prepared-bad: i2id\[3\] \(image 'images/synthetic_000003.png'\): the image does not decode",
    ),
    (
        "synthetic-output-under-a-file",
        lambda w: ["synthetic", "--output-dir", "notes.txt/x"],
        "--output-dir notes.txt/x: notes.txt is a file, not a directory",
    ),
    (
        "prepare-output-under-a-file",
        lambda w: [*PREPARE_NUMERIC, "--output-dir", "notes.txt/x/y"],
        "--output-dir notes.txt/x/y: notes.txt is a file",
    ),
    (
        "evaluate-output-under-a-file",
        lambda w: [*EVALUATE, "--model", "model", "--output-dir", "thesis/chapter1.tex/e"],
        "--output-dir thesis/chapter1.tex/e: thesis/chapter1.tex is a file",
    ),
    ("compare-output-under-a-file", lambda w: ["compare", "model", "--output-dir", "notes.txt/c"], "notes.txt is a"),
    (
        "retrieve-no-image-root",
        lambda w: ["retrieve", "--model", "model", "a red square", "--output-dir", "g", "--image-root", "nodir"],
        "--image-root nodir: not a directory",
    ),
    (
        "retrieve-image-root-a-file",
        lambda w: ["retrieve", "--model", "model", "a red square", "--output-dir", "g", "--image-root", "notes.txt"],
        "--image-root notes.txt: not a directory",
    ),
]


@pytest.mark.parametrize("build_argv, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_exits_2_names_the_item_and_loses_nothing(build_argv, message, work, capsys):
    argv = build_argv(work)
    before = _tree(work.parent)
    code, err = _run(argv, capsys)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert any(line.startswith(f"grace-hf {argv[0]}: error: ") for line in err.splitlines()), err[-2000:]
    assert re.search(message, err), err[-2000:]
    assert _tree(work.parent) == before


def test_debug_raises_instead_of_a_message(work, monkeypatch):
    with pytest.raises(GraceInputError, match="working directory"):
        cli.main(["synthetic", "--output-dir", ".", "--debug"])
    monkeypatch.setenv("GRACE_HF_DEBUG", "1")
    with pytest.raises(GraceInputError, match="working directory"):
        cli.main(["synthetic", "--output-dir", "."])


def test_a_failed_or_interrupted_rerun_keeps_the_finished_model(work, capsys, monkeypatch):
    code, err = _run(["train", "--config", _recipe(work, batch_size_t2id=100_000)], capsys)
    assert code == 0, err[-2000:]
    assert re.search(r"note: t2id batch size 100000 clamped to the \d+ rows there are", err)
    before = _tree(work.parent)
    assert _run(["train", "--config", "recipe.yaml", "--learning-rate", "-1"], capsys)[0] == 2
    assert _tree(work.parent) == before
    for failure, code in ((KeyboardInterrupt(), 130), (RuntimeError("the disk is full"), None)):

        def fail(self, *args, failure=failure):
            raise failure

        with monkeypatch.context() as patch:
            patch.setattr(train_module._Trainer, "_step", fail)
            if code is None:
                with pytest.raises(RuntimeError, match="the disk is full"):
                    _run(["train", "--config", "recipe.yaml"], capsys)
            else:
                assert _run(["train", "--config", "recipe.yaml"], capsys)[0] == code
        assert _tree(work.parent) == before  # the finished model, byte for byte; no build directory or lock left

    def offline(*args, **kwargs):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", offline)
    code, err = _run(["train", "--config", "recipe.yaml", "--push-to-hub", "me/grace"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "--push-to-hub me/grace: the model is saved in runs/new, but pushing it failed: ConnectionError" in err
    assert read_marker(work / "runs" / "new")["complete"] is True


def test_an_interrupted_demo_keeps_the_previous_one(work, capsys, monkeypatch):
    with output_directory("demo-out", DEMO) as tmp:
        (tmp / "metrics.json").write_text("{}")
    before = _tree(work.parent)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "run_baseline", interrupted)
    code, err = _run(["demo", "--output-dir", "demo-out", "--num-images", "12"], capsys)
    assert code == 130, err[-2000:]
    assert _tree(work.parent) == before


def test_a_second_run_into_the_same_output_names_the_first(work, capsys):
    first = begin_output("runs/new", "model")
    try:
        code, err = _run(["train", "--config", _recipe(work)], capsys)
    finally:
        first.abandon()
    assert code == 2 and f"another grace_hf run (process {os.getpid()}) is writing it" in err
    assert not (work / "runs").exists()


def _bomb_png(path: Path) -> None:
    """A PNG whose header claims 20000 x 20000 pixels: Pillow's bomb guard refuses to decode it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_the_gallery_keeps_pillows_bomb_guard(work, capsys):
    for key in json.loads((work / "model" / "identifiers.json").read_text())["images"]:
        (work / "bombs" / key).parent.mkdir(parents=True, exist_ok=True)
        _bomb_png(work / "bombs" / key)
    argv = ["retrieve", "--model", "model", "a red square", "--image-root", "bombs", "--output-dir", "g"]
    code, err = _run(argv, capsys)
    assert code == 0, err[-2000:]
    assert "no image" in (work / "g" / "gallery.html").read_text()


def test_pseudo_queries_given_as_the_folder_the_command_writes(work, capsys):
    shutil.copy(work / "data" / "oracle_pseudo_queries.json", work / "data" / "pseudo_queries.json")
    argv = [*PREPARE_NUMERIC, "--pseudo-queries", "data", "--output-dir", "p"]
    code, err = _run(argv, capsys)
    assert code == 0, err[-2000:]
    record = json.loads((work / "p" / "prepare.json").read_text())
    assert record["inputs"]["pseudo_queries"] == os.path.join("data", "pseudo_queries.json")


def test_serve_refuses_an_address_or_image_root_before_loading_the_model(work, capsys, monkeypatch):
    def load_retriever(*args, **kwargs):  # past it, the app would serve until interrupted
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(serve_module, "load_retriever", load_retriever)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for flags, message in (
            (["--port", port], f"--port {port}: cannot listen on 127.0.0.1 port {port} "),
            (["--host", "not.a.host.invalid"], "--host not.a.host.invalid: not a host name or address"),
            (["--image-root", "nodir"], "--image-root nodir: not a directory"),
            (["--image-root", "notes.txt"], "--image-root notes.txt: not a directory"),
        ):
            code, err = _run(["serve", "--model", "model", "--data", "prepared", *flags], capsys)
            assert code == 2 and "Traceback" not in err
            assert f"grace-hf serve: error: {message}" in err
