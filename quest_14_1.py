"""Quest 14.1: post-training static INT8 quantization -- the golem gets lighter, not dumber.

Act 1  train a small FP32 CNN on MNIST for 100 batches (Adam).
Act 2  copy it into a fresh model, fuse conv+ReLU, attach the fbgemm qconfig, `prepare` inserts observers.
Act 3  calibrate: run 10 training batches through it so the observers see real activation ranges.
Act 4  `convert` swaps every float module for its INT8 twin (weights int8, activations quint8).
Act 5  save both state_dicts to temporary files, compare their sizes, delete the files (always).
Beyond the spec: test accuracy and CPU latency (batch 1 and 256) of both models, measured in the same run.

Eager-mode quantization needs a QuantStub at the input and a DeQuantStub before log_softmax: without
them the quantized convs would get float tensors and log_softmax a quantized one, and both crash.
The quantized kernels are CPU kernels, so the INT8 model (and, for a fair race, the FP32 one) is
evaluated and timed on the CPU; only training may use CUDA.

    python quest_14_1.py                                  # MNIST in ./data (downloaded if missing)
    python quest_14_1.py --data-dir assets/mnist-5k --save-dir out   # shipped digits; keep the INT8 model
"""
import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.ao.quantization import DeQuantStub, QuantStub, convert, fuse_modules, get_default_qconfig, prepare
from tqdm import tqdm

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# The engines get_default_qconfig knows that this quest offers; each must also be compiled into torch.
ENGINES = ("fbgemm", "x86", "qnnpack")
# Enough weights (81k, mostly in fc1) that int8 storage dominates the saved file: in a tiny net the
# per-channel scales and zero points, float biases and per-tensor file records eat the gain
# (8/16 channels: 2.5x, 32/64: 3.5x, 16/128: 3.6x). A narrow conv1 keeps CPU training cheap.
CONV1_CHANNELS, CONV2_CHANNELS = 16, 128
LATENCY_BATCH_SIZES = (1, 256)
# torch 2.14 deprecates torch.ao.quantization (successor: torchao) and TorchScript. Both still work,
# so these known warnings are hidden and main() says so in one line instead of burying the result.
KNOWN_WARNINGS = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",  # observer reduce_range notice
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",  # quantized dtypes notice
    r"`torch\.jit\.\w+` is deprecated",
)


def silence_known_warnings():
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a small MNIST CNN, quantize it to INT8 (post-training static), "
                                "compare size, accuracy and CPU latency.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="./data", metavar="DIR", help="root that holds (or will receive) MNIST/raw")
    p.add_argument("--device", default="auto", help="auto|cuda|cpu: where the FP32 model trains "
                   "(the INT8 model always runs on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, batch order and calibration batches")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="for training and calibration")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--train-batches", type=int, default=100, metavar="N", help="FP32 training steps")
    p.add_argument("--calib-batches", type=int, default=10, metavar="N", help="training batches the observers see")
    p.add_argument("--engine", default="fbgemm", help="quantized backend: " + "|".join(ENGINES))
    p.add_argument("--latency-seconds", type=float, default=0.5, metavar="S",
                   help="timing budget per model and batch size (at least 3 runs; the median is reported)")
    p.add_argument("--work-dir", metavar="DIR", help="existing folder for the temporary .pth files (a private "
                   "subfolder is made there and removed); None: the system temp folder")
    p.add_argument("--save-dir", metavar="DIR", help="also keep the INT8 model here as TorchScript; None: keep nothing")
    return p.parse_args(argv)


def check_args(args):
    """Refuse bad input before any work, so a failure never leaves anything behind."""
    for flag in ("batch_size", "train_batches", "calib_batches"):
        if getattr(args, flag) < 1:
            name = "--" + flag.replace("_", "-")
            what = "calibration would get no batches" if flag == "calib_batches" else "nothing to do"
            sys.exit(f"error: {name} is {getattr(args, flag)}, so {what}; pass {name} 1 or more")
    if args.latency_seconds < 0:
        sys.exit(f"error: --latency-seconds is {args.latency_seconds}; pass 0 or more (0 still times 3 runs)")
    if args.engine not in ENGINES or args.engine not in torch.backends.quantized.supported_engines:
        usable = [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
        sys.exit(f"error: --engine {args.engine} is not available (this script offers {'|'.join(ENGINES)}, this torch "
                 f"build supports {'|'.join(torch.backends.quantized.supported_engines)}); pass --engine {'|'.join(usable)}")
    if args.work_dir is not None and not os.path.isdir(args.work_dir):
        sys.exit(f"error: --work-dir {args.work_dir} is not an existing folder; create it or leave the flag out")
    if args.save_dir is not None and os.path.exists(args.save_dir) and not os.path.isdir(args.save_dir):
        sys.exit(f"error: --save-dir {args.save_dir} is a file, not a folder; pass a folder path")


def pick_device(name):
    if name not in ("auto", "cuda", "cpu"):
        sys.exit(f"error: --device {name} is not one of auto|cuda|cpu; pick one of those")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda was requested but CUDA is not available here; use --device cpu or auto")
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


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
def load_mnist(data_dir, train, device):
    """The whole split as one tensor, equal to ToTensor() + Normalize((0.1307,), (0.3081,)) per image."""
    try:
        ds = torchvision.datasets.MNIST(root=data_dir, train=train, download=True)
    except (RuntimeError, OSError) as err:  # URLError is an OSError
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "") if lines else type(err).__name__
        sys.exit(f"error: MNIST is not in {os.path.join(data_dir, 'MNIST', 'raw')} and could not be downloaded "
                 f"({reason}); pass --data-dir pointing at a folder that holds MNIST/raw (e.g. --data-dir assets/mnist-5k)")
    if len(ds) == 0:
        sys.exit(f"error: the MNIST {'train' if train else 'test'} split in {data_dir} has no images; "
                 "pass --data-dir pointing at a complete MNIST/raw")
    x = ((ds.data.float().div(255) - MNIST_MEAN) / MNIST_STD).unsqueeze(1)  # N,1,28,28
    return x.to(device), ds.targets.to(device)


def shuffled_batches(n, batch_size, generator, device):
    """Endless index batches on the device, reshuffled every pass, like a shuffled DataLoader epoch after epoch.

    The order is drawn on the CPU (one seeded generator for every device) and moved once per pass, not per step."""
    while True:
        yield from torch.randperm(n, generator=generator).to(device).split(batch_size)


# ---------------------------------------------------------------- Act 1: train FP32
def train(model, x, y, batches, lr, device):
    """Adam on the given index batches; returns the smoothed final loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # CrossEntropyLoss as the spec says: on log-probs it equals NLLLoss (log_softmax of log-probs is a no-op).
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    running = None
    bar = tqdm(batches, desc="act 1: train FP32", unit="batch")
    for idx in bar:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    return running


# ---------------------------------------------------------------- Acts 2-4: quantize
def quantize(trained, x, batches, engine):
    """Post-training static quantization of a copy of `trained` (CPU); calibrates on x[idx] for idx in batches."""
    torch.backends.quantized.engine = engine  # the kernels must match the qconfig's engine
    model = MiniCNN()
    model.load_state_dict({k: v.cpu() for k, v in trained.state_dict().items()})
    model.eval().fuse()
    model.qconfig = get_default_qconfig(engine)
    prepare(model, inplace=True)  # Act 2: observers record activation ranges
    with torch.inference_mode():
        for idx in tqdm(batches, desc="act 3: calibrate", unit="batch"):
            model(x[idx].cpu())
    convert(model, inplace=True)  # Act 4: float modules -> quantized modules
    return model


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
            torch.save(model.state_dict(), path)
            sizes[name] = os.path.getsize(path) / 1024
        return sizes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- beyond the spec: accuracy, latency
@torch.inference_mode()
def accuracy(model, x, y, batch_size=1000):
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


@torch.inference_mode()
def latency_ms(model, x, budget_s, min_runs=3, warmup=1):
    """Median wall time of one forward pass on x (CPU) in ms, over as many runs as fit in budget_s."""
    model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    while len(times) < min_runs or sum(times) < budget_s:
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def save_torchscript(model, save_dir):
    """Keep the INT8 model as TorchScript (reload with torch.jit.load; no MiniCNN class needed)."""
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, "mini_cnn_int8.pt")
    scripted = torch.jit.script(model)
    try:  # written aside and renamed, so a failed save leaves no half-written model
        scripted.save(path + ".partial")
        os.replace(path + ".partial", path)
    finally:
        if os.path.exists(path + ".partial"):
            os.remove(path + ".partial")
    return path


def print_table(result):
    rows = [("state_dict size (KB)", "size_fp32_kb", "size_int8_kb", ".1f", lambda a, b: f"{a / b:.2f}x smaller"),
            ("test accuracy", "acc_fp32", "acc_int8", ".4f", lambda a, b: f"{100 * (b - a):+.2f} points")]
    rows += [(f"latency batch {n} (ms)", f"latency_ms_fp32_b{n}", f"latency_ms_int8_b{n}", ".3f",
              lambda a, b: f"{a / b:.2f}x faster" if b else "") for n in LATENCY_BATCH_SIZES]
    print(f"{'':24}{'FP32':>10}{'INT8':>10}  INT8 vs FP32")
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
    print(f"data: {len(train_x)} train / {len(test_x)} test digits from {args.data_dir}; FP32 trains on {device}, "
          f"the INT8 model runs on CPU ({args.engine} engine: quantized kernels are CPU kernels)")

    fp32 = MiniCNN().to(device)
    train_loss = train(fp32, train_x, train_y, itertools.islice(batches, args.train_batches), args.lr, device)
    fp32 = fp32.cpu().eval()
    silence_known_warnings()
    print("note: known deprecation warnings of torch.ao.quantization and TorchScript are filtered "
          "(the eager-mode API still works in torch 2.14; torchao is its successor)")
    int8 = quantize(fp32, train_x, itertools.islice(batches, args.calib_batches), args.engine)

    sizes = state_dict_sizes_kb({"temp_fp32_model.pth": fp32, "temp_int8_model.pth": int8}, args.work_dir)
    size_fp32, size_int8 = sizes["temp_fp32_model.pth"], sizes["temp_int8_model.pth"]
    print(f"act 5: FP32 state_dict {size_fp32:.1f} KB, INT8 state_dict {size_int8:.1f} KB, "
          f"{size_fp32 / size_int8:.2f}x smaller (temp files deleted)")

    result = {"size_fp32_kb": round(size_fp32, 2), "size_int8_kb": round(size_int8, 2),
              "compression_ratio": round(size_fp32 / size_int8, 3),
              "acc_fp32": accuracy(fp32, test_x, test_y), "acc_int8": accuracy(int8, test_x, test_y)}
    for batch in LATENCY_BATCH_SIZES:
        x = test_x[torch.arange(batch) % len(test_x)]  # repeat digits if the test split is smaller
        result[f"latency_ms_fp32_b{batch}"] = round(latency_ms(fp32, x, args.latency_seconds), 3)
        result[f"latency_ms_int8_b{batch}"] = round(latency_ms(int8, x, args.latency_seconds), 3)
    result["notes"] = (f"INT8 ({args.engine}) runs on CPU: quantized kernels are CPU-only; FP32 trained on {device} for "
                       f"{args.train_batches} batches, calibrated on {args.calib_batches}; accuracy on {len(test_x)} test "
                       f"digits; latencies are CPU medians with {torch.get_num_threads()} threads and vary run to run")
    result.update(train_loss=round(train_loss, 4), engine=args.engine, train_device=str(device), test_images=len(test_x),
                  saved_model=save_torchscript(int8, args.save_dir) if args.save_dir else None)

    print_table(result)
    if result["saved_model"]:
        print(f"wrote the INT8 model as TorchScript to {result['saved_model']} (load with torch.jit.load, run on CPU)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
