"""Shared test set-up: offline, deterministic, small; and the factory fixtures the modules share.

The factories cache what they build for the session: treat it as read-only, and copy it (`shutil.copytree`) before
changing anything in it."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tests' tensors are tiny: a second thread gains nothing and, on a busy 2-core machine, costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cached(tmp_path_factory, prefix: str, build: Callable[..., None]) -> Callable[..., Path]:
    """A factory: the directory `build(directory, *key)` writes, built once per distinct key in the session."""
    built: dict[tuple, Path] = {}

    def make(*key) -> Path:
        if key not in built:
            directory = tmp_path_factory.mktemp(prefix) / "data"
            build(directory, *key)
            built[key] = directory
        return built[key]

    return make


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Callable[..., Path]:
    """`synthetic(num_images=24, seed=0)`: a `grace-hf synthetic` directory (dataset_synthetic.json,
    oracle_pseudo_queries.json, images/). Shared: copy it before changing it."""
    from grace_hf.data.synthetic import write_synthetic  # imported here: HF_HUB_OFFLINE is set before the Hub loads

    make = _cached(
        tmp_path_factory,
        "synthetic",
        lambda out, n, seed: write_synthetic(out, n, seed, num_workers=1, oracle_pseudo_queries=True),
    )
    return lambda num_images=24, seed=0: make(num_images, seed)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, synthetic) -> Callable[..., Path]:
    """`prepared(kind="structured", num_images=24, seed=0, **options)`: the synthetic set of that size prepared with
    `kind` identifiers (with its pseudo-queries; structured and rq from pixel features unless `options` say
    otherwise). Shared: copy it before changing it."""
    from grace_hf.data.synthetic import ORACLE_PSEUDO_QUERIES_JSON, SYNTHETIC_JSON
    from grace_hf.training.preparation import prepare

    def build(out: Path, kind: str, num_images: int, seed: int, options: tuple) -> None:
        raw = synthetic(num_images, seed)
        prepare(raw / SYNTHETIC_JSON, raw, kind, out, pseudo_queries=raw / ORACLE_PSEUDO_QUERIES_JSON, **dict(options))

    make = _cached(tmp_path_factory, "prepared", build)

    def prepared_(kind: str = "structured", num_images: int = 24, seed: int = 0, **options) -> Path:
        if kind in ("structured", "rq"):
            options.setdefault("pixel_features", True)
        return make(kind, num_images, seed, tuple(sorted(options.items())))

    return prepared_


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_model(kind="numeric", query_image="none", seed=0)`: a GRACE model directory with random weights over
    `helpers.IMAGES` (see `helpers.build_tiny_model_dir`). Shared: copy it before changing it."""
    from tests.helpers import build_tiny_model_dir

    make = _cached(tmp_path_factory, "tiny_model", build_tiny_model_dir)
    return lambda kind="numeric", query_image="none", seed=0: make(kind, query_image, seed)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, synthetic, prepared):
    """A tiny GRACE model trained for a few steps on 60 synthetic images (structured identifiers; 6 test images with
    30 test captions): `(model directory, prepared dataset, image root)`."""
    from tests.helpers import run_training, tiny_recipe, write_recipe

    root = tmp_path_factory.mktemp("trained")
    data = prepared("structured", num_images=60)
    recipe = tiny_recipe(data, root / "model", max_steps=10, save_steps=0, eval_num_queries=0)
    run_training(["--config", write_recipe(root / "recipe.yaml", recipe)])
    return root / "model", data, synthetic(60)


@pytest.fixture(scope="session")
def micro_config(tmp_path_factory) -> Path:
    """`helpers.MICRO` as a `--model-config` JSON file for `grace-hf baseline-clip`."""
    import json

    from tests.helpers import MICRO

    path = tmp_path_factory.mktemp("micro") / "micro.json"
    path.write_text(json.dumps(MICRO))
    return path
