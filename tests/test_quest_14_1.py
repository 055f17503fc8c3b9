"""quest_14_1.py (post-training static INT8 quantization): tiny real runs on a few hundred real digits,
the quantized model itself, the temp-file discipline, and the failure paths."""
import json
import math

import pytest
import torch
import torch.nn as nn
from torchvision import datasets, transforms

from conftest import DEVICES, assert_clean_failure, import_script, result_json, run_script

SCRIPT = "quest_14_1.py"
TINY = ["--train-batches", "3", "--calib-batches", "2", "--batch-size", "32", "--latency-seconds", "0.05"]
# Figures that must repeat exactly for the same seed (latencies are wall-clock and do not).
DETERMINISTIC = ("size_fp32_kb", "size_int8_kb", "compression_ratio", "acc_fp32", "acc_int8", "train_loss")


@pytest.fixture(scope="module")
def quest():
    """The script imported as a module, for in-process checks of its parts."""
    return import_script(SCRIPT)


@pytest.fixture(scope="module", params=DEVICES)
def trained(request, mnist_root, tmp_path_factory):
    """One tiny run per device, as a user runs it: temp files in cwd/work, the INT8 model kept in cwd/out.
    Returns (device, cwd, the process, the result JSON)."""
    cwd = tmp_path_factory.mktemp(f"quant-{request.param}")
    (cwd / "work").mkdir()
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--work-dir", cwd / "work", "--save-dir", cwd / "out",
                      "--device", request.param, *TINY, cwd=cwd)
    return request.param, cwd, proc, result_json(proc)


def test_tiny_run_reports_sizes_accuracies_and_latencies(trained):
    device, _, proc, result = trained
    assert result["size_fp32_kb"] > result["size_int8_kb"] > 0
    assert result["compression_ratio"] > 1
    assert math.isclose(result["compression_ratio"], result["size_fp32_kb"] / result["size_int8_kb"], rel_tol=1e-3)
    assert 0 <= result["acc_fp32"] <= 1 and 0 <= result["acc_int8"] <= 1
    for model in ("fp32", "int8"):
        for batch in (1, 256):
            assert result[f"latency_ms_{model}_b{batch}"] > 0
    assert result["test_images"] == 256 and result["engine"] == "fbgemm" and result["train_device"] == device
    assert "runs on CPU" in result["notes"]
    assert math.isfinite(result["train_loss"])
    # The known deprecation warnings are replaced by one note, not dumped on stderr.
    assert "filtered" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


def test_no_temp_file_is_left_behind(trained):
    _, cwd, _, result = trained
    assert sorted(p.name for p in cwd.iterdir()) == ["out", "work"]  # nothing dropped in the working directory
    assert list((cwd / "work").iterdir()) == []  # the temp .pth files and their folder are gone
    assert [p.name for p in (cwd / "out").iterdir()] == ["mini_cnn_int8.pt"]
    assert result["saved_model"] == str(cwd / "out" / "mini_cnn_int8.pt")


def test_saved_torchscript_reloads_and_scores_like_the_run(trained, quest, mnist_root):
    _, cwd, _, result = trained
    quest.silence_known_warnings()  # torch.jit.load's deprecation notice
    torch.backends.quantized.engine = "fbgemm"  # the engine the run quantized for
    model = torch.jit.load(str(cwd / "out" / "mini_cnn_int8.pt"))
    assert model.conv1._c.qualified_name.endswith("intrinsic.quantized.modules.conv_relu.ConvReLU2d")
    assert model.fc1._c.qualified_name.endswith("quantized.modules.linear.Linear")
    assert model.conv1._packed_params.unpack()[0].dtype == torch.qint8
    x, y = quest.load_mnist(str(mnist_root), train=False, device="cpu")
    with torch.inference_mode():
        log_probs = model(x)
    assert log_probs.shape == (256, 10)
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(256), atol=1e-3)
    assert (log_probs.argmax(1) == y).float().mean().item() == pytest.approx(result["acc_int8"])


def test_same_seed_gives_the_same_figures(trained, quest, mnist_root, tmp_path, capsys):
    device, _, _, first = trained
    if device != "cpu":
        pytest.skip("bitwise repeatability is checked on CPU")
    # In-process this time (the scripted run above was a subprocess): no second interpreter start-up to pay.
    quest.main(["--data-dir", str(mnist_root), "--work-dir", str(tmp_path), "--device", "cpu", *TINY])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: again[k] for k in DETERMINISTIC} == {k: first[k] for k in DETERMINISTIC}
    assert again["saved_model"] is None and list(tmp_path.iterdir()) == []


def test_converted_model_holds_quantized_modules(quest, mnist_root):
    quest.silence_known_warnings()
    x, _ = quest.load_mnist(str(mnist_root), train=True, device="cpu")
    torch.manual_seed(0)
    fp32 = quest.MiniCNN().eval()
    int8 = quest.quantize(fp32, x, [torch.arange(0, 64), torch.arange(64, 128)], "fbgemm")
    assert isinstance(int8.quant, torch.ao.nn.quantized.Quantize)
    assert isinstance(int8.conv1, torch.ao.nn.intrinsic.quantized.ConvReLU2d)  # conv1+relu1 fused
    assert isinstance(int8.conv2, torch.ao.nn.intrinsic.quantized.ConvReLU2d)
    assert isinstance(int8.fc1, torch.ao.nn.quantized.Linear)
    assert isinstance(int8.dequant, torch.ao.nn.quantized.DeQuantize)
    assert isinstance(int8.relu1, nn.Identity)  # folded into conv1
    assert int8.conv2.weight().dtype == torch.qint8 and int8.fc1.weight().dtype == torch.qint8
    with torch.inference_mode():
        q_out, f_out = int8(x[:128]), fp32(x[:128])
    assert q_out.dtype == torch.float32 and q_out.shape == (128, 10)
    # INT8 follows FP32 closely (same weights, 8-bit rounding): most predictions agree.
    assert (q_out.argmax(1) == f_out.argmax(1)).float().mean() > 0.9


def test_preprocessing_equals_the_spec_transforms(quest, mnist_root):
    x, y = quest.load_mnist(str(mnist_root), train=True, device="cpu")
    spec = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(root=str(mnist_root), train=True, download=False, transform=spec)
    assert x.shape == (512, 1, 28, 28)
    for i in (0, 1, 255, 511):
        image, label = ds[i]
        assert torch.equal(x[i], image) and y[i].item() == label


class BrokenModel(nn.Module):
    def state_dict(self, *args, **kwargs):
        raise RuntimeError("disk full")


def test_temp_files_are_removed_when_saving_fails(quest, tmp_path):
    with pytest.raises(RuntimeError, match="disk full"):
        quest.state_dict_sizes_kb({"temp_fp32_model.pth": quest.MiniCNN(), "temp_int8_model.pth": BrokenModel()},
                                  str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the FP32 file was written, then removed with its folder
    sizes = quest.state_dict_sizes_kb({"temp_fp32_model.pth": quest.MiniCNN()}, str(tmp_path))
    assert sizes["temp_fp32_model.pth"] > 100 and list(tmp_path.iterdir()) == []


def test_defaults_equal_the_spec(quest, capsys):
    args = quest.parse_args([])
    assert (args.data_dir, args.device, args.seed, args.batch_size) == ("./data", "auto", 0, 64)
    assert (args.train_batches, args.calib_batches, args.engine) == (100, 10, "fbgemm")
    with pytest.raises(SystemExit):
        quest.parse_args(["--help"])
    assert "(default: fbgemm)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_exits_with_a_clear_message(quest):
    with pytest.raises(SystemExit) as exit_info:
        quest.pick_device("cuda")
    assert str(exit_info.value.code).startswith("error: --device cuda was requested but CUDA is not available")


def test_unreachable_download_fails_cleanly_and_leaves_nothing(tmp_path):
    """The spec's failure case, as a user meets it: a subprocess, one stderr line, no traceback."""
    (tmp_path / "work").mkdir()
    proc = run_script(SCRIPT, "--data-dir", "nodata", "--work-dir", tmp_path / "work", "--save-dir", tmp_path / "out",
                      *TINY, cwd=tmp_path)
    assert_clean_failure(proc, "MNIST", "could not be downloaded", "--data-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodata", "work"]  # nodata/: torchvision's download try
    assert list((tmp_path / "work").iterdir()) == [] and not list(tmp_path.rglob("*.pt*"))


@pytest.mark.parametrize("args, words", [
    (["--calib-batches", "0"], ["--calib-batches", "no batches"]),
    (["--engine", "tpu8"], ["engine", "tpu8", "fbgemm"]),
    (["--work-dir", "missing"], ["--work-dir", "missing"]),
], ids=["no calibration batches", "unsupported engine", "missing work dir"])
def test_bad_input_exits_with_one_clear_line_and_leaves_nothing(args, words, quest, mnist_root, tmp_path,
                                                                monkeypatch, capsys):
    # In-process (no interpreter start-up per case): sys.exit("error: ...") is what prints the one stderr line.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--data-dir", str(mnist_root), "--work-dir", "work", "--save-dir", "out", *TINY, *args])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert all(word.lower() in message.lower() for word in words), message
    assert capsys.readouterr().err == ""  # nothing else on stderr (no warnings, no progress bar)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and list((tmp_path / "work").iterdir()) == []
