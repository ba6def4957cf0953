"""Atomic output and JSON input: no half-written results, ordinary permissions, errors that name the file."""

import os
import stat

import pytest

from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_directory, atomic_write_json, read_json


def test_failed_directory_leaves_nothing_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]


def test_completed_directory_replaces_the_old_one_with_ordinary_permissions(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        atomic_write_json(tmp / "metrics.json", {"recall@1": 0.5})
    assert sorted(p.name for p in target.iterdir()) == ["metrics.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((target / "metrics.json").stat().st_mode) == 0o666 & ~umask
    assert read_json(target / "metrics.json") == {"recall@1": 0.5}


def test_read_json_names_the_file_and_what_it_is(tmp_path):
    with pytest.raises(GraceInputError, match=r"missing\.json: metrics file not found"):
        read_json(tmp_path / "missing.json", "metrics file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GraceInputError, match=r"bad\.json: not valid JSON"):
        read_json(bad)
