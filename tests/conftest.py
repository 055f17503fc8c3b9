"""Shared fixtures: a small root of REAL MNIST digits, a way to run a quest script, device list."""
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MNIST = REPO / "assets" / "mnist-5k" / "MNIST" / "raw"

# CPU always; CUDA too when the runner has it (the user's CI runs these on GPU runners).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# A proxy on a closed local port makes every download fail at once, as on a machine
# that cannot reach the MNIST mirrors (and keeps tests from ever touching the network).
OFFLINE_ENV = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _read_idx(path):
    raw = path.read_bytes()
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return dims, raw[4 + 4 * ndim:]


def _write_idx(path, dims, payload):
    code = 0x08  # unsigned byte, as in MNIST
    path.write_bytes(struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload)


def write_mnist_subset(root, n_train, n_test):
    """Write the first n_train/n_test shipped digits as <root>/MNIST/raw (torchvision's layout)."""
    raw_dir = Path(root) / "MNIST" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        dims, pixels = _read_idx(SHIPPED_MNIST / f"{split}-images-idx3-ubyte")
        _write_idx(raw_dir / f"{split}-images-idx3-ubyte", (n, *dims[1:]), pixels[: n * dims[1] * dims[2]])
        _, labels = _read_idx(SHIPPED_MNIST / f"{split}-labels-idx1-ubyte")
        _write_idx(raw_dir / f"{split}-labels-idx1-ubyte", (n,), labels[:n])
    return Path(root)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A data root with 512 train + 256 test real digits (the shipped subset is class-interleaved)."""
    return write_mnist_subset(tmp_path_factory.mktemp("mnist"), 512, 256)


def import_script(script):
    """A quest script imported as a module, for in-process checks of its parts."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args, cwd, env=None, timeout=600):
    """Run `python <script> args...` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE_ENV, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def result_json(proc):
    """The script's final JSON line (its OutputResult)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


def assert_clean_failure(proc, *words):
    """Non-zero exit, no traceback, and exactly one stderr line that names the problem."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one clear line on stderr, got:\n{proc.stderr}"
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]
