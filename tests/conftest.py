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
