"""Quest 14.1: post-training static INT8 quantization -- the golem gets lighter, not dumber.

Act 1  train a small FP32 CNN on MNIST for 100 batches (Adam).
Act 2  copy it into a fresh model, fuse conv+ReLU, attach the fbgemm qconfig, `prepare` inserts observers.
Act 3  calibrate: run 10 training batches through it so the observers see real activation ranges.
Act 4  `convert` swaps every float module for its INT8 twin (weights int8, activations quint8).
Act 5  save both state_dicts to temporary files, compare their sizes, delete the files (always).
Beyond the spec: test accuracy and CPU latency (batch 1 and 256) of both models, measured in the same run.

Two flows for Acts 2-4 (--flow):
  eager  the spec's torch.ao.quantization eager mode (deprecated in torch 2.14, still works; the default).
  pt2e   its successor in torchao: torch.export the FP32 model, prepare_pt2e with the X86 inductor quantizer
         (static, per-channel int8 weights), calibrate on the same batches, convert_pt2e, then torch.compile
         it for the CPU (the int8 ops only become fast int8 kernels when inductor lowers them).

Eager-mode quantization needs a QuantStub at the input and a DeQuantStub before log_softmax: without
them the quantized convs would get float tensors and log_softmax a quantized one, and both crash.
The quantized kernels are CPU kernels, so the INT8 model (and, for a fair race, the FP32 one) is
evaluated and timed on the CPU; only training may use CUDA or Apple's MPS.

    python quest_14_1.py                                  # MNIST in ./data (downloaded if missing)
    python quest_14_1.py --data-dir assets/mnist-5k --save-dir out   # shipped digits; keep the INT8 model
    python quest_14_1.py --data-dir assets/mnist-5k --flow pt2e      # the torchao flow (pip install torchao)
"""
import argparse
import errno
import io
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.ao.quantization import DeQuantStub, QuantStub, convert, fuse_modules, get_default_qconfig, prepare
from tqdm import tqdm

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# The engines get_default_qconfig knows that this quest offers; each must also be compiled into torch.
ENGINES = ("fbgemm", "x86", "qnnpack")
FLOWS = ("eager", "pt2e")
TORCHAO_PIN = "torchao==0.18.0"  # the release requirements.txt pins: checked against torch 2.14.1
# Enough weights (81k, mostly in fc1) that int8 storage dominates the saved file: in a tiny net the
# per-channel scales and zero points, float biases and per-tensor file records eat the gain
# (8/16 channels: 2.5x, 32/64: 3.5x, 16/128: 3.6x). A narrow conv1 keeps CPU training cheap.
CONV1_CHANNELS, CONV2_CHANNELS = 16, 128
LATENCY_BATCH_SIZES = (1, 256)
ACCURACY_BATCH = 1000
# torch 2.14 deprecates torch.ao.quantization (successor: torchao) and TorchScript. Both still work,
# so these known warnings are hidden and main() says so in one line instead of burying the result.
KNOWN_WARNINGS = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",  # observer reduce_range notice
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",  # quantized dtypes notice
    r"`torch\.jit\.\w+` is deprecated",
)
# Known notices of the pt2e path that say nothing to a learner: torchao's import registers an Enum with
# torch's pytree (a log line), inductor's int8 conv lowering copies a tensor the slow way (a UserWarning),
# and inductor's C++ build says it found no CUDA runtime (a log line) on a CPU-only machine.
KNOWN_PT2E_WARNINGS = (r"To copy construct from a tensor",)
QUIET_LOGGERS = ("torch.utils._pytree", "torch.utils.cpp_extension")


def silence_known_warnings():
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def silence_known_pt2e_notices():
    for pattern in KNOWN_PT2E_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, module=r"torch\._inductor")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------- one voice (docs/contributing.md, verbatim)
def fail(message):
    """End the run the way every fault ends here: one line on stderr, exit 1, no traceback."""
    raise SystemExit(f"error: {message}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends like every other fault: one line on stderr, no usage dump."""

    def error(self, message):
        fail(f"{message}; run with --help to see the flags")


def positive_int(text):
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_float(text):
    """argparse type: a finite number > 0 (learning rates, temperatures, time budgets)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got '{text}'") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text}")
    return value


def pick_device(name):
    """--device auto: CUDA, then Apple's MPS, then the CPU; a device asked for by name must be there."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(kind for kind, present in available.items() if present)
    elif not available[name]:
        fail(f"--device {name} was requested but is not available here; use --device auto or --device cpu")
    return torch.device(name)


def check_output_dir(path, flag):
    """Before any work: `path` must be a folder we can write in, or one we can create. Probes with a real temp
    file (os.access says yes to root even on a read-only folder) and creates nothing."""
    path = Path(path)
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        where = "a file" if existing == path else f"under the file {existing}"
        fail(f"{flag} {path} is {where}, not a folder; pass a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        fail(f"{flag} {path} is not writable ({existing}: {err.strerror or err}); pass a folder you can write to")


def write_atomically(path, data):
    """bytes -> path through a temp file in the same folder and os.replace: a final name never holds half a
    file, and a failed write removes its temp file and ends in one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        fail(f"could not write {path} ({reason}); free some space or pass another output folder")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def torch_bytes(obj):
    """torch.save into memory: the disk is then written by write_atomically alone (a full disk is an OSError
    there, not a half-written zip or a C++ abort)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def non_negative_float(text):
    """argparse type: a finite number >= 0 (a timing budget where 0 still means "the minimum runs")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def parse_args(argv=None):
    p = OneLineParser(description="Train a small MNIST CNN, quantize it to INT8 (post-training static), "
                      "compare size, accuracy and CPU latency.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="./data", metavar="DIR", help="root that holds (or will receive) MNIST/raw")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                   help="where the FP32 model trains (auto: CUDA, then Apple MPS, then CPU); "
                   "the INT8 model always runs on CPU")
    p.add_argument("--flow", default="eager", choices=FLOWS,
                   help="eager: torch.ao.quantization eager mode, as the spec asks; pt2e: torchao's "
                   f"torch.export flow with the X86 inductor quantizer (needs {TORCHAO_PIN})")
    p.add_argument("--seed", type=int, default=0, help="seeds init, batch order and calibration batches")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="for training and calibration")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--train-batches", type=positive_int, default=100, metavar="N", help="FP32 training steps")
    p.add_argument("--calib-batches", type=positive_int, default=10, metavar="N",
                   help="training batches the observers see")
    p.add_argument("--engine", default="fbgemm", choices=ENGINES,
                   help="eager flow: quantized backend (must be in torch.backends.quantized.supported_engines)")
    p.add_argument("--no-compile", action="store_true",
                   help="pt2e flow: run the converted model as it is, without torch.compile (no compile wait, "
                   "but its quantize/dequantize ops then run in float math, slower than FP32)")
    p.add_argument("--latency-seconds", type=non_negative_float, default=0.5, metavar="S",
                   help="timing budget per model and batch size (at least 3 runs; the median is reported)")
    p.add_argument("--work-dir", metavar="DIR", help="existing folder for the temporary .pth files (a private "
                   "subfolder is made there and removed); None: the system temp folder")
    p.add_argument("--save-dir", metavar="DIR", help="also keep the INT8 model here (eager: TorchScript "
                   "mini_cnn_int8.pt; pt2e: torch.export program mini_cnn_int8_pt2e.pt2); None: keep nothing")
    return p.parse_args(argv)


def check_args(args):
    """Refuse bad input before any work, so a failure never leaves anything behind."""
    if args.flow == "eager" and args.engine not in torch.backends.quantized.supported_engines:
        usable = [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
        fail(f"--engine {args.engine} is not available (this torch build supports "
             f"{'|'.join(torch.backends.quantized.supported_engines)}); pass --engine {'|'.join(usable)}")
    if args.work_dir is not None:
        if not os.path.isdir(args.work_dir):
            fail(f"--work-dir {args.work_dir} is not an existing folder; create it or leave the flag out")
        check_output_dir(args.work_dir, "--work-dir")
    if args.save_dir is not None:
        check_output_dir(args.save_dir, "--save-dir")
    if args.flow == "pt2e":
        import_pt2e()  # a missing or broken torchao is told now, not after training


def import_pt2e():
    """torchao's PT2E pieces: (prepare_pt2e, convert_pt2e, a static per-channel X86InductorQuantizer)."""
    silence_known_pt2e_notices()
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as err:
        fail(f"--flow pt2e needs torchao, which is not importable here ({err}); "
             f"pip install {TORCHAO_PIN} (see requirements.txt) or use --flow eager")
    except Exception as err:  # installed but broken against this torch (e.g. a torchao built for another torch)
        fail(f"--flow pt2e: torchao failed to import ({type(err).__name__}: {first_line(err)}); "
             f"pip install {TORCHAO_PIN}, the release tested with torch 2.14.1, or use --flow eager")
    # Static (calibrated) activations, per-channel symmetric int8 weights: the quantizer's defaults.
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    return prepare_pt2e, convert_pt2e, quantizer


def first_line(err, limit=200):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- model
class MiniCNN(nn.Module):
    """conv1 -> conv2 -> fc1 (10 classes), with the stubs and ReLU modules eager-mode quantization needs."""

    def __init__(self):
        super().__init__()
        self.quant = QuantStub()  # float -> quint8 at the input (identity until convert)
        self.conv1 = nn.Conv2d(1, CONV1_CHANNELS, 3, padding=1)
        self.relu1 = nn.ReLU()  # modules, not F.relu, so fuse_modules can fold them into the convs
        self.conv2 = nn.Conv2d(CONV1_CHANNELS, CONV2_CHANNELS, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(CONV2_CHANNELS * 7 * 7, 10)
        self.dequant = DeQuantStub()  # quint8 -> float: log_softmax has no quantized kernel

    def forward(self, x):
        x = self.quant(x)
        x = F.max_pool2d(self.relu1(self.conv1(x)), 2)  # 28 -> 14
        x = F.max_pool2d(self.relu2(self.conv2(x)), 2)  # 14 -> 7
        x = self.fc1(torch.flatten(x, 1))
        return F.log_softmax(self.dequant(x), dim=1)

    def fuse(self):
        """Fold each ReLU into its conv: one quantized op instead of two, and one fewer requantization."""
        return fuse_modules(self, [["conv1", "relu1"], ["conv2", "relu2"]], inplace=True)


# ---------------------------------------------------------------- data
def read_idx(path, ndim):
    """One MNIST idx file as a uint8 tensor: a big-endian header (magic 0x0801 labels / 0x0803 images, then
    one 4-byte size per dimension) and exactly that many bytes. Anything else is called corrupt, by name."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        fail(f"could not read {path} ({err.strerror or err}); check the file or pass another --data-dir")
    header = 4 * (ndim + 1)
    fix = "replace it with the original MNIST file or pass another --data-dir"
    if len(data) < header or int.from_bytes(data[:4], "big") != 0x800 + ndim:
        fail(f"{path} is corrupt (no MNIST idx header with {ndim} dimension(s)); {fix}")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + math.prod(dims):
        fail(f"{path} is corrupt (its header promises {header + math.prod(dims)} bytes, it holds {len(data)}: "
             f"truncated or padded); {fix}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(*dims)


def load_mnist(data_dir, train, device):
    """The whole split as one tensor, equal to ToTensor() + Normalize((0.1307,), (0.3081,)) per image."""
    raw = Path(data_dir) / "MNIST" / "raw"
    split = "train" if train else "t10k"
    image_file, label_file = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
    if not (image_file.is_file() and label_file.is_file()):
        try:  # torchvision fetches the four raw files into data_dir/MNIST/raw
            torchvision.datasets.MNIST(root=data_dir, train=train, download=True)
        except Exception as err:  # URLError is an OSError; a bad download surfaces as other errors
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "") if lines else type(err).__name__
            fail(f"MNIST is not in {raw} and could not be downloaded ({reason}); "
                 "pass --data-dir pointing at a folder that holds MNIST/raw (e.g. --data-dir assets/mnist-5k)")
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
    if images.shape[1:] != (28, 28):
        fail(f"{image_file} is corrupt (images of {images.shape[1]}x{images.shape[2]} pixels, not 28x28); "
             "replace it with the original MNIST file or pass another --data-dir")
    if len(labels) != len(images) or (len(labels) and labels.max() > 9):
        what = f"{len(labels)} labels for {len(images)} images" if len(labels) != len(images) else "a label above 9"
        fail(f"{label_file} is corrupt ({what}); replace it with the original MNIST file or pass another --data-dir")
    if len(images) == 0:
        fail(f"the MNIST {'train' if train else 'test'} split in {raw} has no images; "
             "pass --data-dir pointing at a complete MNIST/raw")
    x = ((images.float().div(255) - MNIST_MEAN) / MNIST_STD).unsqueeze(1)  # N,1,28,28
    return x.to(device), labels.long().to(device)


def shuffled_batches(n, batch_size, generator, device):
    """Endless index batches on the device, reshuffled every pass, like a shuffled DataLoader epoch after epoch.

    The order is drawn on the CPU (one seeded generator for every device) and moved once per pass, not per step."""
    while True:
        yield from torch.randperm(n, generator=generator).to(device).split(batch_size)


# ---------------------------------------------------------------- Act 1: train FP32
def train(model, x, y, batches, lr, device):
    """Adam on the given index batches; returns the smoothed final loss. A non-finite loss ends the run."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # CrossEntropyLoss as the spec says: on log-probs it equals NLLLoss (log_softmax of log-probs is a no-op).
    loss_fn = nn.CrossEntropyLoss()
    # bf16 autocast where the GPU has bf16; fp16 would need a GradScaler, and MPS/CPU train in plain FP32.
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    model.train()
    running = None
    bar = tqdm(batches, desc="act 1: train FP32", unit="batch", leave=False, disable=None)  # no bar off a terminal
    for step, idx in enumerate(bar, 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x[idx]), y[idx])
        value = loss.item()
        if not math.isfinite(value):
            bar.close()
            fail(f"FP32 training diverged at batch {step} (loss {value}); nothing was saved; "
                 f"lower --lr (now {lr:g}, default 1e-3)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = value if running is None else 0.9 * running + 0.1 * value
        bar.set_postfix(loss=f"{running:.4f}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):  # the last step can overflow the weights
        fail(f"FP32 training diverged in its last step (non-finite weights); nothing was saved; "
             f"lower --lr (now {lr:g}, default 1e-3)")
    return running


# ---------------------------------------------------------------- Acts 2-4: quantize
def quantize(trained, x, batches, engine):
    """Eager flow: post-training static quantization of a copy of `trained` (CPU); calibrates on x[idx]."""
    torch.backends.quantized.engine = engine  # the kernels must match the qconfig's engine
    model = MiniCNN()
    model.load_state_dict({k: v.cpu() for k, v in trained.state_dict().items()})
    model.eval().fuse()
    model.qconfig = get_default_qconfig(engine)
    prepare(model, inplace=True)  # Act 2: observers record activation ranges
    with torch.inference_mode():
        for idx in tqdm(batches, desc="act 3: calibrate", unit="batch", leave=False, disable=None):
            model(x[idx].cpu())
    convert(model, inplace=True)  # Act 4: float modules -> quantized modules
    return model


def export_fp32(model, example):
    """torch.export with a dynamic batch dimension (the example must hold >= 2 images: export specializes 1)."""
    return torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=65536)}})


def quantize_pt2e(trained, x, batches):
    """pt2e flow: torch.export the FP32 model, prepare_pt2e with the X86 inductor quantizer, calibrate, convert.

    Returns the converted GraphModule: quantize/dequantize ops around float aten ops (a reference model that
    inductor later fuses into int8 kernels), with the int8 weights folded in as constants."""
    prepare_pt2e, convert_pt2e, quantizer = import_pt2e()
    model = MiniCNN()
    model.load_state_dict({k: v.cpu() for k, v in trained.state_dict().items()})
    model.eval()  # no fuse(): the quantizer matches conv+relu patterns in the exported graph itself
    exported = export_fp32(model, x[:2].cpu()).module()
    prepared = prepare_pt2e(exported, quantizer)  # Act 2: observers at every quantized edge
    with torch.no_grad():
        for idx in tqdm(batches, desc="act 3: calibrate", unit="batch", leave=False, disable=None):
            prepared(x[idx].cpu())
    converted = convert_pt2e(prepared)  # Act 4: observers -> quantize/dequantize with the measured ranges
    return drop_unused_attributes(converted)


def drop_unused_attributes(graph_module):
    """convert_pt2e folds each weight's quantize op into a new int8 constant but leaves the float weight it was
    made from on the module, read by nothing: drop those, or the INT8 state_dict would also hold all FP32 weights."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name in list(graph_module.state_dict()):
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner_path) if owner_path else graph_module, attr)
    return graph_module


def compile_for_cpu(model, batch_sizes, example):
    """torch.compile the converted pt2e model (inductor fuses each dequantize -> op -> quantize into one oneDNN
    int8 kernel) and compile it now, once per batch size it will see. Returns (compiled model, seconds)."""
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True  # weights as constants: inductor can prepack the int8 weights for oneDNN
    # dynamic=False: one static graph per batch size. With dynamic shapes torch 2.14's inductor mis-strides
    # the int8 conv output (an assert at run time), so each size is compiled on its own.
    compiled = torch.compile(model, dynamic=False)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for n in sorted(set(batch_sizes)):
                compiled(example[torch.arange(n) % len(example)])
    except Exception as err:  # no C++ compiler, an unsupported CPU, an inductor bug: say which, offer a way out
        fail(f"torch.compile could not build the INT8 model for this CPU ({type(err).__name__}: {first_line(err)}); "
             "pass --no-compile to run it uncompiled (slower), or use --flow eager")
    return compiled, time.perf_counter() - start


# ---------------------------------------------------------------- Act 5: sizes
def state_dict_sizes_kb(models, work_dir=None):
    """Save each {file name: model}'s state_dict in a fresh temp folder, return {file name: KB}.

    The folder (and every file in it) is removed in a finally, so nothing is left behind even when saving fails.
    """
    tmp = tempfile.mkdtemp(prefix="quest_14_1-", dir=work_dir)
    try:
        sizes = {}
        for name, model in models.items():
            path = os.path.join(tmp, name)
            write_atomically(path, torch_bytes(model.state_dict()))
            sizes[name] = os.path.getsize(path) / 1024
        return sizes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- beyond the spec: accuracy, latency
def accuracy_batch_sizes(n):
    return {min(ACCURACY_BATCH, n - i) for i in range(0, n, ACCURACY_BATCH)}


@torch.inference_mode()
def accuracy(model, x, y, batch_size=ACCURACY_BATCH):
    """Fraction of x classified as y; the model must be in eval mode already (an exported one refuses .eval())."""
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


@torch.inference_mode()
def latency_ms(model, x, budget_s, min_runs=3, warmup=1):
    """Median wall time of one forward pass on x (CPU) in ms, over as many runs as fit in budget_s."""
    for _ in range(warmup):
        model(x)
    times = []
    while len(times) < min_runs or sum(times) < budget_s:
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def make_dir(path, flag):
    """Create an output folder right before its first file (check_output_dir made sure we can)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"could not create {flag} {path} ({err.strerror or err}); pass a folder you can write to")
    return Path(path)


def save_torchscript(model, save_dir):
    """Eager flow: keep the INT8 model as TorchScript (reload with torch.jit.load; no MiniCNN class needed).
    Serialized in memory first: a full disk is then one clean line from write_atomically, not a C++ abort."""
    path = make_dir(save_dir, "--save-dir") / "mini_cnn_int8.pt"
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    write_atomically(path, buffer.getvalue())
    return str(path)


def save_exported(model, save_dir, example):
    """pt2e flow: keep the converted model as a torch.export program, any batch size >= 1. Reload: import
    torchao.quantization.pt2e.quantize_pt2e (it registers the quantize/dequantize ops), torch.export.load(path)
    .module(), then torch.compile it for speed."""
    path = make_dir(save_dir, "--save-dir") / "mini_cnn_int8_pt2e.pt2"
    buffer = io.BytesIO()
    torch.export.save(export_fp32(model, example), buffer)
    write_atomically(path, buffer.getvalue())
    return str(path)


def print_table(result):
    rows = [("state_dict size (KB)", "size_fp32_kb", "size_int8_kb", ".1f", lambda a, b: f"{a / b:.2f}x smaller"),
            ("test accuracy", "acc_fp32", "acc_int8", ".4f", lambda a, b: f"{100 * (b - a):+.2f} points")]
    rows += [(f"latency batch {n} (ms)", f"latency_ms_fp32_b{n}", f"latency_ms_int8_b{n}", ".3f",
              lambda a, b: f"{a / b:.2f}x faster" if b else "") for n in LATENCY_BATCH_SIZES]
    print(f"{'':24}{'FP32':>10}{'INT8':>10}  INT8 ({result['flow']}) vs FP32")
    for label, fp32, int8, fmt, compare in rows:
        print(f"{label:24}{result[fp32]:>10{fmt}}{result[int8]:>10{fmt}}  {compare(result[fp32], result[int8])}")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)

    train_x, train_y = load_mnist(args.data_dir, train=True, device=device)
    test_x, test_y = load_mnist(args.data_dir, train=False, device="cpu")
    batches = shuffled_batches(len(train_x), args.batch_size, torch.Generator().manual_seed(args.seed), device)
    engine = args.engine if args.flow == "eager" else "x86_inductor"
    print(f"data: {len(train_x)} train / {len(test_x)} test digits from {args.data_dir}; FP32 trains on {device}, "
          f"the INT8 model runs on CPU ({args.flow} flow, {engine}: quantized kernels are CPU kernels)")

    print(f"act 1: training the FP32 model for {args.train_batches} batches of {args.batch_size}", flush=True)
    fp32 = MiniCNN().to(device)
    train_loss = train(fp32, train_x, train_y, itertools.islice(batches, args.train_batches), args.lr, device)
    fp32 = fp32.cpu().eval()
    calib = itertools.islice(batches, args.calib_batches)
    compiled, compile_s = None, None
    if args.flow == "eager":
        silence_known_warnings()
        print("note: known deprecation warnings of torch.ao.quantization and TorchScript are filtered "
              "(the eager-mode API still works in torch 2.14; torchao is its successor: --flow pt2e)")
        int8 = quantize(fp32, train_x, calib, args.engine)
    else:
        int8 = quantize_pt2e(fp32, train_x, calib)
        print("acts 2-4: exported, prepared (X86 inductor quantizer, per-channel int8 weights), calibrated on "
              f"{args.calib_batches} batches, converted")

    sizes = state_dict_sizes_kb({"temp_fp32_model.pth": fp32, "temp_int8_model.pth": int8}, args.work_dir)
    size_fp32, size_int8 = sizes["temp_fp32_model.pth"], sizes["temp_int8_model.pth"]
    print(f"act 5: FP32 state_dict {size_fp32:.1f} KB, INT8 state_dict {size_int8:.1f} KB, "
          f"{size_fp32 / size_int8:.2f}x smaller (temp files deleted)")

    runner = int8
    if args.flow == "pt2e" and not args.no_compile:
        print("torch.compile: lowering the INT8 model to oneDNN int8 kernels (once per batch size; "
              "can take a minute on a small CPU)", flush=True)
        runner, compile_s = compile_for_cpu(int8, [*accuracy_batch_sizes(len(test_x)), *LATENCY_BATCH_SIZES], test_x)
        print(f"torch.compile: done in {compile_s:.1f} s (reported apart from the latencies)")
    result = {"size_fp32_kb": round(size_fp32, 2), "size_int8_kb": round(size_int8, 2),
              "compression_ratio": round(size_fp32 / size_int8, 3),
              "acc_fp32": accuracy(fp32, test_x, test_y), "acc_int8": accuracy(runner, test_x, test_y)}
    for batch in LATENCY_BATCH_SIZES:
        x = test_x[torch.arange(batch) % len(test_x)]  # repeat digits if the test split is smaller
        result[f"latency_ms_fp32_b{batch}"] = round(latency_ms(fp32, x, args.latency_seconds), 3)
        result[f"latency_ms_int8_b{batch}"] = round(latency_ms(runner, x, args.latency_seconds), 3)
    if args.flow == "eager":
        how = f"INT8 ({args.engine}, eager flow) runs on CPU: quantized kernels are CPU-only"
    elif args.no_compile:
        how = "INT8 (pt2e flow, X86 inductor quantizer) runs on CPU uncompiled: reference quantize/dequantize ops"
    else:
        how = (f"INT8 (pt2e flow, X86 inductor quantizer) runs on CPU, torch.compile'd to oneDNN int8 kernels "
               f"(compile {compile_s:.1f} s, not in the latencies)")
    result["notes"] = (f"{how}; FP32 trained on {device} for {args.train_batches} batches, calibrated on "
                       f"{args.calib_batches}; accuracy on {len(test_x)} test digits; latencies are CPU medians with "
                       f"{torch.get_num_threads()} threads and vary run to run")
    saved = None
    if args.save_dir:
        saved = (save_torchscript(int8, args.save_dir) if args.flow == "eager"
                 else save_exported(int8, args.save_dir, test_x[:2]))
    result.update(train_loss=round(train_loss, 4), engine=engine, train_device=str(device), test_images=len(test_x),
                  saved_model=saved, flow=args.flow, compiled=None if args.flow == "eager" else not args.no_compile,
                  compile_seconds=None if compile_s is None else round(compile_s, 2))

    print_table(result)
    if saved and args.flow == "eager":
        print(f"wrote the INT8 model as TorchScript to {saved} (load with torch.jit.load, run on CPU)")
    elif saved:
        print(f"wrote the INT8 model as a torch.export program to {saved} "
              "(import torchao.quantization.pt2e.quantize_pt2e, then torch.export.load(path).module(); "
              "torch.compile it, run on CPU)")
    print(json.dumps(result, allow_nan=False))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing was saved (temporary files removed, files already in "
              "--save-dir untouched); run the command again to start over", file=sys.stderr)
        sys.exit(130)
