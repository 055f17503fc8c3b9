"""Shared fixtures; the helpers themselves live in tools/kit.py (the benches use them too)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.kit import (OFFLINE_ENV, REPO, SHIPPED_MNIST, assert_clean_failure, build_tiny_pipeline,  # noqa: E402,F401
                       import_script, result_json, run_script, write_mnist_subset, write_palette)

# CPU always; CUDA too when the runner has it (the user's CI runs these on GPU runners).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or runs a script for more than a few seconds; "
                                       "`pytest -m 'not slow' tests` is the fast tier")


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A data root with 512 train + 256 test real digits (the shipped subset is class-interleaved)."""
    return write_mnist_subset(tmp_path_factory.mktemp("mnist"), 512, 256)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """quest_7_2's model: a tiny random SD v1.x pipeline saved with save_pretrained, as a user's local folder looks."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def palette(tmp_path_factory):
    """quest_7_2's dataset: a folder of four small uncaptioned images."""
    return write_palette(tmp_path_factory.mktemp("palette") / "images")


@pytest.fixture
def one_thread():
    """In-process inference on one thread, for the same reason as the subprocesses'; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def message(exit_info):
    """The one line a SystemExit raised in-process would print."""
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    return text
