"""quest_14_1.py (post-training static INT8 quantization): tiny real runs on a few hundred real digits in both
flows (eager, the spec's; pt2e, torchao's), the quantized models themselves, the temp-file discipline, and every
fault class: bad numbers, bad output folders, corrupt data, divergence, a full disk, Ctrl-C, torchao missing."""
import errno
import json
import math

import pytest
import torch
import torch.nn as nn
from torchvision import datasets, transforms

from conftest import (DEVICES, assert_clean_failure, import_script, result_json, run_script,
                      write_mnist_subset)
from tools.kit import interrupt_script

SCRIPT = "quest_14_1.py"
TINY = ["--train-batches", "3", "--calib-batches", "2", "--batch-size", "32", "--latency-seconds", "0.05"]
# Figures that must repeat exactly for the same seed (latencies are wall-clock and do not).
DETERMINISTIC = ("size_fp32_kb", "size_int8_kb", "compression_ratio", "acc_fp32", "acc_int8", "train_loss")
KEYS = {"size_fp32_kb", "size_int8_kb", "compression_ratio", "notes", "acc_fp32", "acc_int8", "train_loss", "engine",
        "train_device", "test_images", "saved_model", "flow", "compiled", "compile_seconds",
        "latency_ms_fp32_b1", "latency_ms_int8_b1", "latency_ms_fp32_b256", "latency_ms_int8_b256"}


@pytest.fixture(scope="module")
def quest():
    """The script imported as a module, for in-process checks of its parts."""
    return import_script(SCRIPT)


@pytest.fixture(scope="module", params=DEVICES)
def trained(request, mnist_root, tmp_path_factory):
    """One tiny eager run per device, as a user runs it: temp files in cwd/work, the INT8 model kept in cwd/out.
    Returns (device, cwd, the process, the result JSON)."""
    cwd = tmp_path_factory.mktemp(f"quant-{request.param}")
    (cwd / "work").mkdir()
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--work-dir", cwd / "work", "--save-dir", cwd / "out",
                      "--device", request.param, *TINY, cwd=cwd)
    return request.param, cwd, proc, result_json(proc)


@pytest.fixture(scope="module")
def pt2e_run(mnist_root, tmp_path_factory):
    """One tiny pt2e run on CPU, uncompiled (torch.compile of the int8 graph is checked apart, in-process)."""
    cwd = tmp_path_factory.mktemp("quant-pt2e")
    (cwd / "work").mkdir()
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--work-dir", cwd / "work", "--save-dir", cwd / "out",
                      "--device", "cpu", "--flow", "pt2e", "--no-compile", *TINY, cwd=cwd)
    return cwd, proc, result_json(proc)


# ---------------------------------------------------------------- the eager flow (the spec's)
def test_tiny_run_reports_sizes_accuracies_and_latencies(trained):
    device, _, proc, result = trained
    assert set(result) == KEYS
    assert result["size_fp32_kb"] > result["size_int8_kb"] > 0
    assert result["compression_ratio"] > 3  # int8 weights: about 3.6x at these widths
    assert math.isclose(result["compression_ratio"], result["size_fp32_kb"] / result["size_int8_kb"], rel_tol=1e-3)
    assert 0 <= result["acc_fp32"] <= 1 and 0 <= result["acc_int8"] <= 1
    for model in ("fp32", "int8"):
        for batch in (1, 256):
            assert result[f"latency_ms_{model}_b{batch}"] > 0
    assert result["test_images"] == 256 and result["engine"] == "fbgemm" and result["train_device"] == device
    assert (result["flow"], result["compiled"], result["compile_seconds"]) == ("eager", None, None)
    assert "runs on CPU" in result["notes"]
    assert math.isfinite(result["train_loss"])
    # The known deprecation warnings are replaced by one note, not dumped on stderr; no progress bar off a terminal.
    assert "filtered" in proc.stdout
    assert proc.stderr == "", proc.stderr[-2000:]


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


# ---------------------------------------------------------------- the pt2e flow (torchao)
def test_pt2e_run_reports_the_same_keys_plus_its_flow(pt2e_run, trained):
    _, proc, result = pt2e_run
    assert set(result) == KEYS
    assert (result["flow"], result["engine"], result["compiled"], result["compile_seconds"]) == (
        "pt2e", "x86_inductor", False, None)
    assert result["compression_ratio"] > 3 and result["size_int8_kb"] < 100  # int8 weights only, no float copies
    assert math.isclose(result["compression_ratio"], result["size_fp32_kb"] / result["size_int8_kb"], rel_tol=1e-3)
    assert abs(result["acc_int8"] - result["acc_fp32"]) <= 0.05  # 256 digits, 3 training batches: a few may flip
    assert all(result[f"latency_ms_{m}_b{b}"] > 0 for m in ("fp32", "int8") for b in (1, 256))
    assert "uncompiled" in result["notes"]
    assert proc.stderr == "", proc.stderr[-2000:]  # torchao's and inductor's known notices are quiet too
    device, _, _, eager = trained
    if device == "cpu":  # the same seed trains the same FP32 model whichever flow quantizes it
        assert (result["size_fp32_kb"], result["acc_fp32"], result["train_loss"]) == (
            eager["size_fp32_kb"], eager["acc_fp32"], eager["train_loss"])


def test_pt2e_saved_program_reloads_and_scores_like_the_run(pt2e_run, quest, mnist_root):
    cwd, _, result = pt2e_run
    assert sorted(p.name for p in cwd.iterdir()) == ["out", "work"] and list((cwd / "work").iterdir()) == []
    assert [p.name for p in (cwd / "out").iterdir()] == ["mini_cnn_int8_pt2e.pt2"]
    assert result["saved_model"] == str(cwd / "out" / "mini_cnn_int8_pt2e.pt2")
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  registers the quantized_decomposed ops it holds
    program = torch.export.load(result["saved_model"])
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets) and any("dequantize_per_channel" in t for t in targets)
    state = program.state_dict | dict(program.constants)
    assert sum(v.numel() for v in state.values() if v.dtype == torch.int8) > 80_000  # the conv and fc weights
    assert sum(v.numel() for v in state.values() if v.dtype == torch.float32) < 1_000  # scales and biases only
    x, y = quest.load_mnist(str(mnist_root), train=False, device="cpu")
    with torch.no_grad():
        log_probs = program.module()(x)
    assert (log_probs.argmax(1) == y).float().mean().item() == pytest.approx(result["acc_int8"])


def test_pt2e_converted_graph_is_int8_and_follows_fp32(quest, mnist_root):
    x, _ = quest.load_mnist(str(mnist_root), train=True, device="cpu")
    torch.manual_seed(0)
    fp32 = quest.MiniCNN().eval()
    int8 = quest.quantize_pt2e(fp32, x, [torch.arange(0, 64), torch.arange(64, 128)])
    state = int8.state_dict()
    int8_weights = sorted(tuple(v.shape) for v in state.values() if v.dtype == torch.int8)
    assert int8_weights == [(10, 6272), (16, 1, 3, 3), (128, 16, 3, 3)]  # per-channel int8: all three layers
    assert not any(k.endswith(".weight") for k in state), "convert_pt2e's unused float weights must be dropped"
    with torch.no_grad():
        q_out, f_out = int8(x[:128]), fp32(x[:128])
    assert (q_out.argmax(1) == f_out.argmax(1)).float().mean() > 0.9
    assert quest.state_dict_sizes_kb({"a.pth": fp32, "b.pth": int8})["b.pth"] < 100


def test_pt2e_compiled_model_matches_the_reference(quest, mnist_root):
    """The lowering the pt2e flow times: torch.compile (oneDNN int8 kernels), one small static batch size."""
    x, _ = quest.load_mnist(str(mnist_root), train=False, device="cpu")
    torch.manual_seed(0)
    int8 = quest.quantize_pt2e(quest.MiniCNN().eval(), x, [torch.arange(0, 32)])
    compiled, seconds = quest.compile_for_cpu(int8, [8], x)
    assert seconds > 0
    with torch.inference_mode():
        fast, reference = compiled(x[:8]), int8(x[:8])
    # Same int8 math; the fused kernels round a little differently (about 2e-3 in log-probs on a trained model).
    # This untrained model's logits are close together, so a near-tie may flip: most predictions must agree.
    assert (fast - reference).abs().max() < 0.05
    assert (fast.argmax(1) == reference.argmax(1)).float().mean() >= 0.75


def test_missing_torchao_fails_in_one_line_before_any_work(mnist_root, tmp_path):
    """A real subprocess whose `import torchao` raises ImportError (a shadowing package first on PYTHONPATH)."""
    shim = tmp_path / "shim" / "torchao"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named torchao')\n")
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--flow", "pt2e", "--save-dir", tmp_path / "out", *TINY,
                      cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "shim")})
    assert_clean_failure(proc, "--flow pt2e", "torchao", "pip install torchao==", "--flow eager")
    assert "act 1" not in proc.stdout  # refused before training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shim"]


# ---------------------------------------------------------------- data
def test_preprocessing_equals_the_spec_transforms(quest, mnist_root):
    x, y = quest.load_mnist(str(mnist_root), train=True, device="cpu")
    spec = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(root=str(mnist_root), train=True, download=False, transform=spec)
    assert x.shape == (512, 1, 28, 28) and y.dtype == torch.int64
    for i in (0, 1, 255, 511):
        image, label = ds[i]
        assert torch.equal(x[i], image) and y[i].item() == label


def _truncate(path):
    path.write_bytes(path.read_bytes()[:5000])


def _wrong_magic(path):
    path.write_bytes(b"<html>not found</html>" + path.read_bytes()[22:])


def _bad_label(path):
    data = bytearray(path.read_bytes())
    data[8 + 7] = 200
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file, damage, words", [
    ("train-images-idx3-ubyte", _truncate, ["truncated"]),
    ("t10k-labels-idx1-ubyte", _wrong_magic, ["idx header"]),
    ("train-labels-idx1-ubyte", _bad_label, ["label above 9"]),
], ids=["truncated images", "not an idx file", "label out of range"])
def test_corrupt_mnist_files_are_called_corrupt_by_name(file, damage, words, quest, tmp_path, capsys):
    root = write_mnist_subset(tmp_path / "data", 64, 32)
    damage(root / "MNIST" / "raw" / file)
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--data-dir", str(root), "--device", "cpu", *TINY])
    message = exit_info.value.code
    assert message.startswith("error: ") and "\n" not in message and "corrupt" in message, message
    assert str(root / "MNIST" / "raw" / file) in message and all(w in message for w in words), message
    assert "act 1" not in capsys.readouterr().out


def test_corrupt_file_in_a_subprocess_is_one_line(tmp_path):
    root = write_mnist_subset(tmp_path / "data", 64, 32)
    _truncate(root / "MNIST" / "raw" / "train-images-idx3-ubyte")
    proc = run_script(SCRIPT, "--data-dir", root, *TINY, cwd=tmp_path)
    assert_clean_failure(proc, "corrupt", "train-images-idx3-ubyte", "--data-dir")


def test_unreachable_download_fails_cleanly_and_leaves_nothing(tmp_path):
    """The spec's failure case, as a user meets it: a subprocess, one stderr line, no traceback."""
    (tmp_path / "work").mkdir()
    proc = run_script(SCRIPT, "--data-dir", "nodata", "--work-dir", tmp_path / "work", "--save-dir", tmp_path / "out",
                      *TINY, cwd=tmp_path)
    assert_clean_failure(proc, "MNIST", "could not be downloaded", "--data-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodata", "work"]  # nodata/: torchvision's download try
    assert list((tmp_path / "work").iterdir()) == [] and not list(tmp_path.rglob("*.pt*"))


# ---------------------------------------------------------------- flags and output folders, before any work
def test_defaults_equal_the_spec(quest, capsys):
    args = quest.parse_args([])
    assert (args.data_dir, args.device, args.seed, args.batch_size) == ("./data", "auto", 0, 64)
    assert (args.train_batches, args.calib_batches, args.engine, args.flow) == (100, 10, "fbgemm", "eager")
    with pytest.raises(SystemExit):
        quest.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: fbgemm)" in help_text and "{eager,pt2e}" in help_text and "{auto,cuda,mps,cpu}" in help_text


@pytest.mark.parametrize("args, words", [
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "-1"], ["--lr", "above 0"]),
    (["--latency-seconds", "inf"], ["--latency-seconds", "finite"]),  # used to time forever
    (["--latency-seconds", "-1"], ["--latency-seconds", ">= 0"]),
    (["--calib-batches", "0"], ["--calib-batches", ">= 1"]),
    (["--batch-size", "many"], ["--batch-size", "many"]),
    (["--device", "tpu"], ["--device", "tpu", "mps"]),
    (["--flow", "fx"], ["--flow", "fx", "pt2e"]),
    (["--engine", "tpu8"], ["--engine", "tpu8", "fbgemm"]),
], ids=["lr nan", "lr negative", "latency inf", "latency negative", "no calibration batches", "batch size text",
        "unknown device", "unknown flow", "unknown engine"])
def test_bad_flags_end_in_one_line_before_any_work(args, words, quest, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--data-dir", "nodata", "--save-dir", "out", *TINY, *args])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert all(word.lower() in message.lower() for word in words), message
    assert capsys.readouterr().err == ""  # no argparse usage dump
    assert list(tmp_path.iterdir()) == []  # nothing created, no download tried


def test_a_bad_flag_in_a_subprocess_is_one_line(tmp_path):
    assert_clean_failure(run_script(SCRIPT, "--device", "tpu", cwd=tmp_path), "--device", "auto", "--help")


@pytest.mark.parametrize("make, flag, words", [
    (lambda tmp: (tmp / "taken").write_text("x") and ["--save-dir", str(tmp / "taken")], "--save-dir", ["a file"]),
    (lambda tmp: (tmp / "taken").write_text("x") and ["--save-dir", str(tmp / "taken" / "out")], "--save-dir",
     ["under the file"]),
    (lambda tmp: ["--save-dir", "/proc/quest_14_1_out"], "--save-dir", ["not writable"]),
    (lambda tmp: ["--work-dir", str(tmp / "missing")], "--work-dir", ["not an existing folder"]),
], ids=["save dir is a file", "save dir under a file", "save dir unwritable", "missing work dir"])
def test_output_folders_are_checked_before_loading_anything(make, flag, words, quest, tmp_path, capsys):
    args = make(tmp_path)
    created = sorted(p.name for p in tmp_path.iterdir())
    # --data-dir points at nothing: a check made after loading would fail on MNIST instead, and try a download.
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--data-dir", str(tmp_path / "nodata"), *TINY, *args])
    message = exit_info.value.code
    assert message.startswith("error: " + flag) and all(w in message for w in words), message
    assert sorted(p.name for p in tmp_path.iterdir()) == created  # no folder made, no download tried


def test_unavailable_device_is_refused(quest):
    for name, present in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())):
        if present:
            assert quest.pick_device(name).type == name
            continue
        with pytest.raises(SystemExit) as exit_info:
            quest.pick_device(name)
        assert str(exit_info.value.code).startswith(f"error: --device {name} was requested but is not available")
    assert quest.pick_device("auto").type in {"cuda", "mps", "cpu"} and quest.pick_device("cpu").type == "cpu"


# ---------------------------------------------------------------- faults while running
def test_divergence_stops_with_one_line_naming_lr_and_keeps_earlier_outputs(quest, mnist_root, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mini_cnn_int8.pt").write_bytes(b"an earlier good model")
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--data-dir", str(mnist_root), "--save-dir", str(out), "--device", "cpu", *TINY, "--lr", "1e30"])
    message = exit_info.value.code
    assert message.startswith("error: FP32 training diverged") and "lower --lr" in message and "\n" not in message
    assert (out / "mini_cnn_int8.pt").read_bytes() == b"an earlier good model" and len(list(out.iterdir())) == 1
    assert "{" not in capsys.readouterr().out  # no JSON result line


def _full_disk(monkeypatch, quest):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(quest.os, "fsync", no_space)  # the temp file is written, then the disk "fills up"


def test_full_disk_keeps_the_old_model_and_leaves_no_temp_file(quest, tmp_path, monkeypatch):
    quest.silence_known_warnings()
    model = quest.quantize(quest.MiniCNN().eval(), torch.randn(64, 1, 28, 28), [torch.arange(64)], "fbgemm")
    (tmp_path / "mini_cnn_int8.pt").write_bytes(b"an earlier good model")
    _full_disk(monkeypatch, quest)
    with pytest.raises(SystemExit) as exit_info:  # TorchScript is serialized in memory: no C++ abort
        quest.save_torchscript(model, tmp_path)
    assert "the disk is full" in exit_info.value.code and str(tmp_path / "mini_cnn_int8.pt") in exit_info.value.code
    assert [p.name for p in tmp_path.iterdir()] == ["mini_cnn_int8.pt"]  # no .tmp, no .partial
    assert (tmp_path / "mini_cnn_int8.pt").read_bytes() == b"an earlier good model"
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(SystemExit, match="the disk is full"):  # Act 5's temp files: their folder goes too
        quest.state_dict_sizes_kb({"temp_fp32_model.pth": quest.MiniCNN()}, str(work))
    assert list(work.iterdir()) == []


class BrokenModel(nn.Module):
    def state_dict(self, *args, **kwargs):
        raise RuntimeError("cannot serialize")


def test_temp_files_are_removed_when_saving_fails(quest, tmp_path):
    with pytest.raises(RuntimeError, match="cannot serialize"):
        quest.state_dict_sizes_kb({"temp_fp32_model.pth": quest.MiniCNN(), "temp_int8_model.pth": BrokenModel()},
                                  str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the FP32 file was written, then removed with its folder
    sizes = quest.state_dict_sizes_kb({"temp_fp32_model.pth": quest.MiniCNN()}, str(tmp_path))
    assert sizes["temp_fp32_model.pth"] > 100 and list(tmp_path.iterdir()) == []


def test_ctrl_c_ends_in_one_line_exit_130_and_leaves_nothing(mnist_root, tmp_path):
    """A real SIGINT to a running script, once it says it is training."""
    (tmp_path / "work").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mini_cnn_int8.pt").write_bytes(b"an earlier good model")
    proc = interrupt_script(SCRIPT, "--data-dir", mnist_root, "--device", "cpu", "--work-dir", "work",
                            "--save-dir", "out", "--train-batches", "1000000", ready="act 1:", cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr
    lines = [assert_clean_failure(proc, "interrupted (Ctrl-C)")]
    assert "nothing was saved" in lines[0]
    assert list((tmp_path / "work").iterdir()) == []
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mini_cnn_int8.pt"]
    assert (tmp_path / "out" / "mini_cnn_int8.pt").read_bytes() == b"an earlier good model"
