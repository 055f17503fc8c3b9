"""Shared fixtures; the helpers themselves live in tools/kit.py (the benches use them too)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.kit import (OFFLINE_ENV, REPO, SHIPPED_MNIST, assert_clean_failure, import_script,  # noqa: E402,F401
                       result_json, run_script, write_mnist_subset)

# CPU always; CUDA too when the runner has it (the user's CI runs these on GPU runners).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or runs a script for more than a few seconds; "
                                       "`pytest -m 'not slow' tests` is the fast tier")


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A data root with 512 train + 256 test real digits (the shipped subset is class-interleaved)."""
    return write_mnist_subset(tmp_path_factory.mktemp("mnist"), 512, 256)
