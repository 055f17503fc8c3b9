"""quest_12_2.py (DDPM on MNIST): tiny real runs on a few hundred real digits, and its failure paths."""
import shutil

import pytest
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms.functional import pil_to_tensor

from conftest import DEVICES, assert_clean_failure, import_script, result_json, run_script

SCRIPT = "quest_12_2.py"
TINY = ["--epochs", "1", "--timesteps", "20", "--base-channels", "16", "--batch-size", "64", "--num-samples", "8"]


def grid_size(n_images, nrow, image=32, padding=2):
    """Pixel size of torchvision's save_image grid."""
    rows = -(-n_images // nrow)
    return nrow * (image + padding) + padding, rows * (image + padding) + padding


@pytest.fixture(scope="module", params=DEVICES)
def trained(request, mnist_root, tmp_path_factory):
    """One tiny training run per device: (device, out_dir, result JSON)."""
    work = tmp_path_factory.mktemp(f"ddpm-{request.param}")
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--out-dir", work / "out", "--device", request.param, *TINY,
                      cwd=work)
    return request.param, work / "out", result_json(proc)


def test_tiny_run_writes_grid_trajectory_checkpoint_and_json(trained):
    device, out_dir, result = trained
    assert result["success"] is True
    assert result["fileName"] == "new_creation.png"
    assert result["path"] == str(out_dir / "new_creation.png")
    details = result["details"]
    assert details["device"].startswith(device)
    assert details["epochs"] == 1 and details["timesteps"] == 20 and details["sampler"] == "ddpm"
    assert 0 < details["finalLoss"] < 2 and details["trainImagesPerSecond"] > 0
    with Image.open(out_dir / "new_creation.png") as grid:
        assert grid.size == grid_size(8, nrow=3)
        assert pil_to_tensor(grid).float().std() > 1, "the grid is a flat image"
    with Image.open(out_dir / "trajectory.png") as trajectory:  # 8 samples x 8 points from noise to digit
        assert trajectory.size == grid_size(64, nrow=8)
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["timesteps"] == 20 and checkpoint["epoch"] == 1
    assert set(checkpoint["model"]) == set(checkpoint["ema"])
    assert not list(out_dir.glob("*.tmp"))


def test_sample_only_with_ddim_reuses_the_checkpoint(trained, tmp_path):
    device, out_dir, _ = trained
    proc = run_script(SCRIPT, "--sample-only", "--checkpoint", out_dir / "checkpoint.pt", "--out-dir", tmp_path / "re",
                      "--sampler", "ddim", "--sample-steps", "5", "--num-samples", "4", "--device", device,
                      "--data-dir", tmp_path / "no-data-needed", cwd=tmp_path)
    details = result_json(proc)["details"]
    assert details["sampler"] == "ddim" and details["sampleSteps"] == 5 and details["finalLoss"] is None
    assert details["timesteps"] == 20  # the architecture and schedule come from the checkpoint
    with Image.open(tmp_path / "re" / "new_creation.png") as grid:
        assert grid.size == grid_size(4, nrow=2)
    assert not (tmp_path / "re" / "checkpoint.pt").exists()
    assert not (tmp_path / "no-data-needed").exists()


def test_resume_continues_training_to_the_requested_epochs(trained, mnist_root, tmp_path):
    device, out_dir, _ = trained
    checkpoint = tmp_path / "checkpoint.pt"
    shutil.copy(out_dir / "checkpoint.pt", checkpoint)
    proc = run_script(SCRIPT, "--resume", "--checkpoint", checkpoint, "--data-dir", mnist_root, "--out-dir",
                      tmp_path / "out", "--device", device, "--epochs", "2", "--batch-size", "64",
                      "--num-samples", "4", cwd=tmp_path)
    details = result_json(proc)["details"]
    assert details["epochs"] == 2 and len(details["epochLosses"]) == 1  # only the second epoch ran
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2


def test_same_seed_gives_the_same_digits(trained, mnist_root, tmp_path):
    device, out_dir, first = trained
    if device != "cpu":
        pytest.skip("bit-exact reproducibility is checked on CPU")
    again = result_json(run_script(SCRIPT, "--data-dir", mnist_root, "--out-dir", tmp_path / "again", *TINY,
                                   "--device", "cpu", cwd=tmp_path))
    assert again["details"]["finalLoss"] == first["details"]["finalLoss"]
    assert (tmp_path / "again" / "new_creation.png").read_bytes() == (out_dir / "new_creation.png").read_bytes()
    other = result_json(run_script(SCRIPT, "--data-dir", mnist_root, "--out-dir", tmp_path / "other", *TINY,
                                   "--device", "cpu", "--seed", "1", cwd=tmp_path))
    assert other["details"]["finalLoss"] != first["details"]["finalLoss"]


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_unreachable_download_fails_cleanly(tmp_path, dataset, folder):
    proc = run_script(SCRIPT, "--dataset", dataset, "--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "out",
                      *TINY, cwd=tmp_path)
    line = assert_clean_failure(proc, "could not be downloaded", "--data-dir", f"{folder}/raw")
    assert line.startswith("error:")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_fails_cleanly(mnist_root, tmp_path):
    proc = run_script(SCRIPT, "--device", "cuda", "--data-dir", mnist_root, "--out-dir", tmp_path / "out", *TINY,
                      cwd=tmp_path)
    assert_clean_failure(proc, "CUDA is not available", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_sample_only_without_a_checkpoint_fails_cleanly(tmp_path):
    proc = run_script(SCRIPT, "--sample-only", "--out-dir", tmp_path / "out", cwd=tmp_path)
    assert_clean_failure(proc, "no checkpoint", "checkpoint.pt")
    assert not (tmp_path / "out").exists()


def test_preprocessing_equals_the_spec_transform_pipeline(mnist_root):
    """The on-device tensor pipeline must match Resize(32) -> ToTensor -> Normalize(0.5, 0.5) on PIL images."""
    preprocess = import_script(SCRIPT).preprocess

    spec = transforms.Compose([transforms.Resize(32), transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = datasets.MNIST(root=mnist_root, train=True, download=False, transform=spec)
    expected = torch.stack([dataset[i][0] for i in range(32)])
    ours = preprocess(dataset.data[:32])
    assert ours.shape == expected.shape == (32, 1, 32, 32)
    assert ours.min() >= -1 and ours.max() <= 1
    # PIL and torchvision's tensor resize may round one grey level apart (2/255 in [-1, 1] units).
    assert (ours - expected).abs().max() <= 2 / 255 + 1e-6
    assert (ours - expected).abs().mean() < 1e-3
