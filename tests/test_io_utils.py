"""The output policy and careful JSON reading: no half-written results, nothing replaced that the tool did not make,
errors that name the file."""

import os
import stat
import subprocess
import sys

import pytest

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_json, read_json
from grace_hf.outputs import (
    MARKER_FILE,
    check_output_dir,
    finish_output_dir,
    open_output_dir,
    output_directory,
    read_marker,
    remove_stale_temporaries,
)


def _tree(root):
    """Every path under `root` with its bytes (None for directories): a snapshot to compare before and after."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes() for path in sorted(root.rglob("*"))
    }


def _dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_failed_output_leaves_nothing_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out"
    with output_directory(target, "evaluation") as tmp:
        (tmp / "old.txt").write_text("old")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError):
        with output_directory(target, "evaluation") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert _tree(tmp_path) == before


def test_completed_output_replaces_its_own_kind_with_ordinary_permissions(tmp_path):
    target = tmp_path / "out"
    with output_directory(target, "evaluation", command="grace-hf evaluate") as tmp:
        (tmp / "old.txt").write_text("old")
    with output_directory(target, "evaluation") as tmp:
        atomic_write_json(tmp / "metrics.json", {"recall@1": 0.5})
    assert sorted(p.name for p in target.iterdir()) == [MARKER_FILE, "metrics.json"]
    assert read_marker(target)["kind"] == "evaluation" and read_marker(target)["complete"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((target / "metrics.json").stat().st_mode) == 0o666 & ~umask
    assert read_json(target / "metrics.json") == {"recall@1": 0.5}


@pytest.mark.parametrize(
    "case, message",
    [
        ("cwd", "is the working directory or one of its parents"),
        ("parent", "is the working directory or one of its parents"),
        ("home", "is the home directory"),
        ("holds-input", "holds the input"),
        ("file", "is a file, not a directory"),
        ("symlink", "is a symbolic link"),
        ("foreign", "exists and is not a grace_hf output"),
        ("other-kind", "exists and is a grace_hf model output, not a evaluation output"),
    ],
)
def test_refusals_name_the_reason_and_touch_nothing(case, message, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "inputs").mkdir(parents=True)
    (work / "inputs" / "images.json").write_text("{}")
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = {
        "cwd": ".",
        "parent": "..",
        "home": "~",
        "holds-input": "inputs",
        "file": "notes.txt",
        "symlink": "link",
        "foreign": "theirs",
        "other-kind": "model",
    }[case]
    if case == "symlink":
        os.symlink(work / "inputs", work / "link")
    if case == "foreign":
        (work / "theirs").mkdir()
        (work / "theirs" / "thesis.tex").write_text("years of work")
    if case == "other-kind":
        with output_directory(work / "model", "model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"weights")
    before = _tree(tmp_path)
    overwrite = case not in ("foreign", "other-kind")  # --overwrite lifts only the "not my output" refusal
    with pytest.raises(GraceInputError, match=message):
        with output_directory(target, "evaluation", inputs=["inputs/images.json"], overwrite=overwrite) as tmp:
            (tmp / "metrics.json").write_text("{}")
    assert _tree(tmp_path) == before


def test_overwrite_replaces_a_foreign_directory(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "old.txt").write_text("old")
    with output_directory(tmp_path / "theirs", "evaluation", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == [MARKER_FILE, "new.txt"]


def test_killed_runs_leave_temporaries_that_the_next_run_removes_or_restores(tmp_path):
    dead = _dead_pid()
    stale_tmp = tmp_path / f".out.grace-tmp-{dead}-0a1b2c3d"
    stale_tmp.mkdir()
    (stale_tmp / "half.txt").write_text("half")
    other = tmp_path / f".other.grace-tmp-{dead}-0a1b2c3d"  # another output's: left alone
    other.mkdir()
    alive = tmp_path / f".out.grace-tmp-{os.getpid()}-0a1b2c3d"  # a running process's: left alone
    alive.mkdir()
    moved_aside = tmp_path / f".out.grace-old-{dead}-0a1b2c3d"  # killed between the two renames of a swap
    moved_aside.mkdir()
    (moved_aside / "metrics.json").write_text("{}")
    remove_stale_temporaries(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, alive.name, "out"])
    assert (tmp_path / "out" / "metrics.json").read_text() == "{}"  # the replaced output came back


def test_long_jobs_open_in_place_and_keep_an_unfinished_run(tmp_path):
    out = open_output_dir(tmp_path / "run", "model", resumable=True)
    (out / "checkpoints").mkdir()
    assert read_marker(out)["complete"] is False
    with pytest.raises(GraceInputError, match="holds an unfinished run; resume it"):
        open_output_dir(tmp_path / "run", "model", resumable=True)
    assert open_output_dir(tmp_path / "run", "model", resumable=True, resume=True) == out
    assert (out / "checkpoints").is_dir()  # resuming keeps what is there
    finish_output_dir(out, "model")
    assert read_marker(out)["complete"] is True
    open_output_dir(tmp_path / "run", "model", resumable=True)  # a finished run of the same kind is replaced
    assert not (out / "checkpoints").exists()
    with pytest.raises(GraceInputError, match="no evaluation output to resume"):
        open_output_dir(tmp_path / "nothing", "evaluation", resume=True)


def test_check_output_dir_accepts_new_and_empty_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", "evaluation") == tmp_path / "empty"
    assert check_output_dir(tmp_path / "new" / "deeper", "evaluation") == tmp_path / "new" / "deeper"


def test_read_json_names_the_file_and_what_it_is(tmp_path):
    with pytest.raises(GraceInputError, match=r"missing\.json: metrics file not found"):
        read_json(tmp_path / "missing.json", "metrics file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GraceInputError, match=r"bad\.json: not valid JSON"):
        read_json(bad)
    with pytest.raises(GraceInputError, match="is a directory, not a Karpathy JSON"):
        read_json(tmp_path, "Karpathy JSON")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(GraceInputError, match=r"deep\.json: not valid JSON"):
        read_json(deep)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(GraceInputError, match=r"binary\.json: not valid JSON"):
        read_json(binary)


@pytest.mark.parametrize("script", ["generalization", "add_images"])
def test_benchmark_work_dirs_follow_the_output_policy(script, tmp_path, monkeypatch, capsys):
    """A benchmark's --work-dir is refused where a command's output would be: nothing in it is touched."""
    main = __import__(script).main
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    monkeypatch.chdir(foreign)
    for work_dir, message in (
        (".", "--work-dir .: is the working directory"),
        (str(foreign), "is the working directory"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["--work-dir", work_dir])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["--work-dir", str(foreign)])
    assert "exists and is not a grace_hf output, not a benchmark output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--work-dir", str(tmp_path / "new"), "--reuse"])
    assert "no benchmark output to resume" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine", "notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep"
