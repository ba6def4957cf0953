"""Shared test set-up: offline, deterministic, small."""

import os

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


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared 24-image synthetic dataset with structured identifiers (for the training tests)."""
    from grace_hf.data.synthetic import write_synthetic
    from grace_hf.training.preparation import (
        prepare,  # imported here: HF_HUB_OFFLINE must be set before huggingface_hub loads
    )

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root / "raw", num_images=24, seed=0)
    prepare(
        root / "raw" / "dataset_synthetic.json",
        root / "raw",
        "structured",
        root / "prepared",
        pseudo_queries=root / "raw" / "pseudo_queries.json",
        pixel_features=True,
    )
    return root / "prepared"


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """A tiny GRACE model trained for a few steps on 60 synthetic images (structured identifiers; 6 test images with
    30 test captions): `(model directory, prepared dataset, image root)`."""
    from test_training import run_training, tiny_recipe, write_recipe

    from grace_hf.data.synthetic import write_synthetic
    from grace_hf.training.preparation import prepare

    root = tmp_path_factory.mktemp("trained")
    write_synthetic(root / "raw", num_images=60, seed=0)
    data = root / "prepared"
    prepare(
        root / "raw" / "dataset_synthetic.json",
        root / "raw",
        "structured",
        data,
        pseudo_queries=root / "raw" / "pseudo_queries.json",
        pixel_features=True,
    )
    recipe = tiny_recipe(data, root / "model", max_steps=10, save_steps=0, eval_num_queries=0)
    run_training(["--config", write_recipe(root / "recipe.yaml", recipe)])
    return root / "model", data, root / "raw"
