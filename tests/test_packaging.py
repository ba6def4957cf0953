"""A plain (non-editable) install carries what `grace-hf demo` needs: the synthetic recipes as package data."""

import subprocess
import sys
import zipfile
from pathlib import Path

from grace_hf.commands.demo import RECIPES

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_synthetic_recipes(tmp_path):
    source = tmp_path / "source"  # build from a copy of the tracked files: the build writes next to its sources
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (ROOT / name).is_file() and not (ROOT / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("grace_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(path.name for path in RECIPES.glob("*.yaml"))
    assert {"structured.yaml", "rq.yaml"} <= set(recipes)
    assert {f"grace_hf/recipes/synthetic/{name}" for name in recipes} <= names
    assert "grace_hf/commands/demo.py" in names
