"""The output policy and careful JSON reading: no half-written results, nothing replaced that the tool did not make,
errors that name the file."""

import importlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_json, read_json
from grace_hf.outputs import (
    MARKER_FILE,
    begin_output,
    build_path,
    check_output_dir,
    output_directory,
    portable_path,
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


def test_completed_output_replaces_its_own_kind_with_ordinary_permissions(tmp_path, capsys):
    target = tmp_path / "out"
    with output_directory(target, "evaluation", command="grace-hf evaluate") as tmp:
        (tmp / "old.txt").write_text("old")
    assert capsys.readouterr().err == ""  # a new output: nothing to say
    with output_directory(target, "evaluation") as tmp:
        assert (
            "holds a finished evaluation output (grace-hf evaluate); this run replaces it" in capsys.readouterr().err
        )
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
        ("other-kind", "exists and is a grace_hf model output, not a complete evaluation output"),
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
    overwrite = case != "other-kind"  # --overwrite lifts only the "another kind of output" refusal
    with pytest.raises(GraceInputError, match=message):
        with output_directory(target, "evaluation", inputs=["inputs/images.json"], overwrite=overwrite) as tmp:
            (tmp / "metrics.json").write_text("{}")
    assert _tree(tmp_path) == before


def _evaluation(target, **files):
    with output_directory(target, "evaluation") as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _forged(target, source):
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    shutil.copy(source / MARKER_FILE, target / MARKER_FILE)


def _linked(target, source):
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    os.symlink(source / MARKER_FILE, target / MARKER_FILE)


def _extra_files(target, source):
    _evaluation(target, **{"metrics.json": "{}"})
    (target / "notes.txt").write_text("mine")
    (target / "extra").mkdir()
    (target / "extra" / "draft.md").write_text("mine too")


def _changed(target, source):
    _evaluation(target, **{"metrics.json": "{}"})
    (target / "metrics.json").write_text('{"edited": "by the user"}')


def _older(target, source):
    target.mkdir()
    (target / "metrics.json").write_text("{}")
    (target / MARKER_FILE).write_text(json.dumps({"kind": "evaluation", "complete": True}))


def _nested_marker(target, source):
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    (target / MARKER_FILE).write_text("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize(
    "make, message",
    [
        (_forged, r"files are not those its marker lists \(metrics.json\)"),
        (_linked, "is not a grace_hf output"),
        (_extra_files, "also holds files grace_hf did not write: extra/draft.md, notes.txt"),
        (_changed, r"files are not those its marker lists \(metrics.json\)"),
        (_older, "whose marker lists no files"),
        (_nested_marker, "is not a grace_hf output"),
    ],
    ids=["forged-marker", "linked-marker", "extra-files", "changed-file", "older-marker", "nested-marker"],
)
def test_only_what_grace_hf_wrote_is_replaced_even_with_overwrite(make, message, tmp_path):
    _evaluation(tmp_path / "genuine", **{"metrics.json": "{}"})
    make(tmp_path / "target", tmp_path / "genuine")
    before = _tree(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(GraceInputError, match=message + ".*nothing was deleted"):
            _evaluation(tmp_path / "target", **{"new.txt": "new"}) if not overwrite else None
            with output_directory(tmp_path / "target", "model", overwrite=True) as tmp:
                (tmp / "new.txt").write_text("new")
        assert _tree(tmp_path) == before


def test_replacing_removes_exactly_the_listed_files(tmp_path):
    _evaluation(tmp_path / "out", **{"metrics.json": "{}", "logs/a.txt": "a", "logs/deep/b.txt": "b"})
    _evaluation(tmp_path / "out", **{"new.txt": "new"})
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [MARKER_FILE, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no build directory, no lock left beside it


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_rerun_leaves_the_old_output_byte_for_byte(signum, tmp_path):
    _evaluation(tmp_path / "out", **{"metrics.json": "{}"})
    before = _tree(tmp_path)
    script = (
        "import sys, time\n"
        "from grace_hf.commands.cli import _sigterm_interrupts\n"
        "from grace_hf.outputs import output_directory\n"
        "with _sigterm_interrupts(), output_directory(sys.argv[1], 'evaluation') as tmp:\n"
        "    (tmp / 'half.txt').write_text('half'); print('started', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE)
    assert process.stdout.readline() == b"started\n"
    process.send_signal(signum)
    process.wait(timeout=60)
    after = _tree(tmp_path)
    if signum == signal.SIGKILL:  # no clean-up: the build directory and the lock file stay, the next run removes them
        assert {name for name in after.keys() - before.keys() if "/" not in name} == {
            ".out.grace-partial",
            ".out.grace-lock",
        }
        _evaluation(tmp_path / "out", **{"metrics.json": "{}"})
        after = _tree(tmp_path)
    assert after == before


def test_one_writer_per_output_names_the_first_process(tmp_path):
    first = begin_output(tmp_path / "out", "model")
    with pytest.raises(GraceInputError, match=f"another grace_hf run \\(process {os.getpid()}\\) is writing it"):
        begin_output(tmp_path / "out", "model")
    first.abandon()
    begin_output(tmp_path / "out", "model").abandon()  # released
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "path, message",
    [
        ("/", "is / or a directory directly under it"),
        ("/etc", "is / or a directory directly under it"),
        ("/etc/grace", "is a system directory"),
        ("/usr/local/share/grace", "is a system directory"),
        ("/var/lib/grace", "is a system directory"),
        ("~/.ssh", "is in the dot-folder"),
        ("~/.cache/grace", "is in the dot-folder"),
        ("checkout", "is the root of a git checkout"),
    ],
)
def test_system_home_and_checkout_paths_are_refused_whatever_the_flags(path, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "checkout" / ".git").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "checkout")
    with pytest.raises(GraceInputError, match=message):
        check_output_dir(tmp_path / path if path == "checkout" else path, "evaluation", overwrite=True)
    assert check_output_dir(tmp_path / "checkout" / "runs" / "x", "evaluation") == tmp_path / "checkout/runs/x"
    assert check_output_dir("/var/tmp/grace-x", "evaluation") == Path("/var/tmp/grace-x")


def test_no_input_is_an_output_by_real_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgstore" / "images").mkdir(parents=True)
    os.symlink(tmp_path / "imgstore", tmp_path / "root")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("seed: 0")
    for output, inputs, message in (
        ("imgstore", ["root"], "holds the input root"),  # the image root's symlink target
        ("imgstore/prepared", ["root"], "is inside the input root"),
        ("recipes", ["recipes/r.yaml"], "holds the input recipes/r.yaml"),
        ("dense", ["dense"], "holds the input dense"),
    ):
        (tmp_path / output).mkdir(exist_ok=True)
        with pytest.raises(GraceInputError, match=message):
            check_output_dir(output, "evaluation", inputs, overwrite=True)


def test_a_name_too_long_to_build_beside_is_refused(tmp_path):
    with pytest.raises(GraceInputError, match="name is too long"):
        check_output_dir(tmp_path / ("x" * 250), "evaluation")


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


def test_long_jobs_keep_an_unfinished_run_beside_the_old_output(tmp_path):
    _evaluation(tmp_path / "run", **{"old.txt": "old"})
    run = begin_output(tmp_path / "run", "evaluation", resumable=True)
    assert run.build == build_path(tmp_path / "run") and read_marker(run.build)["complete"] is False
    (run.build / "checkpoints").mkdir()
    (run.build / "checkpoints" / "step-1").write_text("state")
    run.abandon(keep=True)  # killed
    assert (tmp_path / "run" / "old.txt").read_text() == "old"
    with pytest.raises(GraceInputError, match="unfinished run left checkpoints in .*; resume it"):
        begin_output(tmp_path / "run", "evaluation", resumable=True)
    run = begin_output(tmp_path / "run", "evaluation", resumable=True, resume=True)
    assert (run.build / "checkpoints" / "step-1").is_file()  # resuming keeps what is there
    run.commit()
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == [MARKER_FILE, "checkpoints", "step-1"]
    assert read_marker(tmp_path / "run")["files"] == {"checkpoints/step-1": 5}
    with pytest.raises(GraceInputError, match="no unfinished evaluation run to resume"):
        begin_output(tmp_path / "nothing", "evaluation", resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_portable_path_names_the_build_from_inside_it_and_leaves_the_rest_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build = build_path("demo")  # relative, as `make demo` gives it: .demo.grace-partial
    (build / "dense").mkdir(parents=True)
    assert portable_path(build / "dense", build / "model") == "../dense"
    assert portable_path(str((build / "dense").resolve()), (build / "model").resolve()) == "../dense"
    for other in ("data/prepared", str(tmp_path / "elsewhere"), "user/hub-dataset", "cosine"):
        assert portable_path(other, build / "model") == other
    assert portable_path("dense", "runs/model") == "dense"  # an output outside any build


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
    main = importlib.import_module(f"benchmarks.{script}").main
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
    assert "exists and is not a grace_hf output; nothing was deleted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--work-dir", str(tmp_path / "new"), "--reuse"])
    assert "no unfinished benchmark run to resume" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine", "notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep"
