"""quest_12_2.py (DDPM on MNIST): tiny real runs on a few hundred real digits, and its failure paths."""
import shutil

import pytest
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms.functional import pil_to_tensor

from conftest import DEVICES, assert_clean_failure, import_script, result_json, run_script
from tools.kit import FullDiskFile, interrupt_script

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
    assert details["guidance"] == 2.0 and details["eta"] is None  # guided by the checkpoint's guide weights
    assert 0 < details["finalLoss"] < 2 and details["trainImagesPerSecond"] > 0
    with Image.open(out_dir / "new_creation.png") as grid:
        assert grid.size == grid_size(8, nrow=3)
        assert pil_to_tensor(grid).float().std() > 1, "the grid is a flat image"
    with Image.open(out_dir / "trajectory.png") as trajectory:  # 8 samples x 8 points from noise to digit
        assert trajectory.size == grid_size(64, nrow=8)
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["timesteps"] == 20 and checkpoint["epoch"] == 1
    assert checkpoint["config"]["base_channels"] == 16 and checkpoint["config"]["channel_mult"] == [1, 2, 4]
    assert set(checkpoint["model"]) == set(checkpoint["ema"])
    # autoguidance's weaker model: the EMA a quarter into training (epoch 1 of 1 here, so the EMA itself)
    assert set(checkpoint["guide"]) == set(checkpoint["ema"])
    assert all(torch.equal(checkpoint["guide"][k], checkpoint["ema"][k]) for k in checkpoint["ema"])
    assert not list(out_dir.glob("*.tmp")) and not list(out_dir.glob(".*.tmp"))
    assert details["betaSchedule"] == "linear-scaled"


def test_sample_only_with_ddim_reuses_the_checkpoint(trained, tmp_path):
    device, out_dir, _ = trained
    proc = run_script(SCRIPT, "--sample-only", "--checkpoint", out_dir / "checkpoint.pt", "--out-dir", tmp_path / "re",
                      "--sampler", "ddim", "--sample-steps", "5", "--num-samples", "4", "--device", device,
                      "--data-dir", tmp_path / "no-data-needed", cwd=tmp_path)
    details = result_json(proc)["details"]
    assert details["sampler"] == "ddim" and details["sampleSteps"] == 5 and details["finalLoss"] is None
    assert details["guidance"] == 2.0 and details["eta"] == 1.0
    assert details["timesteps"] == 20  # the architecture and schedule come from the checkpoint
    with Image.open(tmp_path / "re" / "new_creation.png") as grid:
        assert grid.size == grid_size(4, nrow=2)
    assert not (tmp_path / "re" / "checkpoint.pt").exists()
    assert not (tmp_path / "no-data-needed").exists()


def test_a_checkpoint_without_guide_weights_samples_plainly_and_says_so(trained, tmp_path):
    device, out_dir, _ = trained
    checkpoint = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    del checkpoint["guide"]  # as written before autoguidance, or by a run stopped before its guide epoch
    torch.save(checkpoint, tmp_path / "old.pt")
    args = ["--sample-only", "--checkpoint", tmp_path / "old.pt", "--sampler", "ddim", "--sample-steps", "5",
            "--num-samples", "4", "--device", device]
    proc = run_script(SCRIPT, *args, "--out-dir", tmp_path / "old", cwd=tmp_path)
    assert result_json(proc)["details"]["guidance"] == 1.0
    assert "holds no guide weights" in proc.stdout
    plain = run_script(SCRIPT, *args, "--out-dir", tmp_path / "plain", "--guidance", "1", cwd=tmp_path)
    assert "holds no guide weights" not in plain.stdout
    assert (tmp_path / "old" / "new_creation.png").read_bytes() == (tmp_path / "plain" / "new_creation.png").read_bytes()


@pytest.mark.parametrize("damage", ["wrong shape", "not weights", "nan"])
def test_broken_guide_weights_fail_in_one_line_and_guidance_1_still_samples(trained, tmp_path, damage):
    device, out_dir, _ = trained
    checkpoint = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    if damage == "wrong shape":
        checkpoint["guide"][next(iter(checkpoint["guide"]))] = torch.zeros(3)
    elif damage == "not weights":
        checkpoint["guide"] = None
    else:  # loads fine, samples NaN: no black grid may be saved and called a success
        checkpoint["guide"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                               for k, v in checkpoint["guide"].items()}
    torch.save(checkpoint, tmp_path / "broken.pt")
    args = ["--sample-only", "--checkpoint", tmp_path / "broken.pt", "--num-samples", "4", "--device", device]
    proc = run_script(SCRIPT, *args, "--out-dir", tmp_path / "out", cwd=tmp_path)
    assert_clean_failure(proc, "guide", "--guidance 1")
    assert "success" not in proc.stdout and not (tmp_path / "out" / "new_creation.png").exists()
    plain = run_script(SCRIPT, *args, "--out-dir", tmp_path / "plain", "--guidance", "1", cwd=tmp_path)
    assert result_json(plain)["details"]["guidance"] == 1.0


def test_resume_continues_training_to_the_requested_epochs(trained, mnist_root, tmp_path):
    device, out_dir, _ = trained
    checkpoint = tmp_path / "checkpoint.pt"
    shutil.copy(out_dir / "checkpoint.pt", checkpoint)
    proc = run_script(SCRIPT, "--resume", "--checkpoint", checkpoint, "--data-dir", mnist_root, "--out-dir",
                      tmp_path / "out", "--device", device, "--epochs", "2", "--batch-size", "64",
                      "--num-samples", "4", "--channel-mult", "1,1,2", "--timesteps", "20", cwd=tmp_path)
    details = result_json(proc)["details"]
    assert details["epochs"] == 2 and len(details["epochLosses"]) == 1  # only the second epoch ran
    # the weights fix the architecture: a different width is reported and ignored, an equal one is not mentioned
    assert "keeps the checkpoint's --channel-mult 1,2,4" in proc.stdout and "--timesteps" not in proc.stdout
    resumed = torch.load(checkpoint, weights_only=True)
    assert resumed["epoch"] == 2
    # the guide was taken once, at epoch 1 (a quarter of 1); resuming keeps it rather than the newer EMA
    before = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert resumed["guide_epoch"] == 1
    assert all(torch.equal(resumed["guide"][k], before["guide"][k]) for k in before["guide"])
    assert any(not torch.equal(resumed["guide"][k], resumed["ema"][k]) for k in resumed["ema"])


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
    assert_clean_failure(proc, "--device cuda", "not available", "--device cpu")
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


# ---------------------------------------------------------------- the schedule and the samplers (issue 15)
def test_default_schedule_ends_in_pure_noise_and_the_spec_schedule_is_one_flag_away():
    quest = import_script(SCRIPT)
    default = quest.NoiseSchedule(300, torch.device("cpu"))
    assert default.alphas_cumprod[-1] < 1e-3, "x_T still holds the digit: sampling would start from a state never trained"
    literal = quest.NoiseSchedule(300, torch.device("cpu"), "linear")
    assert torch.allclose(literal.betas, torch.linspace(1e-4, 0.02, 300))
    assert literal.alphas_cumprod[-1] > 0.04  # the spec's end points at T=300 leave 0.22 * x0 in x_T
    cosine = quest.NoiseSchedule(300, torch.device("cpu"), "cosine")
    assert cosine.alphas_cumprod[-1] < 1e-3 and (cosine.betas > 0).all() and (cosine.betas < 1).all()
    args = quest.parse_args([])
    assert args.beta_schedule == "linear-scaled" and args.timesteps == 300 and args.epochs == 20
    assert args.batch_size == 128 and quest.parse_args(["--beta-schedule", "linear"]).beta_schedule == "linear"


@pytest.fixture(scope="module")
def tiny_model():
    quest = import_script(SCRIPT)
    torch.manual_seed(0)
    return quest, quest.SimpleUNet(base_channels=8), quest.NoiseSchedule(20, torch.device("cpu"))


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_chunked_sampling_gives_the_same_images_as_one_pass(tiny_model, sampler, eta):
    quest, model, schedule = tiny_model
    cpu = torch.device("cpu")
    whole, _, _ = quest.sample(model, schedule, 10, sampler, 5, cpu, batch_size=10, seed=3, eta=eta)
    chunked, _, _ = quest.sample(model, schedule, 10, sampler, 5, cpu, batch_size=4, seed=3, eta=eta)
    assert whole.shape == (10, 1, 32, 32)
    # the same random draws; only the batch size of the convolutions differs (float rounding)
    assert torch.allclose(whole, chunked, atol=1e-4), (whole - chunked).abs().max()
    other, _, _ = quest.sample(model, schedule, 10, sampler, 5, cpu, batch_size=10, seed=4, eta=eta)
    assert not torch.allclose(whole, other)


class Constant(torch.nn.Module):
    """A stand-in UNet that predicts the same noise value everywhere."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, t):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_extrapolates_away_from_the_guide_and_1_is_plain_sampling(tiny_model, sampler):
    quest, model, schedule = tiny_model
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    weaker = quest.SimpleUNet(base_channels=8)
    plain, _, _ = quest.sample(model, schedule, 6, sampler, 5, cpu, seed=3)
    off, _, _ = quest.sample(model, schedule, 6, sampler, 5, cpu, seed=3, guide=weaker, guidance=1.0)
    assert torch.equal(plain, off)  # --guidance 1: the spec's sampling, the guide is not even run
    itself, _, _ = quest.sample(model, schedule, 6, sampler, 5, cpu, seed=3, guide=model, guidance=2.0)
    assert torch.allclose(plain, itself, atol=1e-5)  # eps_g + w (eps - eps_g) = eps when the guide is the model
    guided, _, _ = quest.sample(model, schedule, 6, sampler, 5, cpu, seed=3, guide=weaker, guidance=2.0)
    assert not torch.allclose(plain, guided, atol=1e-3)
    assert guided.min() >= -1 and guided.max() <= 1 and torch.isfinite(guided).all()
    # the combination itself: models that predict constants a (main) and b (guide) act as one predicting b + w (a - b)
    a, b, w = 0.3, -0.1, 2.5
    pushed, _, _ = quest.sample(Constant(a), schedule, 6, sampler, 5, cpu, seed=3, guide=Constant(b), guidance=w)
    expected, _, _ = quest.sample(Constant(b + w * (a - b)), schedule, 6, sampler, 5, cpu, seed=3)
    assert torch.allclose(pushed, expected, atol=1e-5)
    assert quest.guide_epoch(30) == 8 and quest.guide_epoch(20) == 5 and quest.guide_epoch(1) == 1


def test_ddim_stays_in_range_and_rederives_the_noise_from_the_clamped_x0(tiny_model):
    quest, model, schedule = tiny_model
    images, snapshots, steps = quest.sample(model, schedule, 6, "ddim", 10, torch.device("cpu"))
    assert steps == 10 and len(snapshots) == quest.TRAJECTORY_POINTS
    assert images.min() >= -1 and images.max() <= 1 and torch.isfinite(images).all()
    # one step from t to t_prev with a wild noise guess: the x0 it lands on is the clamped one, exactly
    x = torch.randn(2, 1, 32, 32)
    wild = 50 * torch.randn_like(x)
    t, t_prev = 10, 5
    ab, ab_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
    x0 = ((x - (1 - ab).sqrt() * wild) / ab.sqrt()).clamp(-1, 1)
    x_prev = schedule.ddim_step(x, wild, t, t_prev)
    noise = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    assert torch.allclose(x_prev, ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * noise, atol=1e-5)
    assert torch.allclose(schedule.ddim_step(x, wild, t, -1), x0, atol=1e-5)  # the last step returns the clamped x0


def test_ddim_eta_adds_the_posterior_noise_and_0_is_deterministic(tiny_model):
    quest, model, schedule = tiny_model
    cpu = torch.device("cpu")
    x, eps, fresh = torch.randn(3, 2, 1, 32, 32)
    t, t_prev = 10, 5
    ab, ab_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
    deterministic = schedule.ddim_step(x, eps, t, t_prev)
    assert torch.equal(schedule.ddim_step(x, eps, t, t_prev, 0.0, fresh), deterministic)
    stochastic = schedule.ddim_step(x, eps, t, t_prev, 1.0, fresh)
    without_fresh = schedule.ddim_step(x, eps, t, t_prev, 1.0, torch.zeros_like(fresh))
    sigma = ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()  # eta 1: the DDPM posterior's deviation
    assert torch.allclose(stochastic - without_fresh, sigma * fresh, atol=1e-5)
    x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
    rederived = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # the noise kept shrinks so the variance stays 1 - ab_prev
    assert torch.allclose(without_fresh, ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).sqrt() * rederived, atol=1e-5)
    last = schedule.ddim_step(x, eps, t, -1, 1.0, fresh)
    assert torch.allclose(last, schedule.ddim_step(x, eps, t, -1), atol=1e-6)  # no noise after the last step: x0
    once, _, _ = quest.sample(model, schedule, 6, "ddim", 5, cpu, seed=3, eta=1.0)
    again, _, _ = quest.sample(model, schedule, 6, "ddim", 5, cpu, seed=3, eta=1.0)
    plain, _, _ = quest.sample(model, schedule, 6, "ddim", 5, cpu, seed=3, eta=0.0)
    assert torch.equal(once, again) and not torch.allclose(once, plain, atol=1e-3)  # seeded, and noise was added
    assert once.min() >= -1 and once.max() <= 1 and torch.isfinite(once).all()


# ---------------------------------------------------------------- faults lose nothing (issue 9)
@pytest.mark.parametrize("flags, words", [
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "-1"], ["--lr", "above 0"]),
    (["--ema-decay", "nan"], ["--ema-decay", "[0, 1)"]),
    (["--ema-decay", "1"], ["--ema-decay", "[0, 1)"]),
    (["--guidance", "0"], ["--guidance", "above 0"]),
    (["--eta", "1.5"], ["--eta", "[0, 1]"]),
    (["--base-channels", "12"], ["--base-channels", "multiple of 8"]),
    (["--channel-mult", "1,2"], ["--channel-mult", "three positive integers"]),
    (["--channel-mult", "1,0,2"], ["--channel-mult", "three positive integers"]),
    (["--epochs", "0"], ["--epochs", ">= 1"]),
    (["--snr-gamma", "inf"], ["--snr-gamma"]),
    (["--device", "tpu"], ["--device", "invalid choice"]),
])
def test_bad_numbers_fail_in_one_line_before_any_work(tmp_path, flags, words):
    proc = run_script(SCRIPT, "--data-dir", tmp_path / "no-data", "--out-dir", tmp_path / "out", *flags, cwd=tmp_path)
    assert_clean_failure(proc, *words)
    assert "usage:" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "no-data").exists()


@pytest.mark.parametrize("where", ["file", "under-a-file", "proc"])
def test_unwritable_output_fails_before_training(mnist_root, tmp_path, where):
    (tmp_path / "a-file").write_text("not a folder")
    out = {"file": tmp_path / "a-file", "under-a-file": tmp_path / "a-file" / "out", "proc": "/proc/out"}[where]
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--out-dir", out, *TINY, cwd=tmp_path)
    assert_clean_failure(proc, "--out-dir")
    assert "epoch" not in proc.stdout  # nothing was trained


def test_a_checkpoint_that_is_a_folder_or_foreign_fails_in_one_line(mnist_root, tmp_path):
    (tmp_path / "ckpt").mkdir()
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--checkpoint", tmp_path / "ckpt", "--out-dir", tmp_path / "o",
                      *TINY, cwd=tmp_path)
    assert_clean_failure(proc, "is a folder")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    proc = run_script(SCRIPT, "--sample-only", "--checkpoint", tmp_path / "foreign.pt", "--out-dir", tmp_path / "o",
                      cwd=tmp_path)
    assert_clean_failure(proc, "not a quest_12_2 checkpoint")
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 half a zip")
    proc = run_script(SCRIPT, "--resume", "--checkpoint", tmp_path / "truncated.pt", "--data-dir", mnist_root,
                      "--out-dir", tmp_path / "o", cwd=tmp_path)
    assert_clean_failure(proc, "truncated.pt")


@pytest.mark.parametrize("damage", ["truncate", "bad-magic"])
def test_corrupt_mnist_files_are_called_corrupt_and_named(mnist_root, tmp_path, damage):
    root = tmp_path / "data"
    shutil.copytree(mnist_root, root)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw = images.read_bytes()
    images.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00\x00\x09\x03" + raw[4:])
    proc = run_script(SCRIPT, "--data-dir", root, "--out-dir", tmp_path / "out", *TINY, cwd=tmp_path)
    assert_clean_failure(proc, "corrupt", "train-images-idx3-ubyte")


def test_divergence_stops_without_success_or_nan_and_keeps_the_earlier_checkpoint(trained, mnist_root, tmp_path):
    device, out_dir, _ = trained
    checkpoint = tmp_path / "checkpoint.pt"
    shutil.copy(out_dir / "checkpoint.pt", checkpoint)
    before = checkpoint.read_bytes()
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--out-dir", tmp_path / "out", "--checkpoint", checkpoint,
                      *TINY, "--lr", "1e6", "--lr-schedule", "constant", "--device", device, cwd=tmp_path)
    assert_clean_failure(proc, "diverged", "--lr")
    assert "NaN" not in proc.stdout and '"success": true' not in proc.stdout
    assert checkpoint.read_bytes() == before, "a diverged run wrote over the earlier checkpoint"
    assert not (tmp_path / "out" / "new_creation.png").exists()


def test_ctrl_c_keeps_the_finished_epochs_and_resume_continues(mnist_root, tmp_path):
    """A real SIGINT in the middle of epoch 2: one line, exit 130, the epoch-1 checkpoint intact and resumable."""
    args = ["--data-dir", mnist_root, "--out-dir", tmp_path / "out", "--epochs", "50", "--timesteps", "20",
            "--base-channels", "8", "--batch-size", "16", "--num-samples", "4", "--device", "cpu"]
    proc = interrupt_script(SCRIPT, *args, ready="epoch 1/50", cwd=tmp_path)  # the epoch-1 checkpoint is on disk
    assert proc.returncode == 130, proc.stderr
    assert "--resume" in assert_clean_failure(proc, "interrupted")
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] >= 1
    assert not list((tmp_path / "out").glob(".*.tmp"))
    proc = run_script(SCRIPT, "--resume", *args[:4], "--epochs", str(checkpoint["epoch"] + 1), "--batch-size", "16",
                      "--num-samples", "4", "--device", "cpu", cwd=tmp_path)
    assert result_json(proc)["details"]["epochs"] == checkpoint["epoch"] + 1


def test_a_full_disk_leaves_no_temp_file_and_the_old_file_intact(tmp_path, monkeypatch):
    quest = import_script(SCRIPT)
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"the good old checkpoint")
    monkeypatch.setattr(quest, "open", FullDiskFile, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        quest.write_atomically(target, b"x" * 1000)
    assert "disk is full" in str(exit_info.value) and str(target) in str(exit_info.value)
    assert target.read_bytes() == b"the good old checkpoint"
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint.pt"]
