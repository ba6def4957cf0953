"""Three small refusals: more query crops than `MAX_IMAGE_VIEWS` (the API, the pipeline, the app, the commands and the
image-query benchmark, through one check), Ctrl-C at any moment of a `grace-hf` command (imports included: one line,
exit status 130), and paths passed through the add-images benchmark's `--add-args`/`--train-args` (exit 2, nothing
written)."""

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers import pipeline

from grace_hf.commands import cli
from grace_hf.errors import GraceInputError
from grace_hf.retrieval import GraceRetriever
from grace_hf.retrieval.retriever import MAX_IMAGE_VIEWS, check_image_views
from grace_hf.serving.pipeline import TASK
from tests.helpers import usage_error

ROOT = Path(__file__).resolve().parents[1]
TOO_MANY = re.escape(f"image_views must be an integer in [0, {MAX_IMAGE_VIEWS}]")


def _not_reached(*args, **kwargs):
    raise AssertionError("the work directory was opened: the refusal came too late")


@pytest.fixture(scope="module")
def retriever(tiny_model):
    return GraceRetriever.from_pretrained(tiny_model(), device="cpu")


# 1. image views: one bound, one check


def test_the_image_views_bound_is_checked_once_for_every_caller():
    check_image_views(0)
    check_image_views(MAX_IMAGE_VIEWS)
    for bad in (-1, MAX_IMAGE_VIEWS + 1, 100_000, True, 2.0, "4", None):
        with pytest.raises(GraceInputError, match=TOO_MANY):
            check_image_views(bad)
    with pytest.raises(GraceInputError, match=re.escape("--image-views must be an integer in [0, ")):
        check_image_views(100_000, "--image-views")


def test_retrieve_and_the_pipeline_refuse_more_image_views_than_the_bound(retriever, tiny_model):
    image = Image.new("RGB", (16, 16), "red")
    for views in (MAX_IMAGE_VIEWS + 1, 100_000):
        with pytest.raises(GraceInputError, match=TOO_MANY):
            retriever.retrieve(images=[image], image_views=views)
    with pytest.raises(GraceInputError, match=TOO_MANY):
        retriever.retrieve(images=[image], image_views=1.5)
    with pytest.raises(GraceInputError, match="needs query images"):
        retriever.retrieve(["a red square"], image_views=2)
    retrieve = pipeline(TASK, model=str(tiny_model()), device="cpu")
    with pytest.raises(GraceInputError, match=TOO_MANY):
        retrieve(image, image_views=100_000)


def test_the_app_refuses_more_image_views_than_the_bound(retriever):
    pytest.importorskip("gradio")
    from grace_hf.serving.app import SearchService

    assert SearchService(retriever, image_views=MAX_IMAGE_VIEWS).rank_images is not None
    with pytest.raises(GraceInputError, match=TOO_MANY):
        SearchService(retriever, image_views=MAX_IMAGE_VIEWS + 1)


@pytest.mark.parametrize("command", ["retrieve", "serve"])
def test_the_commands_refuse_more_image_views_than_the_bound(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "query.png").write_bytes(b"")  # never read: the flag is refused first
    argv = [command, "--model", "model", "--image-views", "100000"]
    if command == "retrieve":
        argv += ["--image", "query.png"]
    err = usage_error(cli.main, argv, capsys)
    limit = f"argument --image-views: must be in [0, {MAX_IMAGE_VIEWS}], got 100000"
    assert f"grace-hf {command}: error: {limit}" in err.splitlines()
    assert sorted(os.listdir(tmp_path)) == ["query.png"]
    with pytest.raises(SystemExit):  # the help states the bound (the same constant)
        cli.main([command, "--help"])
    assert f"at most {MAX_IMAGE_VIEWS}" in " ".join(capsys.readouterr().out.split())


def test_the_image_query_benchmark_refuses_more_image_views_than_the_bound(tmp_path, monkeypatch, capsys):
    from benchmarks import image_query

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(image_query, "open_work_dir", _not_reached)
    err = usage_error(image_query.main, ["--work-dir", "w", "--image-views", str(MAX_IMAGE_VIEWS + 1)], capsys)
    assert f"--image-views must be an integer in [0, {MAX_IMAGE_VIEWS}]" in err
    assert os.listdir(tmp_path) == []


# 2. Ctrl-C at any moment of a command

# `import torch` (the first heavy import of `grace_hf`) held until interrupted, from Python's start-up
HOLD_TORCH = """
import sys, time

class HoldTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", flush=True)
            time.sleep(120)
        return None

sys.meta_path.insert(0, HoldTorch())
"""
# what pip's `grace-hf` script runs, its path in sys.argv[0]
SCRIPT = "import sys; sys.argv[0] = '/venv/bin/grace-hf'; from grace_hf.commands.cli import main; sys.exit(main())"


def interrupt_while_importing_torch(argv: list[str], tmp_path) -> tuple[int, str, str]:
    """Run `python *argv` with `import torch` held, send Ctrl-C once it is held: (status, stdout, stderr)."""
    (tmp_path / "sitecustomize.py").write_text(HOLD_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    # a shell's background job ignores SIGINT and its children inherit that: give the child the default disposition
    process = subprocess.Popen(
        [sys.executable, *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout.readline() == "importing torch\n"  # grace_hf is importing: no handler of its own yet
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, out, err


@pytest.mark.parametrize("entry", [["-c", SCRIPT], ["-m", "grace_hf"]], ids=["grace-hf", "python -m grace_hf"])
def test_ctrl_c_while_grace_hf_imports_ends_in_one_line_and_status_130(entry, tmp_path):
    status, out, err = interrupt_while_importing_torch([*entry, "retrieve", "--help"], tmp_path)
    assert status == 130, err
    assert err == "grace-hf: interrupted\n" and out == ""


def test_a_program_that_imports_grace_hf_gets_its_interrupt_as_usual(tmp_path):
    status, _, err = interrupt_while_importing_torch(["-c", "import grace_hf"], tmp_path)
    assert status == -signal.SIGINT and err.rstrip().endswith("KeyboardInterrupt")  # Python re-raises the signal


def test_the_grace_hf_script_is_the_command_line():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["grace-hf"] == "grace_hf.commands.cli:main"


def test_ctrl_c_while_the_command_module_imports_ends_in_one_line(monkeypatch, capsys):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    try:
        code = cli.main(["retrieve", "--help"])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped the command line (a traceback)")
    assert code == 130
    assert capsys.readouterr().err == "grace-hf retrieve: interrupted\n"


# 3. the add-images benchmark's pass-through flags take settings, not paths


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--add-args", "--output-dir elsewhere", "--output-dir"),
        ("--add-args", "--learning-rate 3e-4 --pseudo-queries=runs/pq.json", "--pseudo-queries"),
        ("--add-args", "--karpathy_json new.json --image-root raw", "--karpathy_json"),
        ("--add-args", "--image-root .", "--image-root"),
        ("--add-args", "--model runs/m", "--model"),
        ("--train-args", "--max-steps 5 --data runs/prepared", "--data"),
        ("--train-args", "--output_dir=runs/x", "--output_dir"),
    ],
)
def test_the_add_images_benchmark_refuses_a_path_passed_through(option, value, named, tmp_path, monkeypatch, capsys):
    from benchmarks import add_images

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(add_images, "open_work_dir", _not_reached)
    err = usage_error(add_images.main, ["--work-dir", "w", f"{option}={value}"], capsys)
    assert f"{option}: {named} names a path; the benchmark sets every path" in err
    assert os.listdir(tmp_path) == []


def test_the_add_images_benchmark_passes_settings_on_and_names_a_bad_quote(capsys):
    from benchmarks.add_images import pass_through

    parser = argparse.ArgumentParser(prog="add_images.py")
    assert pass_through(parser, "--add-args", "--learning-rate 3e-4 --replay-ratio=0.5") == [
        "--learning-rate",
        "3e-4",
        "--replay-ratio=0.5",
    ]
    assert pass_through(parser, "--train-args", "") == []
    err = usage_error(lambda argv: pass_through(parser, *argv), ["--add-args", "--learning-rate '3e-4"], capsys)
    assert "--add-args: No closing quotation" in err
