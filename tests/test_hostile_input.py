"""Every command, tried as a hostile new user would: each bad input ends in exit status 2 and a message that names
the item, with no traceback, and nothing is lost: the inputs, the working directory and the output's parent are the
same byte for byte afterwards."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState, PartialState
from test_dense import MICRO
from test_evaluate_cli import write_prepared
from test_retriever import IMAGES, QUERIES, build_tiny_model_dir

from grace_hf import cli
from grace_hf.data.synthetic import write_synthetic
from grace_hf.dense.directory import FEATURES_FILE, save_image_features
from grace_hf.dense.model import DualEncoder
from grace_hf.errors import GraceInputError
from grace_hf.training.preparation import prepare


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Read-only originals: synthetic data, a prepared dataset, a tiny model and its evaluation data."""
    root = tmp_path_factory.mktemp("assets")
    write_synthetic(root / "data", num_images=12, seed=0, num_workers=1)
    prepare(
        root / "data" / "dataset_synthetic.json",
        root / "data",
        "structured",
        root / "prepared",
        pseudo_queries=root / "data" / "pseudo_queries.json",
        pixel_features=True,
        k=3,
        leaf_size=4,
    )
    build_tiny_model_dir(root / "model")
    build_tiny_model_dir(root / "model-semantic", kind="semantic")
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
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()
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


PREPARE = ["prepare", "--karpathy-json", "data/dataset_synthetic.json", "--image-root", "data"]
PREPARE_NUMERIC = [*PREPARE, "--identifier-kind", "numeric"]
PREPARE_RQ = [*PREPARE, "--identifier-kind", "rq", "--pixel-features"]
EVALUATE = ["evaluate", "--data", "eval-data"]
RERANK = [*EVALUATE, "--model", "model", "--output-dir", "e", "--rerank"]
ADD = ["add-images", "--karpathy-json", "data/dataset_synthetic.json", "--image-root", "data", "--max-steps", "1"]

OTHER_DENSE = {"weight": 0.5, "num_beams": 5, "dense": "runs/old-dense", "dense_fingerprint": "0" * 64}

# (id, argv builder, message the error must contain as a regex)
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
        "rq identifiers need --levels >= 1 and --codebook-size >= 2, got levels 0",
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
    ("evaluate-rerank-no-beams", lambda w: [*RERANK, "dense", "--rerank-beams", "0"], "--rerank-beams must be >= 1"),
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
        "add-images-no-new-images",
        lambda w: ["add-images", "--model", "model", "--output-dir", "a"],
        "needs karpathy_json",
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
