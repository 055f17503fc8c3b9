"""quest_12_2.py (DDPM on MNIST): its parts in-process (flags, samplers, checkpoint checks; the fast tier), tiny real
runs on a few hundred real digits, and real faults (signals, damaged files) in a subprocess (`slow`)."""
import json
import os
import shutil
import signal

import pytest
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms.functional import pil_to_tensor

from conftest import DEVICES, OFFLINE_ENV, assert_clean_failure, import_script, result_json, run_script
from tools.kit import FullDiskFile, interrupt_script, stop_while_starting

SCRIPT = "quest_12_2.py"
TINY = ["--epochs", "1", "--timesteps", "20", "--base-channels", "16", "--batch-size", "64", "--num-samples", "8"]


@pytest.fixture(scope="module")
def quest():
    return import_script(SCRIPT)


def one_line_error(call, *words):
    """`call` ends the way every fault of the script does: a SystemExit whose text is one 'error: ...' line."""
    with pytest.raises(SystemExit) as stopped:
        call()
    line = str(stopped.value.code)
    assert line.startswith("error:") and "\n" not in line, line
    for word in words:
        assert word.lower() in line.lower(), line
    return line


def run_main(quest, capsys, *argv):
    """main() in-process, as the command line would call it; returns the JSON result line."""
    quest.main([str(arg) for arg in argv])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def grid_size(n_images, nrow, image=32, padding=2):
    """Pixel size of torchvision's save_image grid."""
    rows = -(-n_images // nrow)
    return nrow * (image + padding) + padding, rows * (image + padding) + padding


# ---------------------------------------------------------------- flags: one line each, before any work (fast)
@pytest.mark.parametrize("flags, words", [
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "-1"], ["--lr", "above 0"]),
    (["--ema-decay", "nan"], ["--ema-decay", "[0, 1)"]),
    (["--ema-decay", "1"], ["--ema-decay", "[0, 1)"]),
    (["--guidance", "0"], ["--guidance", "(0, 100]"]),
    (["--eta", "1.5"], ["--eta", "[0, 1]"]),
    (["--channel-mult", "1,2"], ["--channel-mult", "three whole numbers"]),
    (["--channel-mult", "1,0,2"], ["--channel-mult", "three whole numbers"]),
    (["--epochs", "0"], ["--epochs", "[1, 100000]"]),
    (["--snr-gamma", "inf"], ["--snr-gamma", "finite"]),
    (["--warmup-steps", "-1"], ["--warmup-steps", "[0, 1000000]"]),
    (["--warmup-steps", "1000001"], ["--warmup-steps", "[0, 1000000]"]),
    (["--batch-size", "4097"], ["--batch-size", "[1, 4096]"]),
    (["--sample-batch-size", "65536"], ["--sample-batch-size", "[1, 4096]"]),
    (["--num-samples", "100001"], ["--num-samples", "[1, 100000]"]),
    (["--digits", "0-9," * 10 + "7"], ["--digits", "at most 100 classes"]),
    (["--out-dir", "caf\udce9"], ["--out-dir", "'caf\\udce9' is not valid UTF-8"]),  # a Latin-1 byte from the shell
    (["--checkpoint", "caf\udce9.pt"], ["--checkpoint", "not valid UTF-8"]),
    (["--timesteps", "1"], ["--timesteps", "[2, 10000]"]),
    (["--seed", "-1"], ["--seed", "[0, 4294967295]"]),
    (["--seed", str(2 ** 64)], ["--seed", "[0, 4294967295]"]),
    (["--sampler", "euler"], ["--sampler", "invalid choice"]),
    (["--sample-steps", "0"], ["--sample-steps"]),
    (["--time-budget", "soon"], ["--time-budget", "4m"]),
    (["--time-budget", "0s"], ["--time-budget", "1s"]),
    (["--device", "tpu"], ["--device", "invalid choice"]),
    (["--patch-size", "3"], ["--patch-size", "invalid choice"]),
])
def test_bad_flags_fail_in_one_line(quest, flags, words):
    one_line_error(lambda: quest.parse_args(flags), *words, "--help")


@pytest.mark.parametrize("flags, words", [
    (["--base-channels", "12"], ["--base-channels", "multiple of 8"]),
    (["--base-channels", "512", "--channel-mult", "1,2,4"], ["--base-channels", "1024"]),
    (["--sample-only", "--resume"], ["--sample-only", "--resume"]),
    (["--sample-only", "--epochs", "3"], ["--sample-only", "--epochs"]),
])
def test_flags_that_contradict_each_other_fail_in_one_line_and_create_nothing(quest, tmp_path, flags, words):
    one_line_error(lambda: quest.check_args(quest.parse_args([*flags, "--out-dir", str(tmp_path / "out")])), *words)
    assert not (tmp_path / "out").exists()


def test_the_defaults_and_the_seed_and_budget_ranges(quest):
    args = quest.parse_args([])
    assert (args.sampler, args.sample_steps, args.eta, args.guidance) == ("dpm", 25, 1.0, 2.0)
    assert quest.parse_args(["--sampler", "ddim"]).sample_steps == 100
    assert args.beta_schedule == "linear-scaled" and args.timesteps == 300 and args.epochs == 20
    assert args.batch_size == 128 and args.time_budget is None and args.patch_size == 1  # the spec's UNet on pixels
    assert quest.parse_args(["--patch-size", "1"]).set_by_user == {"patch_size"}  # typed, though it is the default
    assert quest.parse_args(["--seed", str(2 ** 32 - 1)]).seed == 2 ** 32 - 1
    assert [quest.parse_args(["--time-budget", text]).time_budget for text in ("90s", "4m", "4", "1.5h")] == \
        [90, 240, 240, 5400]


def test_help_names_no_default_of_none(quest, capsys):
    with pytest.raises(SystemExit) as stopped:
        quest.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stopped.value.code == 0 and "(default: None)" not in text and "(default: 20)" in text
    assert "(default 25) and ddim (default 100); ddpm always runs all T steps --eta" in text


@pytest.mark.parametrize("where", ["file", "under-a-file", "proc", "long-name"])
def test_unusable_output_folders_fail_in_one_line(quest, tmp_path, where):
    (tmp_path / "a-file").write_text("not a folder")
    out = {"file": tmp_path / "a-file", "under-a-file": tmp_path / "a-file" / "out", "proc": "/proc/out",
           "long-name": tmp_path / ("x" * 300) / "out"}[where]
    one_line_error(lambda: quest.check_args(quest.parse_args(["--out-dir", str(out)])), "--out-dir")
    long_checkpoint = ["--checkpoint", str(tmp_path / ("c" * 300 + ".pt"))]
    one_line_error(lambda: quest.check_args(quest.parse_args(long_checkpoint)), "--checkpoint", "shorter")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_fails_in_one_line(quest):
    one_line_error(lambda: quest.pick_device("cuda"), "--device cuda", "not available", "--device cpu")


def test_a_full_disk_leaves_no_temp_file_and_the_old_file_intact(quest, tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"the good old checkpoint")
    monkeypatch.setattr(quest, "open", FullDiskFile, raising=False)
    line = one_line_error(lambda: quest.write_atomically(target, b"x" * 1000), "disk is full")
    assert str(target) in line
    assert target.read_bytes() == b"the good old checkpoint"
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint.pt"]


# ---------------------------------------------------------------- data (fast)
def test_preprocessing_equals_the_spec_transform_pipeline(quest, mnist_root):
    """The on-device tensor pipeline must match Resize(32) -> ToTensor -> Normalize(0.5, 0.5) on PIL images."""
    spec = transforms.Compose([transforms.Resize(32), transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = datasets.MNIST(root=mnist_root, train=True, download=False, transform=spec)
    expected = torch.stack([dataset[i][0] for i in range(32)])
    ours = quest.load_training_images("mnist", mnist_root, torch.device("cpu"))[0][:32]
    assert ours.shape == expected.shape == (32, 1, 32, 32)
    assert ours.min() >= -1 and ours.max() <= 1
    # PIL and torchvision's tensor resize may round one grey level apart (2/255 in [-1, 1] units).
    assert (ours - expected).abs().max() <= 2 / 255 + 1e-6
    assert (ours - expected).abs().mean() < 1e-3


@pytest.mark.parametrize("damage", ["truncate", "bad-magic"])
def test_corrupt_mnist_files_are_called_corrupt_and_named(quest, mnist_root, tmp_path, damage):
    root = tmp_path / "data"
    shutil.copytree(mnist_root, root)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw = images.read_bytes()
    images.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00\x00\x09\x03" + raw[4:])
    one_line_error(lambda: quest.load_training_images("mnist", root, torch.device("cpu")),
                   "corrupt", "train-images-idx3-ubyte")


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_unreachable_download_fails_in_one_line(quest, tmp_path, monkeypatch, dataset, folder):
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    one_line_error(lambda: quest.load_training_images(dataset, tmp_path / "empty", torch.device("cpu")),
                   "could not be downloaded", "--data-dir", f"{folder}/raw")


# ---------------------------------------------------------------- the schedule and the samplers (fast)
def test_default_schedule_ends_in_pure_noise_and_the_spec_schedule_is_one_flag_away(quest):
    default = quest.NoiseSchedule(300, torch.device("cpu"))
    assert default.alphas_cumprod[-1] < 1e-3, "x_T still holds the digit: sampling would start from a state never trained"
    literal = quest.NoiseSchedule(300, torch.device("cpu"), "linear")
    assert torch.allclose(literal.betas, torch.linspace(1e-4, 0.02, 300))
    assert literal.alphas_cumprod[-1] > 0.04  # the spec's end points at T=300 leave 0.22 * x0 in x_T
    cosine = quest.NoiseSchedule(300, torch.device("cpu"), "cosine")
    assert cosine.alphas_cumprod[-1] < 1e-3 and (cosine.betas > 0).all() and (cosine.betas < 1).all()
    assert quest.parse_args(["--beta-schedule", "linear"]).beta_schedule == "linear"


class GaussianData(torch.nn.Module):
    """The exact noise prediction for data x0 ~ N(mean, std^2) per pixel: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps is
    Gaussian too, and E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mean) / (ab std^2 + 1 - ab)."""

    def __init__(self, schedule, mean, std):
        super().__init__()
        self.schedule, self.mean, self.std = schedule, mean, std

    def forward(self, x, t):
        ab = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mean) / (ab * self.std ** 2 + 1 - ab)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_solver_lands_on_the_data_distribution_in_20_steps(quest, eta):
    schedule = quest.NoiseSchedule(300, torch.device("cpu"))
    images, *_, steps = quest.sample(GaussianData(schedule, 0.2, 0.3), schedule, 64, "dpm", 20, torch.device("cpu"),
                                    seed=1, eta=eta)
    assert steps == 20
    assert abs(images.mean() - 0.2) < 0.01 and abs(images.std() - 0.3) < 0.015, (images.mean(), images.std())
    # the check can fail: two DDIM steps with the same exact model land far from it
    coarse, *_ = quest.sample(GaussianData(schedule, 0.2, 0.3), schedule, 64, "ddim", 2, torch.device("cpu"), seed=1)
    assert abs(coarse.std() - 0.3) > 0.015


@pytest.mark.parametrize("eta, algorithm", [(0.0, "dpmsolver++"), (1.0, "sde-dpmsolver++")])
def test_dpm_solver_steps_as_diffusers_does(quest, eta, algorithm):
    """Step for step the same as diffusers' DPMSolverMultistepScheduler (order 2, midpoint, linspace timesteps, the
    last step to sigma 0), on the exact model of Gaussian data and the same fresh noise."""
    from diffusers import DPMSolverMultistepScheduler
    schedule = quest.NoiseSchedule(300, torch.device("cpu"))
    reference = DPMSolverMultistepScheduler(num_train_timesteps=300, trained_betas=schedule.betas.double().numpy(),
                                            algorithm_type=algorithm, solver_order=2, solver_type="midpoint",
                                            final_sigmas_type="zero", timestep_spacing="linspace")
    steps = quest.sample_steps("dpm", schedule, 20)
    reference.set_timesteps(timesteps=steps)  # evenly spaced in lambda down to t = 0
    # data well inside [-1, 1]: the script clamps its x0 predictions to the data range, diffusers (by default) not
    model, generator = GaussianData(schedule, 0.1, 0.15), torch.Generator().manual_seed(0)
    ours = theirs = torch.randn(4, 1, 32, 32, generator=generator)
    x0_before = None
    for i, t in enumerate(steps):
        noise = torch.randn(ours.shape, generator=generator)
        t_next = steps[i + 1] if i + 1 < len(steps) else -1
        x0 = schedule.predicted_x0(ours, model(ours, torch.full((4,), t)), t)
        ours = schedule.dpm_solver_step(ours, x0, t, t_next, x0_before, steps[i - 1] if i else None, eta, noise)
        x0_before = x0
        theirs = reference.step(model(theirs, torch.full((4,), t)), t, theirs, variance_noise=noise).prev_sample
        assert torch.allclose(ours, theirs, atol=2e-4), (i, (ours - theirs).abs().max())


def test_weights_that_blew_up_are_not_usable_even_when_finite(quest):
    torch.manual_seed(0)
    model = quest.SimpleUNet(base_channels=8)
    probe = (torch.randn(2, 1, 32, 32), torch.tensor([5, 5]))
    assert quest.weights_are_usable([model], probe)
    with torch.no_grad():
        model.head[2].weight.fill_(1e37)  # finite, as after one Adam step at --lr 1e39 with warm-up
    assert quest.all_finite(model.state_dict().values()) and not quest.weights_are_usable([model], probe)


# ---------------------------------------------------------------- checkpoints read back are checked (fast)
@pytest.fixture(scope="module")
def tiny_checkpoint(quest, tmp_path_factory):
    """A checkpoint as the first release wrote it (an 8-channel UNet, untrained; its config has no 'conditional'
    and no 'patch_size'), saved once."""
    torch.manual_seed(0)
    model = quest.SimpleUNet(base_channels=8)
    ema = quest.EMA(model, 0.999)
    config = {"dataset": "mnist", "timesteps": 20, "beta_schedule": "linear-scaled", "base_channels": 8,
              "channel_mult": [1, 2, 4], "attention": True}
    path = tmp_path_factory.mktemp("checkpoint") / "checkpoint.pt"
    path.write_bytes(quest.checkpoint_bytes(model, ema, ema.model, 1, torch.optim.Adam(model.parameters()), 1, config))
    return path


def test_a_first_release_checkpoint_loads_as_an_unconditional_unet_on_pixels(quest, tiny_checkpoint):
    config = quest.load_checkpoint(tiny_checkpoint, torch.device("cpu"))["config"]
    assert config["conditional"] is False and config["patch_size"] == 1


@pytest.mark.parametrize("damage, words", [
    (lambda c: c["config"].pop("timesteps"), ["config has no 'timesteps'"]),
    (lambda c: c["config"].update(timesteps=0), ["timesteps = 0", "from 2"]),
    (lambda c: c["config"].update(timesteps=300.0), ["timesteps = 300.0", "whole number"]),
    (lambda c: c["config"].update(dataset="cifar10"), ["dataset = 'cifar10'", "mnist"]),
    (lambda c: c["config"].update(channel_mult="1,2,4"), ["channel_mult", "three whole numbers"]),
    (lambda c: c["config"].update(attention="yes"), ["attention", "true or false"]),
    (lambda c: c["config"].update(base_channels=12), ["base_channels = 12", "multiple of 8"]),
    (lambda c: c["config"].update(patch_size=3), ["patch_size = 3", "1 or 2"]),
    (lambda c: c.update(config=[1, 2]), ["no config"]),
    (lambda c: c.update(epoch="three"), ["epoch = 'three'", "whole number"]),
    (lambda c: c.update(epoch=-1), ["epoch = -1"]),
    (lambda c: c.update(epoch=10 ** 12), ["epoch = 1000000000000", "more than the 100,000 epochs"]),
    (lambda c: c.pop("guide_epoch"), ["guide_epoch = None"]),
    (lambda c: c.pop("optimizer"), ["not a quest_12_2 checkpoint"]),
])
def test_a_damaged_checkpoint_config_fails_in_one_line(quest, tiny_checkpoint, tmp_path, damage, words):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, tmp_path / "damaged.pt")
    one_line_error(lambda: quest.load_checkpoint(tmp_path / "damaged.pt", torch.device("cpu")), "damaged.pt", *words)


@pytest.mark.parametrize("damage, words", [
    ("truncated", ["not a readable quest_12_2 checkpoint"]), ("empty", ["not a readable"]),
    ("foreign", ["not a quest_12_2 checkpoint"]), ("folder", ["is a folder"]), ("missing", ["no checkpoint"])])
def test_a_checkpoint_that_is_not_one_fails_in_one_line(quest, tiny_checkpoint, tmp_path, damage, words):
    path = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif damage == "folder":
        path.mkdir()
    one_line_error(lambda: quest.main(["--sample-only", "--checkpoint", str(path), "--out-dir", str(tmp_path / "o")]),
                   *words)
    assert not (tmp_path / "o").exists()


def damage_weights(checkpoint):
    checkpoint["ema"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                         for k, v in checkpoint["ema"].items()}


def damage_optimizer(checkpoint):
    state = next(iter(checkpoint["optimizer"]["state"].values()))
    state["exp_avg"] = torch.zeros(3)


@pytest.mark.parametrize("mode, damage, words", [("--sample-only", damage_weights, "weights that are not finite"),
                                                 ("--resume", damage_optimizer, "optimizer state does not fit")])
def test_weights_or_optimizer_state_that_cannot_be_used_fail_in_one_line_before_the_data(quest, tiny_checkpoint,
                                                                                          tmp_path, mode, damage, words):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    torch.manual_seed(0)  # the tiny checkpoint's optimizer never stepped: give it a state, as after one epoch
    model = quest.SimpleUNet(base_channels=8)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 1, 32, 32), torch.tensor([3])).mean().backward()
    optimizer.step()
    checkpoint["optimizer"] = optimizer.state_dict()
    damage(checkpoint)
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    one_line_error(lambda: quest.main([mode, "--out-dir", str(tmp_path), "--data-dir", str(tmp_path / "no-data")]),
                   "checkpoint.pt", words)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pt"]


class RunsCode:
    """Unpickled with full pickle, this object runs os.mkdir(marker): a stand-in for any command a file could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("mode", ["--sample-only", "--resume"])
def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_runs_nothing(quest, tiny_checkpoint, tmp_path, mode):
    checkpoint, marker = torch.load(tiny_checkpoint, weights_only=True), tmp_path / "code-ran"
    checkpoint["config"]["note"] = RunsCode(marker)
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    one_line_error(lambda: quest.main([mode, "--out-dir", str(tmp_path), "--data-dir", str(tmp_path / "no-data")]),
                   "checkpoint.pt", "not a readable quest_12_2 checkpoint")
    assert not marker.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pt"]
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)  # the payload is real: full unpickling runs it
    assert marker.exists()


def test_a_new_run_does_not_write_over_an_earlier_runs_checkpoint(quest, tiny_checkpoint, tmp_path):
    shutil.copy(tiny_checkpoint, tmp_path / "checkpoint.pt")
    for flags in ([], ["--time-budget", "4m"], ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out-dir", "x"]):
        one_line_error(lambda: quest.check_args(quest.parse_args(["--out-dir", str(tmp_path), *flags])),
                       f"{tmp_path / 'checkpoint.pt'} already holds a checkpoint", "--resume", "another --out-dir")
    assert (tmp_path / "checkpoint.pt").read_bytes() == tiny_checkpoint.read_bytes()
    for flags in (["--resume"], ["--sample-only"], ["--out-dir", str(tmp_path / "fresh")]):  # what the line offers
        quest.check_args(quest.parse_args(["--out-dir", str(tmp_path), *flags]))


def test_a_failure_at_the_last_file_leaves_no_success_line(quest, tiny_checkpoint, tmp_path, capsys):
    """The JSON line comes after every file: here the animation, written last, cannot take its name."""
    (tmp_path / "out" / "reverse_process.gif" / "in-the-way").mkdir(parents=True)
    one_line_error(lambda: quest.main(["--sample-only", "--checkpoint", str(tiny_checkpoint), "--out-dir",
                                       str(tmp_path / "out"), "--num-samples", "2", "--sample-steps", "2"]),
                   "could not write", "reverse_process.gif")
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "new_creation.png").exists() and "success" not in out and "saved" not in out


def test_patches_fold_2x2_pixels_into_channels_and_back(quest):
    """--patch-size 2: the stem sees each 2x2 block of pixels as 4 channels of one position of a 16x16 map, and the
    head's 4 channels at a position are unfolded back into that block; the weight names stay those of the pixel
    UNet (old checkpoints load as patch size 1)."""
    torch.manual_seed(0)
    model = quest.SimpleUNet(base_channels=8, patch_size=2).eval()
    seen = {}
    model.stem.register_forward_hook(lambda module, inputs, output: seen.update(stem_in=inputs[0]))
    model.head.register_forward_hook(lambda module, inputs, output: seen.update(head_out=output))
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 7])
    with torch.no_grad():
        out = model(x, t)
    assert seen["stem_in"].shape == (2, 4, 16, 16) and seen["head_out"].shape == (2, 4, 16, 16)
    assert out.shape == x.shape
    for channel, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # pixel (2i + row, 2j + col)
        assert torch.equal(seen["stem_in"][:, channel, 3, 5], x[:, 0, 6 + row, 10 + col])
        assert torch.equal(out[:, 0, 6 + row, 10 + col], seen["head_out"][:, channel, 3, 5])
    old = quest.SimpleUNet(base_channels=8)  # patch_size 1: the same weight names as before patches existed
    assert set(old.state_dict()) == set(model.state_dict())


@pytest.fixture(scope="module")
def tiny_model(quest):
    torch.manual_seed(0)
    return quest, quest.SimpleUNet(base_channels=8), quest.NoiseSchedule(20, torch.device("cpu"))


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpm", 0.0), ("dpm", 1.0)])
def test_chunked_sampling_gives_the_same_images_as_one_pass(tiny_model, sampler, eta):
    quest, model, schedule = tiny_model
    cpu = torch.device("cpu")
    whole, *_ = quest.sample(model, schedule, 10, sampler, 5, cpu, batch_size=10, seed=3, eta=eta)
    chunked, *_ = quest.sample(model, schedule, 10, sampler, 5, cpu, batch_size=4, seed=3, eta=eta)
    assert whole.shape == (10, 1, 32, 32)
    # the same random draws; only the batch size of the convolutions differs (float rounding)
    assert torch.allclose(whole, chunked, atol=1e-4), (whole - chunked).abs().max()
    other, *_ = quest.sample(model, schedule, 10, sampler, 5, cpu, batch_size=10, seed=4, eta=eta)
    assert not torch.allclose(whole, other)


class Constant(torch.nn.Module):
    """A stand-in UNet that predicts the same noise value everywhere."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, t):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_guidance_extrapolates_away_from_the_guide_and_1_is_plain_sampling(tiny_model, sampler):
    quest, model, schedule = tiny_model
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    weaker = quest.SimpleUNet(base_channels=8)
    plain, *_ = quest.sample(model, schedule, 6, sampler, 5, cpu, seed=3)
    off, *_ = quest.sample(model, schedule, 6, sampler, 5, cpu, seed=3, guide=weaker, guidance=1.0)
    assert torch.equal(plain, off)  # --guidance 1: the spec's sampling, the guide is not even run
    itself, *_ = quest.sample(model, schedule, 6, sampler, 5, cpu, seed=3, guide=model, guidance=2.0)
    assert torch.allclose(plain, itself, atol=1e-5)  # eps_g + w (eps - eps_g) = eps when the guide is the model
    guided, *_ = quest.sample(model, schedule, 6, sampler, 5, cpu, seed=3, guide=weaker, guidance=2.0)
    assert not torch.allclose(plain, guided, atol=1e-3)
    assert guided.min() >= -1 and guided.max() <= 1 and torch.isfinite(guided).all()
    # the combination itself: models that predict constants a (main) and b (guide) act as one predicting b + w (a - b)
    a, b, w = 0.3, -0.1, 2.5
    pushed, *_ = quest.sample(Constant(a), schedule, 6, sampler, 5, cpu, seed=3, guide=Constant(b), guidance=w)
    expected, *_ = quest.sample(Constant(b + w * (a - b)), schedule, 6, sampler, 5, cpu, seed=3)
    assert torch.allclose(pushed, expected, atol=1e-5)
    assert quest.guide_epoch(30) == 8 and quest.guide_epoch(20) == 5 and quest.guide_epoch(1) == 1


def test_ddim_stays_in_range_and_rederives_the_noise_from_the_clamped_x0(tiny_model):
    quest, model, schedule = tiny_model
    images, frames, trajectory, steps = quest.sample(model, schedule, 6, "ddim", 10, torch.device("cpu"))
    assert steps == 10 and len(frames) == 11 and trajectory.shape == (6, quest.TRAJECTORY_POINTS, 1, 32, 32)
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
    once, *_ = quest.sample(model, schedule, 6, "ddim", 5, cpu, seed=3, eta=1.0)
    again, *_ = quest.sample(model, schedule, 6, "ddim", 5, cpu, seed=3, eta=1.0)
    plain, *_ = quest.sample(model, schedule, 6, "ddim", 5, cpu, seed=3, eta=0.0)
    assert torch.equal(once, again) and not torch.allclose(once, plain, atol=1e-3)  # seeded, and noise was added
    assert once.min() >= -1 and once.max() <= 1 and torch.isfinite(once).all()


# ---------------------------------------------------------------- learning and tiny real runs (slow)
@pytest.mark.slow
@pytest.mark.parametrize("patch_size", [1, 2])
def test_the_unet_learns_to_predict_the_noise(quest, mnist_root, patch_size):
    """The learning assertion: 3 epochs over 512 real digits cut the noise-prediction loss on fixed held-out noisy
    digits by more than a third (an untrained UNet scores about 1, predicting the noise's mean), on the pixels and on
    2x2 patches."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    schedule = quest.NoiseSchedule(20, cpu)
    images = quest.load_training_images("mnist", mnist_root, cpu)[0]
    train, held_out = images[:448], images[448:]
    t = torch.randint(0, 20, (len(held_out),))
    noise = torch.randn_like(held_out)
    noisy = schedule.get_noisy_image(held_out, t, noise)
    model = quest.SimpleUNet(base_channels=16, patch_size=patch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def held_out_loss():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model.eval()(noisy, t), noise).item()

    before = held_out_loss()
    model.train()
    for _ in range(3):
        for batch in train[torch.randperm(len(train))].split(32):
            quest.train_step(model, optimizer, schedule, batch, None, 5.0)
    after = held_out_loss()
    assert after < 0.66 * before, (before, after)


@pytest.fixture(scope="module", params=DEVICES)
def trained(request, mnist_root, tmp_path_factory):
    """One tiny training run per device, as a user starts it: (device, out_dir, result JSON)."""
    work = tmp_path_factory.mktemp(f"ddpm-{request.param}")
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--out-dir", work / "out", "--device", request.param, *TINY,
                      cwd=work)
    return request.param, work / "out", result_json(proc)


@pytest.mark.slow
def test_tiny_run_writes_grid_trajectory_checkpoint_and_json(quest, trained):
    device, out_dir, result = trained
    assert result["success"] is True
    assert result["fileName"] == "new_creation.png"
    assert result["path"] == str(out_dir / "new_creation.png")
    details = result["details"]
    assert details["device"].startswith(device)
    assert details["epochs"] == 1 and details["timesteps"] == 20
    # DPM-Solver's steps even in log-SNR fall on fewer distinct whole t when T is only 20
    steps = quest.sample_steps("dpm", quest.NoiseSchedule(20, torch.device("cpu")), 25)
    assert len(steps) < 20 and steps[0] == 19 and steps[-1] == 0
    assert (details["sampler"], details["sampleSteps"], details["eta"]) == ("dpm", len(steps), 1.0)
    assert details["guidance"] == 2.0  # guided by the checkpoint's guide weights
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


@pytest.mark.slow
@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("ddpm", 20)])
def test_sample_only_reuses_the_checkpoint(quest, capsys, trained, tmp_path, sampler, steps):
    device, out_dir, _ = trained
    details = run_main(quest, capsys, "--sample-only", "--checkpoint", out_dir / "checkpoint.pt", "--out-dir",
                       tmp_path / "re", "--sampler", sampler, "--sample-steps", "5", "--num-samples", "4",
                       "--device", device, "--data-dir", tmp_path / "no-data-needed")["details"]
    assert details["sampler"] == sampler and details["sampleSteps"] == steps and details["finalLoss"] is None
    assert details["guidance"] == 2.0 and details["eta"] == (1.0 if sampler == "ddim" else None)
    assert details["timesteps"] == 20  # the architecture and schedule come from the checkpoint
    with Image.open(tmp_path / "re" / "new_creation.png") as grid:
        assert grid.size == grid_size(4, nrow=2)
    assert not (tmp_path / "re" / "checkpoint.pt").exists()
    assert not (tmp_path / "no-data-needed").exists()


@pytest.mark.slow
def test_a_checkpoint_without_guide_weights_samples_plainly_and_says_so(quest, capsys, trained, tmp_path):
    device, out_dir, _ = trained
    checkpoint = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    del checkpoint["guide"], checkpoint["guide_epoch"]  # as written by a run stopped before its guide epoch
    torch.save(checkpoint, tmp_path / "early.pt")
    args = ["--sample-only", "--checkpoint", tmp_path / "early.pt", "--num-samples", "4", "--device", device]
    assert run_main(quest, capsys, *args, "--out-dir", tmp_path / "early")["details"]["guidance"] == 1.0
    quest.main([str(arg) for arg in [*args, "--out-dir", tmp_path / "early2"]])
    assert "holds no guide weights" in capsys.readouterr().out
    run_main(quest, capsys, *args, "--out-dir", tmp_path / "plain", "--guidance", "1")
    assert "holds no guide weights" not in capsys.readouterr().out
    assert (tmp_path / "early" / "new_creation.png").read_bytes() == (tmp_path / "plain" / "new_creation.png").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["wrong shape", "not weights", "nan"])
def test_broken_guide_weights_fail_in_one_line_and_guidance_1_still_samples(quest, capsys, trained, tmp_path, damage):
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
    one_line_error(lambda: quest.main([str(arg) for arg in [*args, "--out-dir", tmp_path / "out"]]),
                   "guide", "--guidance 1")
    assert "success" not in capsys.readouterr().out and not (tmp_path / "out" / "new_creation.png").exists()
    assert run_main(quest, capsys, *args, "--out-dir", tmp_path / "plain", "--guidance", "1")["details"]["guidance"] == 1


@pytest.mark.slow
def test_resume_continues_training_to_the_requested_epochs(quest, capsys, trained, mnist_root, tmp_path):
    device, out_dir, _ = trained
    checkpoint = tmp_path / "checkpoint.pt"
    shutil.copy(out_dir / "checkpoint.pt", checkpoint)
    details = run_main(quest, capsys, "--resume", "--checkpoint", checkpoint, "--data-dir", mnist_root, "--out-dir",
                       tmp_path / "out", "--device", device, "--epochs", "2", "--batch-size", "64",
                       "--num-samples", "4", "--channel-mult", "1,1,2", "--timesteps", "20")["details"]
    assert details["epochs"] == 2 and len(details["epochLosses"]) == 1  # only the second epoch ran
    resumed = torch.load(checkpoint, weights_only=True)
    assert resumed["epoch"] == 2
    # the guide was taken once, at epoch 1 (a quarter of 1); resuming keeps it rather than the newer EMA
    before = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert resumed["guide_epoch"] == 1
    assert all(torch.equal(resumed["guide"][k], before["guide"][k]) for k in before["guide"])
    assert any(not torch.equal(resumed["guide"][k], resumed["ema"][k]) for k in resumed["ema"])


@pytest.mark.slow
def test_resume_reports_the_architecture_flags_it_keeps(trained, mnist_root, tmp_path):
    device, out_dir, _ = trained
    shutil.copy(out_dir / "checkpoint.pt", tmp_path / "checkpoint.pt")
    proc = run_script(SCRIPT, "--resume", "--checkpoint", tmp_path / "checkpoint.pt", "--data-dir", mnist_root,
                      "--out-dir", tmp_path / "out", "--device", device, "--epochs", "1", "--num-samples", "4",
                      "--channel-mult", "1,1,2", "--timesteps", "20", "--patch-size", "2", cwd=tmp_path)
    # the weights fix the architecture: a different width is reported and ignored, an equal one is not mentioned
    assert "keeps the checkpoint's --channel-mult 1,2,4, --patch-size 1" in proc.stdout
    assert "--timesteps" not in proc.stdout and "on 2x2 patches" not in proc.stdout
    assert "nothing to train" in proc.stdout and result_json(proc)["details"]["epochLosses"] == []


@pytest.mark.slow
def test_same_seed_gives_the_same_digits(quest, capsys, trained, mnist_root, tmp_path):
    device, out_dir, first = trained
    if device != "cpu":
        pytest.skip("bit-exact reproducibility is checked on CPU")
    again = run_main(quest, capsys, "--data-dir", mnist_root, "--out-dir", tmp_path / "again", *TINY, "--device", "cpu")
    assert again["details"]["finalLoss"] == first["details"]["finalLoss"]
    assert (tmp_path / "again" / "new_creation.png").read_bytes() == (out_dir / "new_creation.png").read_bytes()
    other = run_main(quest, capsys, "--data-dir", mnist_root, "--out-dir", tmp_path / "other", *TINY, "--device",
                     "cpu", "--seed", "1")
    assert other["details"]["finalLoss"] != first["details"]["finalLoss"]


@pytest.mark.slow
def test_a_time_budget_stops_training_by_its_budget_and_still_samples(quest, capsys, mnist_root, tmp_path):
    import time
    start = time.perf_counter()
    result = run_main(quest, capsys, "--data-dir", mnist_root, "--out-dir", tmp_path / "out", *TINY[2:],
                      "--time-budget", "4s", "--device", "cpu")
    details = result["details"]
    assert details["epochs"] == len(details["epochLosses"]) >= 2  # fitted to the budget: more than --epochs 1
    assert 4 * 0.6 < details["trainSeconds"] < 4 * 1.15  # within an epoch of the budget, never far past it
    assert time.perf_counter() - start < 30 and (tmp_path / "out" / "new_creation.png").exists()


# ---------------------------------------------------------------- faults lose nothing (slow: real runs)
@pytest.mark.slow
def test_divergence_from_scratch_stops_without_success_and_keeps_the_earlier_outputs(quest, capsys, trained,
                                                                                      mnist_root, tmp_path):
    device, out_dir, _ = trained
    (tmp_path / "out").mkdir()
    shutil.copy(out_dir / "new_creation.png", tmp_path / "out" / "new_creation.png")
    before = (tmp_path / "out" / "new_creation.png").read_bytes()
    line = one_line_error(lambda: quest.main([str(arg) for arg in [
        "--data-dir", mnist_root, "--out-dir", tmp_path / "out", *TINY, "--lr", "1e6",
        "--lr-schedule", "constant", "--device", device]]), "diverged", "--lr")
    assert "--resume" not in line, "no checkpoint was saved, so a rerun is a new run: no --resume advised"
    assert '"success": true' not in capsys.readouterr().out
    assert (tmp_path / "out" / "new_creation.png").read_bytes() == before, "a diverged run wrote over the grid"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["new_creation.png"]  # no checkpoint


@pytest.mark.slow
def test_one_step_to_huge_weights_on_resume_leaves_the_good_checkpoint_byte_identical(trained, mnist_root, tmp_path):
    """The step's loss is finite (computed before the step); the weights after it are ~1e37, finite too, and
    predict inf: nothing may be saved, and the epoch-1 checkpoint stays as it was."""
    device, out_dir, _ = trained
    shutil.copytree(out_dir, tmp_path / "out")
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    proc = run_script(SCRIPT, "--resume", "--data-dir", mnist_root, "--out-dir", tmp_path / "out", "--epochs", "2",
                      "--lr", "1e39", "--batch-size", "4096", "--num-samples", "4", "--device", device, cwd=tmp_path)
    # a new run would refuse the epoch-1 checkpoint: the line says how to continue it instead
    assert_clean_failure(proc, "diverged in epoch 2", "--lr", "continue with --resume", "holds epoch 1",
                         "to start over")
    assert '"success"' not in proc.stdout
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_keeps_the_finished_epochs_and_resume_continues(mnist_root, tmp_path, sig):
    """A real signal in the middle of epoch 2: one line, exit 130/143, the epoch-1 checkpoint intact and resumable."""
    args = ["--data-dir", mnist_root, "--out-dir", tmp_path / "out", "--epochs", "50", "--timesteps", "20",
            "--base-channels", "8", "--batch-size", "16", "--num-samples", "4", "--device", "cpu"]
    proc = interrupt_script(SCRIPT, *args, ready="epoch 1/50", cwd=tmp_path, sig=sig)  # epoch 1 is on disk
    assert proc.returncode == 128 + sig, proc.stderr
    line = assert_clean_failure(proc, "interrupted (Ctrl-C)" if sig == signal.SIGINT else "stopped by SIGTERM",
                                "holds epoch", "--resume")
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert f"holds epoch {checkpoint['epoch']}" in line
    assert not list((tmp_path / "out").glob(".*.tmp"))
    if sig == signal.SIGINT:
        proc = run_script(SCRIPT, "--resume", *args[:4], "--epochs", str(checkpoint["epoch"] + 1), "--batch-size",
                          "16", "--num-samples", "4", "--device", "cpu", cwd=tmp_path)
        assert result_json(proc)["details"]["epochs"] == checkpoint["epoch"] + 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_libraries_load_ends_in_one_line(tmp_path, sig):
    proc = stop_while_starting(SCRIPT, "--out-dir", tmp_path / "out", cwd=tmp_path, sig=sig, after_s=0.3)
    assert proc.returncode == 128 + sig
    assert_clean_failure(proc, "interrupted while starting", "nothing was done")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- class-conditional generation, classifier-free guidance
class ClassConstant(torch.nn.Module):
    """A stand-in conditional UNet: predicts, everywhere, the value its class (or NO_CLASS, the last) is given."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, x, t, labels):
        return self.values[labels].view(-1, 1, 1, 1).expand_as(x).clone()


@pytest.mark.parametrize("sampler", ["dpm", "ddpm"])
def test_cfg_1_is_conditional_sampling_0_unconditional_and_w_extrapolates(quest, sampler):
    schedule, cpu = quest.NoiseSchedule(20, torch.device("cpu")), torch.device("cpu")
    values = [0.1 * digit - 0.4 for digit in range(10)] + [0.05]  # the last: the unconditional prediction
    labels = torch.tensor([3, 3, 7, 7])

    def drawn(model, **guidance):
        return quest.sample(model, schedule, 4, sampler, 8, cpu, seed=2, **guidance)[0]

    conditional = drawn(ClassConstant(values), labels=labels, cfg=1.0)
    per_sample = torch.tensor([values[label] for label in labels.tolist()])
    for cfg in (0.0, 1.0, 2.5):
        expected = per_sample * cfg + values[-1] * (1 - cfg)  # eps_uncond + W (eps_cond - eps_uncond)
        stub = ClassConstant(expected.tolist() + [0.0])  # sample i gets class i: the expected value for it
        assert torch.allclose(drawn(ClassConstant(values), labels=labels, cfg=cfg),
                              drawn(stub, labels=torch.arange(4), cfg=1.0), atol=1e-5), cfg
    assert not torch.allclose(conditional, drawn(ClassConstant(values), labels=labels, cfg=0.0), atol=1e-3)
    # a conditional guide is asked with the same labels: eps_guide(c) + w (eps_cfg(c) - eps_guide(c))
    guide_values = [0.02 * digit for digit in range(10)] + [0.0]
    guided = per_sample * 2.5 + values[-1] * (1 - 2.5)
    expected = torch.tensor([guide_values[label] for label in labels.tolist()])
    expected = expected + 1.5 * (guided - expected)
    assert torch.allclose(drawn(ClassConstant(values), labels=labels, cfg=2.5, guide=ClassConstant(guide_values),
                                guidance=1.5),
                          drawn(ClassConstant(expected.tolist() + [0.0]), labels=torch.arange(4), cfg=1.0), atol=1e-5)


def test_labels_are_dropped_to_no_class_at_the_cond_drop_rate(quest):
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, labels):
            self.labels = labels
            return x * 0 + self.weight

    torch.manual_seed(0)
    recorder, labels = Recorder(), torch.arange(4000) % 10
    quest.train_step(recorder, torch.optim.Adam(recorder.parameters()), quest.NoiseSchedule(20, torch.device("cpu")),
                     torch.zeros(4000, 1, 32, 32), None, 5.0, labels, cond_drop=0.25)
    dropped = recorder.labels == quest.NO_CLASS
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert torch.equal(recorder.labels[~dropped], labels[~dropped])  # the others keep their class


@pytest.mark.parametrize("text, classes", [("7", [7]), ("0-9", list(range(10))), ("3,5,8", [3, 5, 8]),
                                           ("0-2,9", [0, 1, 2, 9])])
def test_digits_lists(quest, text, classes):
    assert quest.parse_args(["--digits", text]).digits == classes


@pytest.mark.parametrize("text", ["11", "a", "", "5-3", "-1"])
def test_bad_digits_fail_in_one_line(quest, text):
    one_line_error(lambda: quest.parse_args(["--digits", text]), "--digits", "0-9")


def test_digits_need_a_conditional_model_and_a_matching_num_samples(quest, tiny_checkpoint, mnist_root, tmp_path):
    one_line_error(lambda: quest.main(["--sample-only", "--checkpoint", str(tiny_checkpoint), "--digits", "7",
                                       "--out-dir", str(tmp_path / "o")]), "--digits", "conditional")
    # the other flags of one kind of model are refused for the other kind too, not ignored
    one_line_error(lambda: quest.main(["--sample-only", "--checkpoint", str(tiny_checkpoint), "--cfg", "2",
                                       "--out-dir", str(tmp_path / "o")]), "--cfg needs a conditional model")
    one_line_error(lambda: quest.main(["--cond-drop", "0.2", "--data-dir", str(mnist_root), "--out-dir",
                                       str(tmp_path / "o")]), "--cond-drop", "this run is not one")
    one_line_error(lambda: quest.main(["--conditional", "--guidance", "3", "--data-dir", str(mnist_root),
                                       "--out-dir", str(tmp_path / "o")]), "--guidance", "conditional", "--cfg")
    one_line_error(lambda: quest.main(["--conditional", "--digits", "0-2", "--num-samples", "4", "--data-dir",
                                       str(mnist_root), "--out-dir", str(tmp_path / "o")]),
                   "--num-samples 4", "multiple of the 3 classes", "--num-samples 3")
    # --conditional on an unconditional checkpoint (a conditional one takes it: "the same command with --resume")
    one_line_error(lambda: quest.main(["--sample-only", "--conditional", "--checkpoint", str(tiny_checkpoint),
                                       "--out-dir", str(tmp_path / "o")]), "unconditional", "drop --conditional")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_conditional_model_trains_resumes_and_draws_the_rows_asked_for(quest, capsys, mnist_root, tmp_path):
    out = tmp_path / "out"
    first = run_main(quest, capsys, "--conditional", "--data-dir", mnist_root, "--out-dir", out, *TINY, "--digits",
                     "3,5", "--num-samples", "6", "--device", "cpu", "--patch-size", "2")["details"]
    assert first["conditional"] is True and first["classes"] == [3, 5] and first["classNames"] == ["3", "5"]
    assert first["cfg"] == 1.5 and first["guidance"] == 1.0  # CFG, not autoguidance, for a conditional model
    with Image.open(out / "new_creation.png") as grid:  # one row per class, 3 digits each
        assert grid.size == grid_size(6, nrow=3)
    with Image.open(out / "reverse_process.gif") as gif:  # noise, then one frame per kept step
        assert gif.n_frames == 1 + first["sampleSteps"] and gif.size == grid_size(6, nrow=3)
    config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert config["conditional"] is True and config["patch_size"] == 2  # resumed and sampled on patches below
    resumed = run_main(quest, capsys, "--conditional", "--resume", "--data-dir", mnist_root, "--out-dir", out,
                       "--epochs", "2", "--device", "cpu")["details"]  # what a stopped run says: the same, + --resume
    assert resumed["epochs"] == 2 and resumed["classes"] == list(range(10)) and resumed["patchSize"] == 2
    assert resumed["numSamples"] == 60  # --num-samples left at 64: the multiple of the 10 classes below it
    with Image.open(out / "new_creation.png") as grid:  # the default 0-9: ten rows of six
        assert grid.size == grid_size(60, nrow=6)
