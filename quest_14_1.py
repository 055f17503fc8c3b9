"""Quest 14.1: static INT8 quantization -- the golem gets lighter, not dumber.

Act 1  train a small FP32 CNN on MNIST for 100 batches (Adam).
Act 2  copy it into a fresh model, fuse conv+ReLU, attach the engine's qconfig, `prepare` inserts observers.
Act 3  calibrate: run 10 training batches through it so the observers see real activation ranges.
Act 4  `convert` swaps every float module for its INT8 twin (weights int8, activations quint8).
Act 5  save both state_dicts to temporary files, compare their sizes, delete the files (always).
Beyond the spec: test accuracy, CPU latency (batch 1 and 256) and each layer's SQNR, INT8 vs FP32.

Acts 2-4 come in three flows (--flow):
  eager  the spec's torch.ao.quantization eager mode (deprecated in torch 2.14, still works; the default).
  qat    quantization-aware training: prepare_qat fake-quantizes the trained FP32 model, a few more training
         batches let its weights adapt to the int8 rounding (observers frozen for the second half), then convert.
  pt2e   torchao's successor flow: torch.export, prepare_pt2e with the CPU's inductor quantizer, calibrate,
         convert_pt2e, then torch.compile (the int8 ops only become fast int8 kernels when inductor lowers them).
  pt2e-qat  the same with prepare_qat_pt2e and the qat flow's fine-tuning in between.
--engine auto picks the quantized backend the CPU has: fbgemm on x86 (the spec's), qnnpack on ARM.

Eager-mode quantization needs a QuantStub at the input and a DeQuantStub before log_softmax: without
them the quantized convs would get float tensors and log_softmax a quantized one, and both crash.
The quantized kernels are CPU kernels, so the INT8 model (and, for a fair race, the FP32 one) is
evaluated and timed on the CPU; only training may use CUDA or Apple's MPS.

    python quest_14_1.py                                  # MNIST in ./data (downloaded if missing)
    python quest_14_1.py --data-dir assets/mnist-5k --save-dir out   # shipped digits; keep the INT8 model
    python quest_14_1.py --data-dir assets/mnist-5k --flow qat       # quantization-aware training
    python quest_14_1.py --data-dir assets/mnist-5k --flow pt2e      # the torchao flow (pip install torchao)

Numbers in docs/quest_14_1.md: the shipped digits, a 2-core x86 CPU with AVX512-BF16, torch 2.14.1, torchao 0.18.0.
"""
import argparse
import errno
import io
import itertools
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


def raise_interrupt(signum, frame):
    """SIGTERM (`timeout`, a scheduler, a closing terminal) stops a run the way Ctrl-C does: see exit_interrupted."""
    raise KeyboardInterrupt(signum)


signal.signal(signal.SIGTERM, raise_interrupt)
try:  # Ctrl-C or SIGTERM while the libraries load ends in one line too
    if hasattr(signal, "pthread_sigmask"):  # held until the imports end: one landing inside numpy's C import breaks it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision
    from torch.ao.quantization import (DeQuantStub, QuantStub, convert, default_qconfig, disable_observer,
                                       fuse_modules, fuse_modules_qat, get_default_qat_qconfig, get_default_qconfig,
                                       prepare, prepare_qat)
    from tqdm import tqdm
    if hasattr(signal, "pthread_sigmask"):  # a signal held meanwhile is raised here, inside this guard
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
except KeyboardInterrupt as stop:
    print("error: interrupted while starting; nothing was done", file=sys.stderr)
    sys.exit(128 + (stop.args[0] if stop.args else signal.SIGINT))

# ---------------------------------------------------------------- settings
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FLOWS = ("eager", "qat", "pt2e", "pt2e-qat")
# The eager engines get_default_qconfig knows; each must also be compiled into torch for this CPU.
ENGINES = ("fbgemm", "x86", "qnnpack")
X86_MACHINES, ARM_MACHINES = ("x86_64", "amd64", "i386", "i686"), ("arm64", "aarch64")
# Weights: per-tensor MinMax (torch.ao's default_qconfig, the tutorial's first try) or the engine's default,
# per-channel weights with histogram-calibrated activations (the tutorial's second).
# https://pytorch.org/tutorials/advanced/static_quantization_tutorial.html
OBSERVERS = ("minmax", "histogram")
TORCHAO_PIN = "torchao==0.18.0"  # the release requirements.txt pins: checked against torch 2.14.1
# Enough weights (81k, mostly in fc1) that int8 storage dominates the saved file: in a tiny net the
# per-channel scales and zero points, float biases and per-tensor file records eat the gain
# (8/16 channels: 2.5x, 32/64: 3.5x, 16/128: 3.6x). A narrow conv1 keeps CPU training cheap.
CONV1_CHANNELS, CONV2_CHANNELS = 16, 128
# Each quantized layer and the FP32 module whose output is that layer's output (the INT8 convs hold their ReLU).
LAYER_OUTPUTS = {"conv1": "relu1", "conv2": "relu2", "fc1": "fc1"}
LATENCY_BATCH_SIZES = (1, 256)
ACCURACY_BATCH = 1000
# Upper bounds of the counts, generous for real use and still within a laptop's memory and an evening: a training
# step holds about 0.4 MB per image (FP32, CPU), so 8,192 images take ~3 GB; the training and QAT batches are drawn
# one at a time (a million steps: hours, flat memory); the calibration batches are kept for the per-layer SQNR.
MAX_BATCH_SIZE, MAX_STEPS, MAX_CALIB_BATCHES, MAX_LATENCY_SECONDS = 8192, 1_000_000, 1000, 600
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


def parse_args(argv=None):
    p = OneLineParser(description="Train a small MNIST CNN, quantize it to INT8 (static: post-training or "
                      "quantization-aware), compare size, accuracy, CPU latency and each layer's error.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=utf8_path, default="./data", metavar="DIR",
                   help="root that holds (or will receive) MNIST/raw")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                   help="where the FP32 model trains (auto: CUDA, then Apple MPS, then CPU); "
                   "the INT8 model always runs on CPU")
    p.add_argument("--flow", default="eager", choices=FLOWS,
                   help="eager: torch.ao.quantization post-training, as the spec asks; qat: eager "
                   "quantization-aware fine-tuning; pt2e: torchao's torch.export flow with the CPU's inductor "
                   f"quantizer (needs {TORCHAO_PIN}); pt2e-qat: that flow with qat's fine-tuning")
    p.add_argument("--engine", default="auto", choices=("auto", *ENGINES),
                   help="eager and qat: quantized backend; auto: fbgemm on x86 CPUs, qnnpack on ARM "
                   "(pt2e and pt2e-qat pick their quantizer by CPU the same way)")
    p.add_argument("--observer", choices=OBSERVERS,
                   help="eager: minmax = per-tensor MinMax weights and activations (torch.ao default_qconfig); "
                   "histogram = the engine's default, histogram activations, per-channel weights (qnnpack: "
                   "per-tensor) (None: histogram)")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0,
                   help="0 to 2^32-1; seeds init, batch order and calibration batches")
    p.add_argument("--batch-size", type=number(int, 1, MAX_BATCH_SIZE), default=64, metavar="N",
                   help=f"for training, calibration and QAT; at most {MAX_BATCH_SIZE:,} (about 3 GB of activations)")
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=1e-3, help="Adam learning rate (FP32)")
    p.add_argument("--train-batches", type=number(int, 1, MAX_STEPS), default=100, metavar="N",
                   help="FP32 training steps")
    p.add_argument("--calib-batches", type=number(int, 1, MAX_CALIB_BATCHES), default=10, metavar="N",
                   help="training batches the observers see (eager, pt2e); every flow's per-layer SQNR is "
                   "measured on them (they are kept in memory for it)")
    p.add_argument("--qat-batches", type=number(int, 2, MAX_STEPS), default=40, metavar="N",
                   help="qat, pt2e-qat: fine-tuning steps with fake quantization; observers frozen for the second half")
    p.add_argument("--qat-lr", type=number(float, 0, low_open=True), default=1e-4,
                   help="qat, pt2e-qat: Adam learning rate of the fine-tuning (a tenth of --lr: the weights adapt)")
    p.add_argument("--no-compile", action="store_true",
                   help="pt2e flows: run the converted model as it is, without torch.compile (no compile wait, "
                   "but its quantize/dequantize ops then run in float math, slower than FP32)")
    p.add_argument("--latency-seconds", type=number(float, 0, MAX_LATENCY_SECONDS), default=0.5, metavar="S",
                   help="timing budget per model and batch size (at least 3 runs; the median is reported)")
    p.add_argument("--work-dir", type=utf8_path, metavar="DIR",
                   help="existing folder for the temporary .pth files (a private "
                   "subfolder is made there and removed); None: the system temp folder")
    p.add_argument("--save-dir", type=utf8_path, metavar="DIR",
                   help="also keep the INT8 model here (eager, qat: TorchScript "
                   "mini_cnn_int8.pt; pt2e flows: torch.export program mini_cnn_int8_pt2e.pt2); None: keep nothing")
    return p.parse_args(argv)


def cpu_family():
    """'x86', 'arm' or the machine name: which quantized kernels this CPU can run."""
    machine = platform.machine().lower()
    return "x86" if machine in X86_MACHINES else "arm" if machine in ARM_MACHINES else machine


def pick_engine(requested, flow):
    """The quantized backend (eager, qat) or inductor quantizer (pt2e), and why: (name, reason)."""
    family = cpu_family()
    if flow.startswith("pt2e"):
        if family not in ("x86", "arm"):
            fail(f"--flow {flow} has an inductor quantizer for x86 and ARM CPUs, not for {platform.machine()}; "
                 "use --flow eager")
        return f"{family}_inductor", f"torchao's {family.upper() if family == 'x86' else 'Arm'}InductorQuantizer " \
                                     f"for this {platform.machine()} CPU"
    supported = torch.backends.quantized.supported_engines
    if requested == "auto":
        wanted = {"x86": "fbgemm", "arm": "qnnpack"}.get(family)
        if wanted in supported:
            why = "the spec's engine, for x86 CPUs" if wanted == "fbgemm" else "the engine for ARM CPUs"
            return wanted, f"auto: this CPU is {platform.machine()}, {why}"
        usable = [e for e in ENGINES if e in supported]
        if not usable:
            fail(f"this torch build has no quantized engine for {platform.machine()} (it supports "
                 f"{'|'.join(supported)}); use --flow pt2e")
        return usable[0], f"auto: the first engine this torch build has for {platform.machine()}"
    if requested not in supported:
        usable = [e for e in ENGINES if e in supported]
        fail(f"--engine {requested} is not available on this {platform.machine()} CPU (this torch build supports "
             f"{'|'.join(supported)}); pass --engine auto or {'|'.join(usable)}")
    return requested, "asked for with --engine"


def check_args(args):
    """Refuse bad input before any work, so a failure never leaves anything behind. Returns (engine, why)."""
    if args.flow.startswith("pt2e") and args.engine != "auto":
        fail(f"--engine {args.engine} is for --flow eager or qat; --flow {args.flow} picks its quantizer by CPU "
             "(leave --engine out)")
    if args.observer and args.flow != "eager":
        fail(f"--observer is for --flow eager; {args.flow} uses its own observers (leave --observer out)")
    args.observer = args.observer or "histogram"
    if args.work_dir is not None:
        check_output_dir(args.work_dir, "--work-dir")
        if not os.path.isdir(args.work_dir):
            fail(f"--work-dir {args.work_dir} is not an existing folder; create it or leave the flag out")
    if args.save_dir is not None:
        check_output_dir(args.save_dir, "--save-dir")
    if args.flow.startswith("pt2e"):
        import_pt2e()  # a missing or broken torchao is told now, not after training
    return pick_engine(args.engine, args.flow)


def silence_known_warnings():
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def silence_known_pt2e_notices():
    for pattern in KNOWN_PT2E_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, module=r"torch\._inductor")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def import_pt2e():
    """torchao's PT2E pieces as a namespace: prepare_pt2e, prepare_qat_pt2e, convert_pt2e, disable_observer,
    allow_exported_model_train_eval, and quantizers: {"x86_inductor": make(is_qat), "arm_inductor": make(is_qat)}.

    Static (calibrated) activations in both; x86: per-channel int8 weights; Arm: per-tensor symmetric int8
    weights (the defaults torchao 0.18 gives each). torchao's XNNPACKQuantizer is only a test helper there
    (torchao.testing; the real one lives in ExecuTorch) and targets ExecuTorch's XNNPACK delegate, not inductor."""
    silence_known_pt2e_notices()
    try:
        from torchao.quantization.pt2e import allow_exported_model_train_eval, disable_observer
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer import arm_inductor_quantizer as aiq
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as err:
        fail(f"--flow {'|'.join(FLOWS[2:])} needs torchao, which is not importable here ({err}); "
             f"pip install {TORCHAO_PIN} (see requirements.txt) or use --flow eager")
    except Exception as err:  # installed but broken against this torch (e.g. a torchao built for another torch)
        fail(f"--flow {'|'.join(FLOWS[2:])}: torchao failed to import ({type(err).__name__}: {first_line(err)}); "
             f"pip install {TORCHAO_PIN}, the release tested with torch 2.14.1, or use --flow eager")
    quantizers = {"x86_inductor": lambda is_qat: xiq.X86InductorQuantizer().set_global(
                      xiq.get_default_x86_inductor_quantization_config(is_qat=is_qat)),
                  "arm_inductor": lambda is_qat: aiq.ArmInductorQuantizer().set_global(
                      aiq.get_default_arm_inductor_quantization_config(is_qat=is_qat))}
    return argparse.Namespace(prepare_pt2e=prepare_pt2e, prepare_qat_pt2e=prepare_qat_pt2e, convert_pt2e=convert_pt2e,
                              disable_observer=disable_observer, quantizers=quantizers,
                              allow_exported_model_train_eval=allow_exported_model_train_eval)


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

    def fuse(self, qat=False):
        """Fold each ReLU into its conv: one quantized op instead of two, and one fewer requantization."""
        fuse = fuse_modules_qat if qat else fuse_modules
        return fuse(self, [["conv1", "relu1"], ["conv2", "relu2"]], inplace=True)


def cpu_copy(model):
    """A fresh MiniCNN on the CPU holding `model`'s weights (quantization works on a copy; FP32 stays as it is)."""
    copy = MiniCNN()
    copy.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    return copy


# ---------------------------------------------------------------- data
def normalize(images):
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), equal to ToTensor() + Normalize((0.1307,), (0.3081,))."""
    return ((images.float().div(255) - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def shuffled_batches(n, batch_size, generator, device):
    """Endless index batches on the device, reshuffled every pass, like a shuffled DataLoader epoch after epoch.

    The order is drawn on the CPU (one seeded generator for every device) and moved once per pass, not per step."""
    while True:
        yield from torch.randperm(n, generator=generator).to(device).split(batch_size)


# ---------------------------------------------------------------- Act 1: train FP32
def train(model, x, y, batches, lr, device, name, flag, steps=None):
    """Adam on the given index batches (`steps` of them: the bar's percentage and ETA when `batches` is an iterator);
    returns the smoothed final loss. A non-finite loss or weights (the last step can overflow them) end the run in
    one line naming `flag`, the learning rate to lower, before any save."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # CrossEntropyLoss as the spec says: on log-probs it equals NLLLoss (log_softmax of log-probs is a no-op).
    loss_fn = nn.CrossEntropyLoss()
    # bf16 autocast where the GPU has bf16; fp16 would need a GradScaler, and MPS/CPU train in plain FP32.
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    model.train()
    running = None
    bar = tqdm(batches, total=steps, desc=name, unit="batch", leave=False, disable=None)  # no bar off a terminal
    for idx in bar:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if not (math.isfinite(running) and all_finite(model.parameters())):
            bar.close()
            fail(f"{name} diverged (loss {running:g}, or weights no longer finite); nothing was saved; "
                 f"lower {flag} (now {lr:g})")
    return running


# ---------------------------------------------------------------- Acts 2-4: quantize, one function per flow
def quantize_eager(trained, x, batches, engine, observer):
    """Eager flow: post-training static quantization of a CPU copy of `trained`; calibrates on x[idx]."""
    torch.backends.quantized.engine = engine  # the kernels must match the qconfig's engine
    model = cpu_copy(trained).eval().fuse()
    model.qconfig = default_qconfig if observer == "minmax" else get_default_qconfig(engine)
    prepare(model, inplace=True)  # Act 2: observers record activation (and weight) ranges
    with torch.inference_mode():
        for idx in tqdm(batches, desc="act 3: calibrate", unit="batch", leave=False, disable=None):
            model(x[idx])
    return convert(model, inplace=True)  # Act 4: float modules -> quantized modules


def quantize_qat(trained, x, y, batches, steps, engine, lr):
    """QAT flow: fake-quantize a CPU copy of `trained` (prepare_qat, the engine's QAT qconfig), fine-tune it on
    `steps` of `batches` so the weights adapt to int8 rounding, observers frozen for the second half (the ranges settle,
    as in PyTorch's static quantization tutorial; MiniCNN has no BatchNorm to freeze), then convert.
    Returns (the INT8 model, the fine-tuned weights in a plain FP32 MiniCNN: the reference of its layer SQNR)."""
    torch.backends.quantized.engine = engine
    model = cpu_copy(trained).train().fuse(qat=True)
    model.qconfig = get_default_qat_qconfig(engine)
    prepare_qat(model, inplace=True)  # Act 2: fake-quant modules: forward rounds like int8, backward passes through
    fine_tuned = fine_tune(model, x, y, batches, steps, lr, disable_observer)  # Act 3
    return convert(model.eval(), inplace=True), fine_tuned  # Act 4


def fine_tune(model, x, y, batches, steps, lr, disable_observer):
    """QAT's Act 3 on the CPU: train the fake-quantized model for `steps` of `batches`, observers on for the first
    half and frozen (scales and zero points fixed) for the second. The batches are drawn as they are trained on,
    never listed up front (a million steps would be a million tensors). Returns its weights in a plain FP32 MiniCNN."""
    batches = iter(batches)
    train(model, x, y, itertools.islice(batches, steps // 2), lr, torch.device("cpu"),
          "QAT fine-tuning (observers on)", "--qat-lr", steps=steps // 2)
    model.apply(disable_observer)
    train(model, x, y, itertools.islice(batches, steps - steps // 2), lr, torch.device("cpu"),
          "QAT fine-tuning (observers frozen)", "--qat-lr", steps=steps - steps // 2)
    fine_tuned = MiniCNN().eval()  # same parameter names in the eager QAT model and in the exported graph
    wanted = fine_tuned.state_dict().keys()
    fine_tuned.load_state_dict({k: v for k, v in model.state_dict().items() if k in wanted})
    return fine_tuned


def export_fp32(model, example):
    """torch.export with a dynamic batch dimension (the example must hold >= 2 images: export specializes 1)."""
    return torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=65536)}})


def quantize_pt2e(trained, x, batches, quantizer_name):
    """pt2e flow: torch.export the FP32 model, prepare_pt2e with the CPU's inductor quantizer, calibrate, convert.

    Returns the converted GraphModule: quantize/dequantize ops around float aten ops (a reference model that
    inductor later fuses into int8 kernels), with the int8 weights folded in as constants."""
    pt2e = import_pt2e()
    model = cpu_copy(trained).eval()  # no fuse(): the quantizer matches conv+relu patterns in the exported graph
    exported = export_fp32(model, x[:2]).module()
    prepared = pt2e.prepare_pt2e(exported, pt2e.quantizers[quantizer_name](False))  # Act 2: observers on each edge
    with torch.no_grad():
        for idx in tqdm(batches, desc="act 3: calibrate", unit="batch", leave=False, disable=None):
            prepared(x[idx])
    converted = pt2e.convert_pt2e(prepared)  # Act 4: observers -> quantize/dequantize with the measured ranges
    return drop_unused_attributes(converted)


def quantize_pt2e_qat(trained, x, y, batches, steps, quantizer_name, lr):
    """pt2e-qat flow: torch.export, prepare_qat_pt2e (fake quantization in the graph), the qat flow's fine-tuning,
    convert_pt2e. Returns (the converted GraphModule, the fine-tuned weights in a plain FP32 MiniCNN)."""
    pt2e = import_pt2e()
    exported = export_fp32(cpu_copy(trained), x[:2]).module()  # MiniCNN has no dropout/BN: one graph for both modes
    prepared = pt2e.prepare_qat_pt2e(exported, pt2e.quantizers[quantizer_name](True))  # Act 2
    pt2e.allow_exported_model_train_eval(prepared)  # .train()/.eval() on the exported graph, which refuses them
    fine_tuned = fine_tune(prepared, x, y, batches, steps, lr, pt2e.disable_observer)  # Act 3
    prepared.eval()  # (the patched .eval() returns None)
    converted = pt2e.convert_pt2e(prepared)  # Act 4
    return drop_unused_attributes(converted), fine_tuned


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
    These files are measured and deleted, never kept, so they are written directly (no atomic rename); a full
    disk names the flag that moves them: --work-dir.
    """
    where = f"--work-dir {work_dir}" if work_dir is not None else f"the system temp folder {tempfile.gettempdir()}"
    fix = "pass another --work-dir" if work_dir is not None else "pass --work-dir DIR on a disk with room"

    def could_not(what, err):
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        fail(f"could not {what} in {where} ({reason}); free some space or {fix}")
    try:
        tmp = tempfile.mkdtemp(prefix="quest_14_1-", dir=work_dir)
    except OSError as err:
        could_not("create the temporary folder", err)
    try:
        sizes = {}
        for name, model in models.items():
            path = os.path.join(tmp, name)
            data = torch_bytes(model.state_dict())
            try:
                with open(path, "wb") as file:
                    file.write(data)
            except OSError as err:
                could_not(f"write the temporary {name}", err)
            sizes[name] = os.path.getsize(path) / 1024
        return sizes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- beyond the spec: accuracy, latency, SQNR
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


def module_layer_outputs(model, x, modules):
    """{layer: float output} of a module model, read by forward hooks on {layer: module name}."""
    outputs = {}
    hooks = [model.get_submodule(module).register_forward_hook(
        lambda _, __, out, layer=layer: outputs.__setitem__(layer, out.dequantize() if out.is_quantized else out))
        for layer, module in modules.items()]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def graph_layer_outputs(graph_module, x):
    """{layer: float output} of a converted pt2e graph: each conv/linear in graph order (named as in MiniCNN),
    followed through its ReLU and its output quantize -> dequantize, so the int8 rounding of the output counts."""
    ends, follow = [], ("aten.relu.default", "aten.relu_.default", "quantized_decomposed.quantize_per_tensor.default",
                        "quantized_decomposed.dequantize_per_tensor.default")
    for node in graph_module.graph.nodes:
        if str(node.target) in ("aten.conv2d.default", "aten.linear.default"):
            while len(node.users) == 1 and str(next(iter(node.users)).target) in follow:
                node = next(iter(node.users))
            ends.append(node)
    names = dict(zip(ends, LAYER_OUTPUTS))
    outputs = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in names:
                outputs[names[node]] = out
            return out
    Recorder(graph_module).run(x)
    return outputs


@torch.inference_mode()
def layer_sqnr(fp32, int8, x, batches, flow):
    """[{name, sqnr_db}]: each quantized layer's output, INT8 vs FP32, on the same batches (the calibration data).
    SQNR = 10 log10(sum fp32^2 / sum (fp32 - int8)^2); the error of earlier layers is included, as a user sees it.
    https://pytorch.org/docs/stable/quantization-accuracy-debugging.html"""
    signal_sum, noise_sum = dict.fromkeys(LAYER_OUTPUTS, 0.0), dict.fromkeys(LAYER_OUTPUTS, 0.0)
    for idx in batches:
        reference = module_layer_outputs(fp32, x[idx], LAYER_OUTPUTS)
        quantized = (graph_layer_outputs(int8, x[idx]) if flow.startswith("pt2e")
                     else module_layer_outputs(int8, x[idx], {layer: layer for layer in LAYER_OUTPUTS}))
        for layer, ref in reference.items():
            signal_sum[layer] += ref.double().pow(2).sum().item()
            noise_sum[layer] += (ref.double() - quantized[layer].double()).pow(2).sum().item()
    tiny = 1e-30  # an exact match (or a dead layer) gives a large finite figure, not inf
    return [{"name": layer,
             "sqnr_db": round(10 * math.log10(max(signal_sum[layer], tiny) / max(noise_sum[layer], tiny)), 2)}
            for layer in LAYER_OUTPUTS]


def measure(fp32, int8, sizes, test_x, test_y, latency_seconds):
    """The figures every flow reports: sizes (Act 5), test accuracy, CPU latencies of both models."""
    size_fp32, size_int8 = sizes["temp_fp32_model.pth"], sizes["temp_int8_model.pth"]
    result = {"size_fp32_kb": round(size_fp32, 2), "size_int8_kb": round(size_int8, 2),
              "compression_ratio": round(size_fp32 / size_int8, 3),
              "acc_fp32": accuracy(fp32, test_x, test_y), "acc_int8": accuracy(int8, test_x, test_y)}
    for batch in LATENCY_BATCH_SIZES:
        x = test_x[torch.arange(batch) % len(test_x)]  # repeat digits if the test split is smaller
        result[f"latency_ms_fp32_b{batch}"] = round(latency_ms(fp32, x, latency_seconds), 3)
        result[f"latency_ms_int8_b{batch}"] = round(latency_ms(int8, x, latency_seconds), 3)
    return result


# ---------------------------------------------------------------- artifacts
def make_dir(path, flag):
    """Create an output folder right before its first file (check_output_dir made sure we can)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"could not create {flag} {path} ({err.strerror or err}); pass a folder you can write to")
    return Path(path)


def save_int8(model, flow, save_dir, example):
    """Keep the INT8 model; serialized in memory first, so a full disk is one clean line from write_atomically.
    eager, qat: TorchScript (torch.jit.load; no MiniCNN class needed). pt2e: a torch.export program, any batch
    size >= 1 (import torchao.quantization.pt2e.quantize_pt2e first: it registers the quantize ops)."""
    buffer = io.BytesIO()
    if flow.startswith("pt2e"):
        name = "mini_cnn_int8_pt2e.pt2"
        torch.export.save(export_fp32(model, example), buffer)
    else:
        name = "mini_cnn_int8.pt"
        torch.jit.save(torch.jit.script(model), buffer)
    path = make_dir(save_dir, "--save-dir") / name
    write_atomically(path, buffer.getvalue())
    return str(path)


def print_report(result):
    """The FP32-vs-INT8 table, then the per-layer SQNR table."""
    rows = [("state_dict size (KB)", "size_fp32_kb", "size_int8_kb", ".1f", lambda a, b: f"{a / b:.2f}x smaller"),
            ("test accuracy", "acc_fp32", "acc_int8", ".4f", lambda a, b: f"{100 * (b - a):+.2f} points")]
    rows += [(f"latency batch {n} (ms)", f"latency_ms_fp32_b{n}", f"latency_ms_int8_b{n}", ".3f",
              lambda a, b: f"{a / b:.2f}x faster" if a >= b else f"{b / a:.2f}x slower") for n in LATENCY_BATCH_SIZES]
    print(f"{'':24}{'FP32':>10}{'INT8':>10}  INT8 ({result['flow']}, {result['engine']}) vs FP32")
    for label, fp32, int8, fmt, compare in rows:
        print(f"{label:24}{result[fp32]:>10{fmt}}{result[int8]:>10{fmt}}  {compare(result[fp32], result[int8])}")
    if result["acc_fp32_fine_tuned"] is not None:
        print(f"{'':24}the fine-tuned weights in FP32: {result['acc_fp32_fine_tuned']:.4f} (INT8 "
              f"{100 * (result['acc_int8'] - result['acc_fp32_fine_tuned']):+.2f} points against them)")
    print("per-layer SQNR, INT8 vs FP32 output on the calibration batches (higher is closer; 20 dB = 1% noise power)")
    for layer in result["layers"]:
        print(f"  {layer['name']:8}{layer['sqnr_db']:>8.1f} dB")


def main(argv=None):
    args = parse_args(argv)
    engine, why = check_args(args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    print(f"engine: {engine} ({why})", flush=True)

    images, labels = load_mnist("mnist", args.data_dir, train=True)
    train_x, train_y = normalize(images).to(device), labels.to(device)
    images, labels = load_mnist("mnist", args.data_dir, train=False)
    test_x, test_y = normalize(images), labels  # the INT8 model runs on CPU, so accuracy is measured there
    cpu_x, cpu_y = train_x.cpu(), train_y.cpu()  # calibration and QAT run on the CPU too
    batches = shuffled_batches(len(train_x), args.batch_size, torch.Generator().manual_seed(args.seed), device)
    print(f"data: {len(train_x)} train / {len(test_x)} test digits from {args.data_dir}; FP32 trains on {device}, "
          f"the INT8 model runs on CPU (quantized kernels are CPU kernels)")
    if not args.flow.startswith("pt2e"):
        silence_known_warnings()
        print("note: known deprecation warnings of torch.ao.quantization and TorchScript are filtered "
              "(the eager-mode API still works in torch 2.14; torchao is its successor: --flow pt2e)")

    print(f"act 1: training the FP32 model for {args.train_batches} batches of {args.batch_size}", flush=True)
    fp32 = MiniCNN().to(device)
    train_loss = train(fp32, train_x, train_y, itertools.islice(batches, args.train_batches), args.lr, device,
                       "FP32 training", "--lr", steps=args.train_batches)
    fp32 = fp32.cpu().eval()
    calib = [idx.cpu() for idx in itertools.islice(batches, args.calib_batches)]

    reference = fp32  # the FP32 model each INT8 layer is compared with (qat: the fine-tuned weights)
    if args.flow == "eager":
        int8 = quantize_eager(fp32, cpu_x, calib, engine, args.observer)
        how = f"post-training, {args.observer} observers, calibrated on {args.calib_batches} batches"
    elif args.flow in ("qat", "pt2e-qat"):
        qat_batches = (idx.cpu() for idx in batches)  # drawn one at a time as fine-tuning takes them
        print(f"quantization-aware fine-tuning: {args.qat_batches} batches with fake-quantized weights and "
              "activations", flush=True)
        quantize = quantize_qat if args.flow == "qat" else quantize_pt2e_qat
        int8, reference = quantize(fp32, cpu_x, cpu_y, qat_batches, args.qat_batches, engine, args.qat_lr)
        how = "fine-tuned with fake quantization (observers frozen for the second half)"
    else:
        int8 = quantize_pt2e(fp32, cpu_x, calib, engine)
        how = f"torch.export + prepare_pt2e, calibrated on {args.calib_batches} batches"
    print(f"acts 2-4: {how}, converted to INT8 ({engine})")

    sizes = state_dict_sizes_kb({"temp_fp32_model.pth": fp32, "temp_int8_model.pth": int8}, args.work_dir)
    print(f"act 5: FP32 state_dict {sizes['temp_fp32_model.pth']:.1f} KB, INT8 state_dict "
          f"{sizes['temp_int8_model.pth']:.1f} KB (temp files deleted)")

    runner, compile_s = int8, None
    if args.flow.startswith("pt2e") and not args.no_compile:
        print("torch.compile: lowering the INT8 model to int8 kernels (once per batch size; "
              "can take a minute on a small CPU)", flush=True)
        runner, compile_s = compile_for_cpu(int8, [*accuracy_batch_sizes(len(test_x)), *LATENCY_BATCH_SIZES], test_x)
        print(f"torch.compile: done in {compile_s:.1f} s (reported apart from the latencies)")
    figures = measure(fp32, runner, sizes, test_x, test_y, args.latency_seconds)
    layers = layer_sqnr(reference, int8, cpu_x, calib, args.flow)
    # QAT's steps also train: the fine-tuned weights in FP32 say how much of any gain is training, not quantization.
    acc_fine_tuned = accuracy(reference, test_x, test_y) if reference is not fp32 else None
    runs = ("uncompiled: reference quantize/dequantize ops" if args.flow.startswith("pt2e") and args.no_compile else
            f"torch.compile'd (compile {compile_s:.1f} s, not in the latencies)" if compile_s is not None else
            "quantized kernels are CPU-only")
    saved = save_int8(int8, args.flow, args.save_dir, test_x[:2]) if args.save_dir else None
    result = {**figures, "layers": layers, "acc_fp32_fine_tuned": acc_fine_tuned,
              "notes": f"INT8 ({args.flow} flow, {engine}: {how}) runs on CPU, {runs}; FP32 trained on {device} for "
                       f"{args.train_batches} batches; accuracy on {len(test_x)} test digits; latencies are CPU "
                       f"medians with {torch.get_num_threads()} threads and vary run to run",
              "train_loss": round(train_loss, 4), "flow": args.flow, "engine": engine,
              "observer": args.observer if args.flow == "eager" else None,
              "qat_batches": args.qat_batches if args.flow.endswith("qat") else None,
              "train_device": str(device), "test_images": len(test_x), "saved_model": saved,
              "compiled": not args.no_compile if args.flow.startswith("pt2e") else None,
              "compile_seconds": None if compile_s is None else round(compile_s, 2)}

    print_report(result)
    if saved:
        print(f"wrote the INT8 model to {saved} (" + ("import torchao.quantization.pt2e.quantize_pt2e, then "
              "torch.export.load(path).module(); torch.compile it" if args.flow.startswith("pt2e") else
              f"TorchScript: torch.backends.quantized.engine = '{engine}'; torch.jit.load(path)") + "; run on CPU)")
    print(json.dumps(result, allow_nan=False))


# ---- plumbing: one voice (docs/contributing.md, verbatim)
def fail(message):
    """End the run the way every fault ends here: one line on stderr, exit 1, no traceback."""
    raise SystemExit(f"error: {message}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends like every other fault: one line on stderr, no usage dump."""

    def error(self, message):
        fail(f"{message}; run with --help to see the flags")


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """argparse type: a finite int or float (`kind`) from low to high; an open end leaves the bound itself out.
    number(int, 1): a whole number >= 1; number(float, 0, low_open=True): above 0; number(float, 0, 1): in [0, 1]."""
    what = "a whole number" if kind is int else "a finite number"
    if low is not None and high is not None:
        what += f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        what += f" {'above' if low_open else '>='} {low}"
    elif high is not None:
        what += f" {'below' if high_open else '<='} {high}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not (math.isfinite(value) and (low is None or value > low or value == low and not low_open)
                and (high is None or value < high or value == high and not high_open)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


def utf8_path(text):
    """argparse type of a path flag: text that is valid UTF-8. A name in another encoding (a Latin-1 byte typed in
    the shell) arrives as a lone surrogate, which print and the JSON line cannot write: refused before any work."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{ascii(text)[:80]} is not valid UTF-8; rename it or pass a UTF-8 path") \
            from None
    return text


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
    try:
        existing = next(folder for folder in (path, *path.parents) if folder.exists())
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except OSError as err:  # a name or path longer than the file system takes, a loop of links
        fail(f"{flag} {str(path)[:60]}... cannot be used ({err.strerror or err}); pass a shorter path")
    if any(len(os.fsencode(part)) > name_max - 20 for part in path.relative_to(existing).parts):
        fail(f"{flag}: a folder name in {str(path)[:60]}... is longer than the file system takes "
             f"({name_max} bytes, less room for temp names); pass a shorter path")
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


def all_finite(tensors):
    """Whether every floating-point tensor holds only finite numbers: asked before anything is saved, because a
    loss computed before the last optimizer step can be finite while the weights after it are not."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors if tensor.is_floating_point())


def exit_interrupted(stop, what_was_kept):
    """End a run that Ctrl-C or SIGTERM stopped: one line saying what was kept and how to continue; exit 130 for
    Ctrl-C, 143 for SIGTERM (128 + the signal, as a shell reports it)."""
    signum = stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT
    cause = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    print(f"error: {cause}; {what_was_kept}", file=sys.stderr)
    sys.exit(128 + signum)


def exit_closed_pipe():
    """stdout closed by the program reading it (`| head -1`): end in one line, not a traceback, with exit 141, as a
    shell reports a process that SIGPIPE ended. Whatever is still printed, Python's flush at exit included, goes to
    /dev/null. Files already written are whole: every one is written atomically."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print("error: the program reading the output closed it (e.g. `| head`); the run stopped there, and the files "
          "it wrote are complete", file=sys.stderr)
    sys.exit(128 + getattr(signal, "SIGPIPE", 13))


def read_idx(path, ndim):
    """One raw MNIST file as a uint8 tensor: a big-endian header (magic 0x0800 + ndim, then one 4-byte size per
    dimension) and exactly that many bytes. Anything else is called corrupt, by name, before the body is read (a
    huge file under that name never fills the memory)."""
    header, fix = 4 * (ndim + 1), "delete it to download it again, or pass another --data-dir"
    try:
        with open(path, "rb") as file:
            head, size = file.read(header), os.fstat(file.fileno()).st_size
            if len(head) < header or int.from_bytes(head[:4], "big") != 0x800 + ndim:
                fail(f"{path} is corrupt (no MNIST IDX header with {ndim} dimension(s)); {fix}")
            dims = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
            if size != header + math.prod(dims):
                fail(f"{path} is corrupt (its header promises {header + math.prod(dims)} bytes, it holds {size}: "
                     f"truncated or padded); {fix}")
            body = bytearray(file.read())
    except OSError as err:
        fail(f"could not read {path} ({err.strerror or err}); check the file or pass another --data-dir")
    if math.prod(dims) == 0:
        return torch.zeros(dims, dtype=torch.uint8)
    return torch.frombuffer(body, dtype=torch.uint8).view(*dims)


def load_mnist(name, data_dir, train):
    """One split of MNIST or Fashion-MNIST as uint8 images (N, 28, 28) and int64 labels on the CPU, read from
    torchvision's raw layout <data_dir>/<MNIST|FashionMNIST>/raw and downloaded there when missing. A split that
    cannot be had, or is corrupt or empty, ends in one line naming the file."""
    dataset_class = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    raw, split = Path(data_dir) / dataset_class.__name__ / "raw", "train" if train else "t10k"
    image_file, label_file = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
    for path in (image_file, label_file):  # a folder, FIFO or device under a file's name: a download would hang on it
        if os.path.exists(path) and not os.path.isfile(path):
            fail(f"{path} is not a regular file (a folder, FIFO or device); remove it, or pass another --data-dir")
    if not (os.path.isfile(image_file) and os.path.isfile(label_file)):  # False, not an error, for too long a name
        try:  # torchvision fetches the four raw files into <data_dir>/<class>/raw
            dataset_class(root=data_dir, train=train, download=True)
        except Exception as err:  # URLError is an OSError; a failed or bad download surfaces as other errors too
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            fail(f"{name} is not in {raw} and could not be downloaded ({lines[-1] if lines else type(err).__name__}); "
                 f"pass --data-dir pointing at a folder that holds {dataset_class.__name__}/raw "
                 "(e.g. --data-dir assets/mnist-5k for MNIST)")
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
    fix = "delete it to download it again, or pass another --data-dir"
    if images.shape[1:] != (28, 28):
        fail(f"{image_file} is corrupt (images of {images.shape[1]}x{images.shape[2]} pixels, not 28x28); {fix}")
    if len(images) == 0:
        fail(f"{image_file} holds no images; pass --data-dir pointing at a complete {dataset_class.__name__}/raw")
    if len(labels) != len(images) or labels.max() > 9:
        what = f"{len(labels)} labels for {len(images)} images" if len(labels) != len(images) else "a label above 9"
        fail(f"{label_file} is corrupt ({what}); {fix}")
    return images, labels.long()

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:
        exit_interrupted(stop, "nothing was saved (temporary files removed, files already in --save-dir untouched); "
                               "run the command again to start over")
    except BrokenPipeError:  # stdout closed early by the program reading it
        exit_closed_pipe()
