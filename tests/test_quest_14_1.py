"""quest_14_1.py (static INT8 quantization): small real runs on a few hundred real digits in every flow (eager,
the spec's; qat; pt2e, torchao's), the proof that INT8 follows the FP32 model it came from, the engines each CPU
gets, the per-layer SQNR, the temp-file discipline and every fault class (bad numbers, bad output folders,
corrupt or empty data, divergence, a full disk, Ctrl-C and SIGTERM, torchao missing)."""
import errno
import json
import math
import os
import signal
import sys

import pytest
import torch
import torch.nn as nn
from torchvision import datasets, transforms

from conftest import DEVICES, SHIPPED_MNIST, assert_clean_failure, import_script, result_json, run_script, \
    write_mnist_subset
from tools.kit import FullDiskFile, interrupt_script, stop_while_starting

SCRIPT = "quest_14_1.py"
# 20 batches of 32 on 512 digits: enough to learn (~85% on 256 test digits), a second of CPU.
TINY = ["--train-batches", "20", "--calib-batches", "2", "--batch-size", "32", "--latency-seconds", "0.02",
        "--qat-batches", "4"]
# Figures that must repeat exactly for the same seed (latencies are wall-clock and do not).
DETERMINISTIC = ("size_fp32_kb", "size_int8_kb", "compression_ratio", "acc_fp32", "acc_int8", "train_loss", "layers")
KEYS = {"size_fp32_kb", "size_int8_kb", "compression_ratio", "notes", "acc_fp32", "acc_int8", "train_loss", "engine",
        "train_device", "test_images", "saved_model", "flow", "compiled", "compile_seconds", "layers", "observer",
        "qat_batches", "acc_fp32_fine_tuned", "latency_ms_fp32_b1", "latency_ms_int8_b1", "latency_ms_fp32_b256",
        "latency_ms_int8_b256"}
LAYERS = ["conv1", "conv2", "fc1"]


@pytest.fixture(scope="module")
def quest():
    """The script imported as a module, for in-process checks of its parts."""
    return import_script(SCRIPT)


def run_main(quest, capsys, *args):
    """quest.main in-process; returns its JSON result line."""
    quest.main([str(a) for a in args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def one_line_error(call):
    """Run call(); it must end as every fault does: a one-line SystemExit that starts with 'error:'."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def assert_layers(result, min_db):
    assert [layer["name"] for layer in result["layers"]] == LAYERS
    for layer in result["layers"]:
        assert math.isfinite(layer["sqnr_db"]) and layer["sqnr_db"] > min_db, result["layers"]


@pytest.fixture(scope="module", params=DEVICES)
def trained(request, mnist_root, tmp_path_factory):
    """One small eager run per device, as a user runs it: temp files in cwd/work, the INT8 model kept in cwd/out.
    Returns (device, cwd, the process, the result JSON)."""
    cwd = tmp_path_factory.mktemp(f"quant-{request.param}")
    (cwd / "work").mkdir()
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--work-dir", cwd / "work", "--save-dir", cwd / "out",
                      "--device", request.param, *TINY, cwd=cwd)
    return request.param, cwd, proc, result_json(proc)


# ---------------------------------------------------------------- it learns, and INT8 follows FP32
@pytest.mark.slow
def test_int8_agrees_with_the_fp32_model_it_came_from(quest):
    """The quest's promise, on the 1,000 shipped test digits: the FP32 model learned (far above the 10% of
    chance) and its INT8 copy predicts the same digit almost everywhere, within a point of its accuracy."""
    quest.silence_known_warnings()
    images, labels = quest.load_mnist("mnist", SHIPPED_MNIST.parents[1], train=True)
    x, y = quest.normalize(images), labels
    images, labels = quest.load_mnist("mnist", SHIPPED_MNIST.parents[1], train=False)
    test_x, test_y = quest.normalize(images), labels
    torch.manual_seed(0)
    fp32 = quest.MiniCNN()
    batches = quest.shuffled_batches(len(x), 64, torch.Generator().manual_seed(0), "cpu")
    quest.train(fp32, x, y, [next(batches) for _ in range(40)], 1e-3, torch.device("cpu"), "FP32 training", "--lr")
    fp32.eval()
    int8 = quest.quantize_eager(fp32, x, [next(batches) for _ in range(4)], "fbgemm", "histogram")
    acc_fp32, acc_int8 = quest.accuracy(fp32, test_x, test_y), quest.accuracy(int8, test_x, test_y)
    assert acc_fp32 > 0.8
    with torch.inference_mode():
        agree = (int8(test_x).argmax(1) == fp32(test_x).argmax(1)).float().mean().item()
    assert agree > 0.97 and abs(acc_int8 - acc_fp32) <= 0.01, (agree, acc_fp32, acc_int8)


# ---------------------------------------------------------------- the eager flow (the spec's), as a user runs it
@pytest.mark.slow
def test_run_reports_sizes_accuracies_latencies_and_layers(trained):
    device, _, proc, result = trained
    assert set(result) == KEYS
    assert result["size_fp32_kb"] > result["size_int8_kb"] and result["compression_ratio"] > 3.5
    assert math.isclose(result["compression_ratio"], result["size_fp32_kb"] / result["size_int8_kb"], rel_tol=1e-3)
    assert result["acc_fp32"] > 0.6 and abs(result["acc_int8"] - result["acc_fp32"]) <= 0.03  # 256 test digits
    assert_layers(result, 20)
    assert result["test_images"] == 256 and result["engine"] == "fbgemm" and result["train_device"] == device
    assert (result["flow"], result["observer"], result["compiled"], result["acc_fp32_fine_tuned"]) == (
        "eager", "histogram", None, None)
    assert proc.stdout.startswith("engine: fbgemm (auto: this CPU is x86_64")  # the first line says which and why
    assert "per-layer SQNR" in proc.stdout and "filtered" in proc.stdout
    assert proc.stderr == "", proc.stderr[-2000:]  # no warnings dumped; no progress bar off a terminal


@pytest.mark.slow
def test_no_temp_file_is_left_behind(trained):
    _, cwd, _, result = trained
    assert sorted(p.name for p in cwd.iterdir()) == ["out", "work"]  # nothing dropped in the working directory
    assert list((cwd / "work").iterdir()) == []  # the temp .pth files and their folder are gone
    assert [p.name for p in (cwd / "out").iterdir()] == ["mini_cnn_int8.pt"]
    assert result["saved_model"] == str(cwd / "out" / "mini_cnn_int8.pt")


@pytest.mark.slow
def test_saved_torchscript_reloads_and_scores_like_the_run(trained, quest, mnist_root):
    _, cwd, _, result = trained
    quest.silence_known_warnings()  # torch.jit.load's deprecation notice
    torch.backends.quantized.engine = "fbgemm"  # the engine the run quantized for
    model = torch.jit.load(str(cwd / "out" / "mini_cnn_int8.pt"))
    assert model.conv1._c.qualified_name.endswith("intrinsic.quantized.modules.conv_relu.ConvReLU2d")
    assert model.conv1._packed_params.unpack()[0].dtype == torch.qint8
    images, labels = quest.load_mnist("mnist", mnist_root, train=False)
    with torch.inference_mode():
        log_probs = model(quest.normalize(images))
    assert torch.allclose(log_probs.exp().sum(1), torch.ones(256), atol=1e-3)
    assert (log_probs.argmax(1) == labels).float().mean().item() == pytest.approx(result["acc_int8"])


@pytest.mark.slow
def test_same_seed_gives_the_same_figures(trained, quest, mnist_root, tmp_path, capsys):
    device, _, _, first = trained
    if device != "cpu":
        pytest.skip("bitwise repeatability is checked on CPU")
    again = run_main(quest, capsys, "--data-dir", mnist_root, "--work-dir", tmp_path, "--device", "cpu", *TINY)
    assert {k: again[k] for k in DETERMINISTIC} == {k: first[k] for k in DETERMINISTIC}
    assert again["saved_model"] is None and list(tmp_path.iterdir()) == []


def test_converted_model_holds_quantized_modules_and_the_observer_decides_the_weights(quest):
    quest.silence_known_warnings()
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    per_channel = quest.quantize_eager(quest.MiniCNN().eval(), x, [torch.arange(64)], "fbgemm", "histogram")
    assert isinstance(per_channel.quant, torch.ao.nn.quantized.Quantize)
    assert isinstance(per_channel.conv1, torch.ao.nn.intrinsic.quantized.ConvReLU2d)  # conv1+relu1 fused
    assert isinstance(per_channel.fc1, torch.ao.nn.quantized.Linear) and isinstance(per_channel.relu1, nn.Identity)
    assert per_channel.conv2.weight().qscheme() == torch.per_channel_affine
    per_tensor = quest.quantize_eager(quest.MiniCNN().eval(), x, [torch.arange(64)], "fbgemm", "minmax")
    assert per_tensor.conv2.weight().qscheme() == torch.per_tensor_affine
    assert per_tensor.fc1.weight().dtype == torch.qint8


def test_layer_sqnr_measures_the_error(quest):
    """On float stand-ins for the INT8 model (fused like it, so conv1 ends in its ReLU): an exact copy gives a large
    finite figure at every layer; 10% noise on fc1's weights about 20 dB there, and nothing before it."""
    torch.manual_seed(0)
    fp32, batches, x = quest.MiniCNN().eval(), [torch.arange(32)], torch.randn(32, 1, 28, 28)
    exact = quest.layer_sqnr(fp32, quest.cpu_copy(fp32).eval().fuse(), x, batches, "eager")
    assert [layer["name"] for layer in exact] == LAYERS and all(layer["sqnr_db"] > 200 for layer in exact)
    noisy = quest.cpu_copy(fp32).eval().fuse()
    with torch.no_grad():
        noisy.fc1.weight.add_(0.1 * noisy.fc1.weight.std() * torch.randn_like(noisy.fc1.weight))
    layers = {layer["name"]: layer["sqnr_db"] for layer in quest.layer_sqnr(fp32, noisy, x, batches, "eager")}
    assert layers["conv1"] > 200 and 10 < layers["fc1"] < 30


# ---------------------------------------------------------------- engines: auto, forced, refused
def test_engine_auto_picks_fbgemm_on_x86_and_qnnpack_on_arm(quest, monkeypatch):
    if quest.cpu_family() == "x86":
        assert quest.pick_engine("auto", "eager")[0] == "fbgemm"
        assert quest.pick_engine("auto", "pt2e")[0] == "x86_inductor"
    monkeypatch.setattr(quest.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack", "none"])
    engine, why = quest.pick_engine("auto", "qat")
    assert engine == "qnnpack" and "arm64" in why
    assert quest.pick_engine("auto", "pt2e")[0] == "arm_inductor"
    message = one_line_error(lambda: quest.pick_engine("fbgemm", "eager"))  # an x86 engine on an ARM CPU
    assert "--engine fbgemm is not available" in message and "arm64" in message and "qnnpack" in message
    monkeypatch.setattr(quest.platform, "machine", lambda: "riscv64")
    assert "riscv64" in one_line_error(lambda: quest.pick_engine("auto", "pt2e"))


def test_an_engine_this_torch_lacks_fails_in_one_line_before_any_work(quest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["fbgemm", "none"])
    message = one_line_error(lambda: quest.main(["--data-dir", "nodata", "--engine", "qnnpack", *TINY]))
    assert "--engine qnnpack is not available" in message and "--engine auto or fbgemm" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_qnnpack_runs_end_to_end_on_this_cpu(quest, mnist_root, capsys):
    """The ARM engine, forced on whatever CPU runs the tests (qnnpack is built into x86 torch too)."""
    result = run_main(quest, capsys, "--data-dir", mnist_root, "--device", "cpu", "--engine", "qnnpack", *TINY)
    assert result["engine"] == "qnnpack" and result["compression_ratio"] > 3.5
    assert abs(result["acc_int8"] - result["acc_fp32"]) <= 0.03
    assert_layers(result, 20)


# ---------------------------------------------------------------- quantization-aware training
@pytest.mark.slow
def test_qat_flow_fine_tunes_then_converts(quest, mnist_root, tmp_path, capsys):
    result = run_main(quest, capsys, "--data-dir", mnist_root, "--device", "cpu", "--flow", "qat",
                      "--save-dir", tmp_path, *TINY)
    assert (result["flow"], result["engine"], result["qat_batches"], result["observer"]) == ("qat", "fbgemm", 4, None)
    # QAT's extra steps also train: on this barely trained model INT8 may gain, but must not lose.
    assert result["compression_ratio"] > 3.5 and result["acc_int8"] >= result["acc_fp32"] - 0.03
    assert abs(result["acc_int8"] - result["acc_fp32_fine_tuned"]) <= 0.03  # INT8 follows the weights it learned
    assert_layers(result, 20)
    quest.silence_known_warnings()
    model = torch.jit.load(result["saved_model"])
    assert model.conv2._c.qualified_name.endswith("intrinsic.quantized.modules.conv_relu.ConvReLU2d")


def test_qat_freezes_the_observers_for_the_second_half_and_draws_its_batches_one_at_a_time(quest, monkeypatch):
    frozen_at = []
    real_train = quest.train

    def spy(model, x, y, batches, lr, device, name, flag, steps=None):
        observing = [m.observer_enabled.item() for m in model.modules() if hasattr(m, "observer_enabled")]
        batches = list(batches)
        assert steps == len(batches), "the progress bar's total (its percentage and ETA) is the batches drawn"
        frozen_at.append((len(batches), set(observing)))
        return real_train(model, x, y, batches, lr, device, name, flag, steps)
    monkeypatch.setattr(quest, "train", spy)
    quest.silence_known_warnings()
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    source = iter([torch.arange(16)] * 1000)  # as the script's endless batches: only the 5 steps asked for are drawn
    int8, fine_tuned = quest.quantize_qat(quest.MiniCNN(), x, y, source, 5, "fbgemm", 1e-4)
    assert frozen_at == [(2, {1}), (3, {0})] and len(list(source)) == 995
    assert isinstance(int8.conv1, torch.ao.nn.intrinsic.quantized.ConvReLU2d)
    assert type(fine_tuned) is quest.MiniCNN and not fine_tuned.training


# ---------------------------------------------------------------- the pt2e flow (torchao)
@pytest.mark.slow
def test_pt2e_run_saves_a_program_that_reloads_and_scores_like_the_run(quest, mnist_root, tmp_path, capsys):
    """Uncompiled (torch.compile of the int8 graph is checked apart)."""
    (tmp_path / "work").mkdir()
    result = run_main(quest, capsys, "--data-dir", mnist_root, "--work-dir", tmp_path / "work", "--save-dir",
                      tmp_path / "out", "--device", "cpu", "--flow", "pt2e", "--no-compile", *TINY)
    assert set(result) == KEYS
    assert (result["flow"], result["engine"], result["compiled"], result["compile_seconds"]) == (
        "pt2e", "x86_inductor", False, None)
    assert result["compression_ratio"] > 3.5 and result["size_int8_kb"] < 100  # int8 weights only, no float copies
    assert abs(result["acc_int8"] - result["acc_fp32"]) <= 0.03
    assert_layers(result, 20)
    assert list((tmp_path / "work").iterdir()) == []
    assert result["saved_model"] == str(tmp_path / "out" / "mini_cnn_int8_pt2e.pt2")
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  registers the quantized_decomposed ops it holds
    program = torch.export.load(result["saved_model"])
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets) and any("dequantize_per_channel" in t for t in targets)
    images, labels = quest.load_mnist("mnist", mnist_root, train=False)
    with torch.no_grad():
        log_probs = program.module()(quest.normalize(images))
    assert (log_probs.argmax(1) == labels).float().mean().item() == pytest.approx(result["acc_int8"])


@pytest.mark.slow
def test_pt2e_qat_flow_fine_tunes_in_the_graph_then_converts(quest, mnist_root, capsys):
    result = run_main(quest, capsys, "--data-dir", mnist_root, "--device", "cpu", "--flow", "pt2e-qat", "--no-compile",
                      *TINY)
    assert (result["flow"], result["engine"], result["qat_batches"]) == ("pt2e-qat", "x86_inductor", 4)
    assert result["compression_ratio"] > 3.5 and result["acc_int8"] >= result["acc_fp32"] - 0.03
    assert_layers(result, 20)


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["x86_inductor", "arm_inductor"])
def test_pt2e_converted_graph_is_int8_and_follows_fp32(quantizer, quest):
    """Both inductor quantizers (the Arm one runs its reference graph on any CPU), on an untrained model."""
    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28)
    fp32 = quest.MiniCNN().eval()
    int8 = quest.quantize_pt2e(fp32, x, [torch.arange(0, 64), torch.arange(64, 128)], quantizer)
    state = int8.state_dict()
    assert sorted(tuple(v.shape) for v in state.values() if v.dtype == torch.int8) == [
        (10, 6272), (16, 1, 3, 3), (128, 16, 3, 3)]  # int8 weights: all three layers
    assert not any(k.endswith(".weight") for k in state), "convert_pt2e's unused float weights must be dropped"
    layers = quest.layer_sqnr(fp32, int8, x, [torch.arange(64)], "pt2e")
    assert [layer["name"] for layer in layers] == LAYERS and all(20 < layer["sqnr_db"] < 200 for layer in layers)


@pytest.mark.slow
def test_pt2e_compiled_model_matches_the_reference(quest, mnist_root):
    """The lowering the pt2e flow times: torch.compile (oneDNN int8 kernels), one small static batch size."""
    images, _ = quest.load_mnist("mnist", mnist_root, train=False)
    x = quest.normalize(images)
    torch.manual_seed(0)
    int8 = quest.quantize_pt2e(quest.MiniCNN().eval(), x, [torch.arange(0, 32)], "x86_inductor")
    compiled, _ = quest.compile_for_cpu(int8, [8], x)
    with torch.inference_mode():
        fast, reference = compiled(x[:8]), int8(x[:8])
    # Same int8 math; the fused kernels round a little differently (about 2e-3 in log-probs on a trained model).
    # This untrained model's logits are close together, so a near-tie may flip: most predictions must agree.
    assert (fast - reference).abs().max() < 0.05
    assert (fast.argmax(1) == reference.argmax(1)).float().mean() >= 0.75


def test_missing_torchao_fails_in_one_line_before_any_work(quest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)  # import raises ImportError
    message = one_line_error(lambda: quest.main(["--data-dir", "nodata", "--flow", "pt2e", "--save-dir", "out"]))
    assert all(w in message for w in ("--flow pt2e", "torchao", "pip install torchao==", "--flow eager")), message
    assert list(tmp_path.iterdir()) == []  # refused before loading or creating anything


# ---------------------------------------------------------------- data
def test_preprocessing_equals_the_spec_transforms(quest, mnist_root):
    images, labels = quest.load_mnist("mnist", mnist_root, train=True)
    x = quest.normalize(images)
    spec = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(root=str(mnist_root), train=True, download=False, transform=spec)
    assert x.shape == (512, 1, 28, 28) and labels.dtype == torch.int64
    for i in (0, 1, 255, 511):
        image, label = ds[i]
        assert torch.equal(x[i], image) and labels[i].item() == label


def _truncate(path):
    path.write_bytes(path.read_bytes()[:5000])


def _wrong_magic(path):
    path.write_bytes(b"<html>not found</html>" + path.read_bytes()[22:])


def _bad_label(path):
    data = bytearray(path.read_bytes())
    data[8 + 7] = 200
    path.write_bytes(bytes(data))


def _no_items(path):
    """A valid IDX header that promises 0 items, and nothing after it."""
    data = bytearray(path.read_bytes()[:4 * (path.read_bytes()[3] + 1)])
    data[4:8] = (0).to_bytes(4, "big")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file, damage, words", [
    ("train-images-idx3-ubyte", _truncate, ["corrupt", "truncated"]),
    ("t10k-labels-idx1-ubyte", _wrong_magic, ["corrupt", "IDX header"]),
    ("train-labels-idx1-ubyte", _bad_label, ["corrupt", "label above 9"]),
    ("train-images-idx3-ubyte", _no_items, ["holds no images"]),
    ("t10k-labels-idx1-ubyte", _no_items, ["corrupt", "0 labels for 32 images"]),
], ids=["truncated images", "not an idx file", "label out of range", "0 images", "0 labels"])
def test_corrupt_or_empty_mnist_files_end_in_one_line_naming_the_file(file, damage, words, quest, tmp_path, capsys):
    root = write_mnist_subset(tmp_path / "data", 64, 32)
    damage(root / "MNIST" / "raw" / file)
    message = one_line_error(lambda: quest.main(["--data-dir", str(root), "--device", "cpu", *TINY]))
    assert str(root / "MNIST" / "raw" / file) in message and all(w in message for w in words), message
    assert "act 1" not in capsys.readouterr().out


def test_a_huge_file_under_a_data_files_name_is_refused_before_it_is_read(quest, tmp_path):
    root = write_mnist_subset(tmp_path / "data", 64, 32)
    images = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    os.truncate(images, 64 * 2 ** 30)  # 64 GB, sparse: read whole, it would fill the memory before any check
    message = one_line_error(lambda: quest.load_mnist("mnist", root, train=False))
    assert f"{images} is corrupt" in message and f"it holds {64 * 2 ** 30}" in message, message


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_data_file_that_is_a_fifo_or_folder_ends_in_one_line_without_reading_it(kind, quest, tmp_path):
    root = write_mnist_subset(tmp_path / "data", 64, 32)
    labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.unlink()
    os.mkfifo(labels) if kind == "fifo" else labels.mkdir()  # a download would wait on the FIFO forever
    message = one_line_error(lambda: quest.load_mnist("mnist", root, train=False))
    assert f"{labels} is not a regular file" in message and "--data-dir" in message, message


@pytest.mark.slow
def test_unreachable_download_fails_cleanly_and_leaves_nothing(tmp_path):
    """The spec's failure case, as a user meets it: a subprocess, one stderr line, no traceback."""
    (tmp_path / "work").mkdir()
    proc = run_script(SCRIPT, "--data-dir", "nodata", "--work-dir", tmp_path / "work", "--save-dir", tmp_path / "out",
                      *TINY, cwd=tmp_path)
    assert_clean_failure(proc, "mnist", "could not be downloaded", "--data-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodata", "work"]  # nodata/: torchvision's download try
    assert list((tmp_path / "work").iterdir()) == [] and not list(tmp_path.rglob("*.pt*"))


# ---------------------------------------------------------------- flags and output folders, before any work
def test_defaults_equal_the_spec(quest, capsys):
    args = quest.parse_args([])
    assert (args.data_dir, args.device, args.seed, args.batch_size) == ("./data", "auto", 0, 64)
    assert (args.train_batches, args.calib_batches, args.engine, args.flow) == (100, 10, "auto", "eager")
    with pytest.raises(SystemExit):
        quest.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: auto)" in help_text and "{eager,qat,pt2e,pt2e-qat}" in help_text and "0 to 2^32-1" in help_text


@pytest.mark.parametrize("args, words", [
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "-1"], ["--lr", "above 0"]),
    (["--qat-lr", "inf"], ["--qat-lr", "finite"]),
    (["--latency-seconds", "inf"], ["--latency-seconds", "finite"]),  # used to time forever
    (["--latency-seconds", "-1"], ["--latency-seconds", "[0, 600]"]),
    (["--calib-batches", "0"], ["--calib-batches", "[1, 1000]"]),
    (["--qat-batches", "1"], ["--qat-batches", "[2, 1000000]"]),
    (["--batch-size", "many"], ["--batch-size", "many"]),
    (["--seed", "-1"], ["--seed", "[0, 4294967295]"]),
    (["--seed", str(2**64)], ["--seed", "[0, 4294967295]"]),
    (["--device", "tpu"], ["--device", "tpu", "mps"]),
    (["--qat-batches", "1000000000"], ["--qat-batches", "[2, 1000000]"]),  # once listed a billion batches up front
    (["--train-batches", "1000001"], ["--train-batches", "[1, 1000000]"]),
    (["--calib-batches", "1001"], ["--calib-batches", "[1, 1000]"]),
    (["--batch-size", "8193"], ["--batch-size", "[1, 8192]"]),
    (["--latency-seconds", "601"], ["--latency-seconds", "[0, 600]"]),
    (["--save-dir", "caf\udce9"], ["--save-dir", "'caf\\udce9' is not valid UTF-8"]),  # a Latin-1 byte from the shell
    (["--work-dir", "caf\udce9"], ["--work-dir", "not valid UTF-8"]),
    (["--flow", "fx"], ["--flow", "fx", "pt2e"]),
    (["--engine", "xnnpack"], ["--engine", "xnnpack", "qnnpack"]),
    (["--engine", "qnnpack", "--flow", "pt2e"], ["--engine qnnpack is for --flow eager or qat"]),
    (["--observer", "minmax", "--flow", "qat"], ["--observer is for --flow eager"]),
], ids=["lr nan", "lr negative", "qat lr inf", "latency inf", "latency negative", "no calibration batches",
        "one qat batch", "batch size text", "negative seed", "seed 2^64", "unknown device", "a billion qat batches",
        "too many train batches", "too many calibration batches", "batch too big", "latency budget too long",
        "save dir not utf-8", "work dir not utf-8", "unknown flow",
        "unknown engine", "engine with pt2e", "observer with qat"])
def test_bad_flags_end_in_one_line_before_any_work(args, words, quest, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    message = one_line_error(lambda: quest.main(["--data-dir", "nodata", "--save-dir", "out", *TINY, *args]))
    assert all(word.lower() in message.lower() for word in words), message
    assert capsys.readouterr().err == ""  # no argparse usage dump
    assert list(tmp_path.iterdir()) == []  # nothing created, no download tried


@pytest.mark.parametrize("make, flag, words", [
    (lambda tmp: (tmp / "taken").write_text("x") and ["--save-dir", str(tmp / "taken")], "--save-dir", ["a file"]),
    (lambda tmp: (tmp / "taken").write_text("x") and ["--save-dir", str(tmp / "taken" / "out")], "--save-dir",
     ["under the file"]),
    (lambda tmp: ["--save-dir", "/proc/quest_14_1_out"], "--save-dir", ["not writable"]),
    (lambda tmp: ["--save-dir", str(tmp / ("x" * 300))], "--save-dir", ["pass a shorter path"]),
    (lambda tmp: ["--work-dir", str(tmp / "missing")], "--work-dir", ["not an existing folder"]),
    (lambda tmp: ["--work-dir", str(tmp / ("w" * 300))], "--work-dir", ["pass a shorter path"]),
], ids=["save dir is a file", "save dir under a file", "save dir unwritable", "save dir name too long",
        "missing work dir", "work dir name too long"])
def test_output_folders_are_checked_before_loading_anything(make, flag, words, quest, tmp_path):
    args = make(tmp_path)
    created = sorted(p.name for p in tmp_path.iterdir())
    # --data-dir points at nothing: a check made after loading would fail on MNIST instead, and try a download.
    message = one_line_error(lambda: quest.main(["--data-dir", str(tmp_path / "nodata"), *TINY, *args]))
    assert message.startswith("error: " + flag) and all(w in message for w in words), message
    assert sorted(p.name for p in tmp_path.iterdir()) == created  # no folder made, no download tried


def test_unavailable_device_is_refused(quest):
    for name, present in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())):
        if present:
            assert quest.pick_device(name).type == name
            continue
        message = one_line_error(lambda: quest.pick_device(name))
        assert message.startswith(f"error: --device {name} was requested but is not available")


# ---------------------------------------------------------------- faults while running
@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--lr", "--qat-lr"])
def test_divergence_stops_with_one_line_naming_the_flag_and_keeps_earlier_outputs(flag, quest, mnist_root, tmp_path,
                                                                                   capsys):
    """One optimizer step to infinity, in FP32 training or in QAT: no save, the earlier model byte-identical."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mini_cnn_int8.pt").write_bytes(b"an earlier good model")
    message = one_line_error(lambda: quest.main(["--data-dir", str(mnist_root), "--save-dir", str(out), "--device",
                                                 "cpu", "--flow", "qat", *TINY, flag, "1e30"]))
    assert "diverged" in message and f"lower {flag} (now 1e+30)" in message, message
    assert [p.name for p in out.iterdir()] == ["mini_cnn_int8.pt"]
    assert (out / "mini_cnn_int8.pt").read_bytes() == b"an earlier good model"
    assert "{" not in capsys.readouterr().out  # no JSON result line


def test_a_failure_writing_the_model_leaves_no_json_line(quest, mnist_root, tmp_path, capsys):
    """The JSON line comes after every file the run promises: here the INT8 model cannot take its name."""
    (tmp_path / "out" / "mini_cnn_int8.pt" / "in-the-way").mkdir(parents=True)
    message = one_line_error(lambda: quest.main(["--data-dir", str(mnist_root), "--device", "cpu", "--save-dir",
                                                 str(tmp_path / "out"), *TINY]))
    assert "could not write" in message and "mini_cnn_int8.pt" in message, message
    assert "{" not in capsys.readouterr().out  # no JSON result line


def _full_disk(monkeypatch, quest):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(quest.os, "fsync", no_space)  # the temp file is written, then the disk "fills up"


def test_full_disk_keeps_the_old_model_and_leaves_no_temp_file(quest, tmp_path, monkeypatch):
    quest.silence_known_warnings()
    model = quest.quantize_eager(quest.MiniCNN().eval(), torch.randn(64, 1, 28, 28), [torch.arange(64)], "fbgemm",
                                 "histogram")
    (tmp_path / "mini_cnn_int8.pt").write_bytes(b"an earlier good model")
    _full_disk(monkeypatch, quest)
    message = one_line_error(lambda: quest.save_int8(model, "eager", tmp_path, None))  # serialized in memory first
    assert "the disk is full" in message and str(tmp_path / "mini_cnn_int8.pt") in message
    assert [p.name for p in tmp_path.iterdir()] == ["mini_cnn_int8.pt"]  # no .tmp
    assert (tmp_path / "mini_cnn_int8.pt").read_bytes() == b"an earlier good model"


def test_a_full_disk_under_act_5s_temp_files_names_work_dir_and_leaves_nothing(quest, tmp_path, monkeypatch):
    monkeypatch.setattr(quest, "open", FullDiskFile, raising=False)
    message = one_line_error(lambda: quest.state_dict_sizes_kb({"temp_fp32_model.pth": quest.MiniCNN()}, str(tmp_path)))
    assert "temp_fp32_model.pth" in message and "the disk is full" in message, message
    assert f"--work-dir {tmp_path}" in message and "pass another --work-dir" in message, message
    assert list(tmp_path.iterdir()) == []  # the temp file and its folder are gone
    message = one_line_error(lambda: quest.state_dict_sizes_kb({"temp_fp32_model.pth": quest.MiniCNN()}))
    assert "system temp folder" in message and "pass --work-dir" in message, message


class BrokenModel(nn.Module):
    def state_dict(self, *args, **kwargs):
        raise RuntimeError("cannot serialize")


def test_temp_files_are_removed_when_saving_fails(quest, tmp_path):
    with pytest.raises(RuntimeError, match="cannot serialize"):
        quest.state_dict_sizes_kb({"temp_fp32_model.pth": quest.MiniCNN(), "temp_int8_model.pth": BrokenModel()},
                                  str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the FP32 file was written, then removed with its folder


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                              (signal.SIGTERM, 143, "stopped by SIGTERM")], ids=["Ctrl-C", "SIGTERM"])
def test_a_signal_while_training_ends_in_one_line_and_leaves_nothing(sig, code, words, mnist_root, tmp_path):
    """A real signal to a running script, once it says it is training."""
    (tmp_path / "work").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mini_cnn_int8.pt").write_bytes(b"an earlier good model")
    proc = interrupt_script(SCRIPT, "--data-dir", mnist_root, "--device", "cpu", "--work-dir", "work",
                            "--save-dir", "out", "--train-batches", "1000000", ready="act 1:", cwd=tmp_path, sig=sig)
    assert proc.returncode == code, proc.stderr
    assert "nothing was saved" in assert_clean_failure(proc, words, "run the command again")
    assert list((tmp_path / "work").iterdir()) == []
    assert (tmp_path / "out" / "mini_cnn_int8.pt").read_bytes() == b"an earlier good model"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["Ctrl-C", "SIGTERM"])
def test_a_signal_while_starting_ends_in_one_line(sig, code, tmp_path, monkeypatch):
    # A tqdm that takes 3 s to import holds the script inside its imports (a warm torch alone loads in under the
    # 0.4 s the signal waits, and the run would be over before it). The script holds the signal until its imports
    # end, then ends in one line.
    shim = tmp_path / "shim" / "tqdm"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("import time\ntime.sleep(3)\ntqdm = None\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shim"))
    (tmp_path / "cwd").mkdir()
    proc = stop_while_starting(SCRIPT, "--data-dir", "nodata", cwd=tmp_path / "cwd", sig=sig)
    assert proc.returncode == code, proc.stderr
    assert_clean_failure(proc, "interrupted while starting")
    assert list((tmp_path / "cwd").iterdir()) == []
