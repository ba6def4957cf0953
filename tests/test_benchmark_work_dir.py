"""A benchmark's `--work-dir` under the output policy, tried as a hostile user would: it may not be, hold or sit
inside a path the run reads, and a refusal gives advice that works for a script without `--overwrite`. Every refusal
is a usage error (exit status 2) that names the flag, and nothing is created or deleted."""

import argparse
import importlib
import os

import pytest

from benchmarks.common import open_work_dir
from grace_hf.commands import cli
from grace_hf.outputs import BENCHMARK, output_directory
from tests.helpers import usage_error


def _tree(root):
    """Every path under `root` with its bytes (None for directories): a snapshot to compare before and after."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes() for path in sorted(root.rglob("*"))
    }


def _output(directory, kind, **files):
    """A finished grace_hf output of `kind` at `directory` holding `files` (relative path -> text)."""
    with output_directory(directory, kind) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """`runs/`: a trained model (a grace_hf output), a dense baseline and a prepared dataset (plain folders, as
    copied from elsewhere), a finished image-query work directory that holds what it trained, and the user's notes;
    the working directory is `tmp_path`."""
    runs = tmp_path / "runs"
    _output(runs / "m", "model", **{"model.safetensors": "weights", "config.json": "{}"})
    (runs / "dense").mkdir()
    (runs / "dense" / "image_features.safetensors").write_text("features")
    (runs / "prepared").mkdir()
    (runs / "prepared" / "dataset.json").write_text("{}")
    trained = {"model/model.safetensors": "w", "dense/image_features.safetensors": "f", "data/dataset.json": "{}"}
    _output(runs / "image-query", BENCHMARK, **trained, **{"image_query.md": "table"})
    (tmp_path / "notes.txt").write_text("the user's notes")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return runs


@pytest.mark.parametrize("script", ["image_query", "generalization", "add_images"])
def test_a_work_dir_of_another_kind_is_refused_without_advice_to_pass_overwrite(script, runs, tmp_path, capsys):
    """The benchmarks have no --overwrite: their refusal of another kind of output says to choose another directory
    (the grace_hf commands, which have the flag, still offer it)."""
    main = importlib.import_module(f"benchmarks.{script}").main
    before = _tree(tmp_path)
    for work_dir in ("runs/m", str(runs / "m")):
        err = usage_error(main, ["--work-dir", work_dir], capsys)
        assert f"--work-dir {work_dir}: exists and is a grace_hf model output, not a complete benchmark output" in err
        assert "choose another directory" in err and "--overwrite" not in err
    assert _tree(tmp_path) == before
    code = cli.main(["synthetic", "--output-dir", "runs/m", "--num-images", "12"])
    err = capsys.readouterr().err
    assert code == 2 and "not a complete synthetic-data output; choose another directory, or pass --overwrite" in err
    assert _tree(tmp_path) == before


INPUTS = ["--model", "runs/m", "--dense", "runs/dense", "--data", "runs/prepared"]


@pytest.mark.parametrize(
    ("work_dir", "inputs", "message"),
    [
        ("runs/m", INPUTS, "--work-dir runs/m: holds the input runs/m"),
        ("runs/dense", INPUTS, "--work-dir runs/dense: holds the input runs/dense"),
        ("runs/m/x", INPUTS, "--work-dir runs/m/x: is inside the input runs/m"),
        ("runs/prepared/new/deeper", INPUTS, "is inside the input runs/prepared"),  # no parent is made
        ("runs/m/../prepared/x", INPUTS, "is inside the input runs/prepared"),
        ("runs", INPUTS, "--work-dir runs: holds the input runs/m"),
        # a finished work directory of this benchmark, given back as its own inputs: it would be replaced
        (
            "runs/image-query",
            ["--model", "runs/image-query/model", "--dense", "runs/dense", "--data", "runs/image-query/data"],
            "--work-dir runs/image-query: holds the input runs/image-query/model",
        ),
        # the input named through a symbolic link, the work directory by its real path
        (
            "runs/image-query",
            ["--model", "latest/model", "--dense", "runs/dense", "--data", "runs/prepared"],
            "--work-dir runs/image-query: holds the input latest/model",
        ),
        ("latest/x", [*INPUTS[:4], "--data", "runs/image-query"], "--work-dir latest/x: is inside the input"),
        ("ABSOLUTE", INPUTS, "is inside the input runs/m"),
    ],
)
def test_image_query_refuses_a_work_dir_that_clashes_with_its_inputs(work_dir, inputs, message, runs, capsys):
    from benchmarks import image_query

    os.symlink("runs/image-query", "latest")
    if work_dir == "ABSOLUTE":
        work_dir = str(runs / "m" / "results")
    before = _tree(runs.parent)
    err = usage_error(image_query.main, ["--work-dir", work_dir, *inputs], capsys)
    assert message in err and "choose another directory" in err
    assert _tree(runs.parent) == before  # no work directory, build directory, lock or parent made; nothing removed


def test_image_query_accepts_a_work_dir_beside_its_inputs(runs, capsys):
    """Only a real clash is refused: a sibling whose name starts like an input's is not inside it."""
    parser = argparse.ArgumentParser()
    before = _tree(runs.parent)
    output = open_work_dir(parser, "runs/m2", reuse=False, inputs=["runs/m", "runs/dense", None])
    try:
        assert output.build.is_dir() and output.path.resolve() == runs.resolve() / "m2"
    finally:
        output.abandon()
    assert _tree(runs.parent) == before
