"""Benchmarks for quest_12_2.py (DDPM on MNIST).

    python bench/bench_ddpm.py speed   --data-dir assets/mnist-5k
        training images/s of the script's pipeline (one preprocessed tensor on the device, index-drawn
        batches) vs the spec-literal one (torchvision transforms per sample + DataLoader), same model
        and batch size; the achieved training GFLOP/s beside a large matmul's, same precision, same run; and the
        seconds to sample 64 digits with DDPM-300, DDIM-100 and DPM-Solver-20, and 256 with DPM-Solver-20 (guided,
        as the script samples).

    python bench/bench_ddpm.py cpu --batch-size 32
        one training step of the 16-32-64 UNet (on pixels; --patch-size 2: the Quickstart's) in fp32, bf16
        autocast, channels_last (fp32 and bf16) and torch.compile + bf16, interleaved in rounds in one process (ratios to fp32 are what to read); then the
        seconds per digit of DDIM-20 sampling for 64 and 256 digits, one forward pass over all of them vs
        chunks of --sample-batch-size.

    python bench/bench_ddpm.py widths --batch-size 32 --steps 10
        one training step for several UNet widths (base x --channel-mult), interleaved in rounds in one process,
        in the precision the script would pick: images/s and the ratio to the 16-32-64 UNet on pixels.

    python bench/bench_ddpm.py quality --checkpoint chaos_sculptures/checkpoint.pt --data-dir assets/mnist-5k
        samples digits from a checkpoint's EMA weights as the script does (autoguidance from its guide weights,
        --guidance 1 for plain sampling; DDIM with --eta 1, 0 for deterministic) and scores them with a small CNN
        (the judge) trained on the real training digits: the share classified with confidence >= 0.9, how many of
        the 10 classes appear, and the Frechet distance between the judge's 128-d features of the samples and of as
        many real test digits (FD; the same n for the real-vs-real reference: test digits [0, n) vs [n, 2n)). Confidence
        alone rewards thick blob-like 0s and 8s; FD sees when the samples are not distributed like digits.
        The last line is the figures as JSON, for tables.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import quest_12_2 as quest  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=["speed", "quality", "cpu", "widths"])
    p.add_argument("--data-dir", default="assets/mnist-5k")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-channels", type=int, default=16, help="speed, cpu: UNet width at its full resolution")
    p.add_argument("--channel-mult", type=quest.channel_mult, default=(1, 2, 4), help="speed, cpu: widths per level")
    p.add_argument("--patch-size", type=int, choices=[1, 2], default=1,
                   help="speed, cpu: 2 = the UNet on 2x2 pixel patches (the Quickstart's), "
                        "1 = on pixels (the script's default)")
    p.add_argument("--batch-size", type=int, default=128, help="speed, cpu, widths: training batch")
    p.add_argument("--steps", type=int, default=20, help="speed, cpu, widths: timed training steps per variant (per round)")
    p.add_argument("--rounds", type=int, default=3, help="cpu, widths: interleaved rounds of timed steps per variant")
    p.add_argument("--sample-batch-size", type=int, default=64, help="cpu: chunk size for sampling")
    p.add_argument("--checkpoint", type=Path, default=Path("chaos_sculptures/checkpoint.pt"), help="quality")
    p.add_argument("--num-samples", type=int, default=256, help="quality: digits to generate and score")
    p.add_argument("--sampler", choices=quest.SAMPLERS, default="ddpm", help="quality")
    p.add_argument("--sample-steps", type=int, default=None, help="quality: DPM-Solver/DDIM steps (default: the script's)")
    p.add_argument("--guidance", type=quest.number(float, 0, low_open=True), default=2.0,
                   help="quality: autoguidance weight with the checkpoint's guide weights (1 = plain sampling)")
    p.add_argument("--eta", type=quest.number(float, 0, 1), default=1.0, help="quality: DPM-Solver/DDIM eta (0 = deterministic)")
    p.add_argument("--cfg", type=float, default=1.5, help="quality, conditional checkpoints: classifier-free guidance W")
    p.add_argument("--runs", default=None,
                   help="quality: several samplings of the same checkpoint, scored by the same judge, e.g. "
                        "'dpm:20:1 dpm:20:0 ddpm' (SAMPLER[:STEPS[:ETA[:CFG]]]); default: --sampler/--sample-steps/--eta/--cfg")
    p.add_argument("--grid", type=Path, default=None,
                   help="quality: also save the scored samples as PNG grids (the sampler is added to the name)")
    args = p.parse_args()
    args.sample_steps = args.sample_steps or quest.DEFAULT_SAMPLE_STEPS.get(args.sampler, 0)
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(batches, model, optimizer, schedule, steps, device):
    """Images/s over `steps` training steps fed by `batches` (after two warm-up steps), the script's precision."""
    dtype = quest.speed_path("auto", device)[0]
    seen, start = 0, None
    for i, x0 in enumerate(batches):
        if i == 2:
            sync(device)
            seen, start = 0, time.perf_counter()
        if i == steps + 2:
            break
        quest.train_step(model, optimizer, schedule, x0.to(device, non_blocking=True), dtype, 5.0)
        seen += len(x0)
    sync(device)
    return seen / (time.perf_counter() - start)


def speed(args, device):
    torch.manual_seed(args.seed)
    schedule = quest.NoiseSchedule(300, device)
    model = quest.SimpleUNet(base_channels=args.base_channels, channel_mult=args.channel_mult,
                             patch_size=args.patch_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def script_batches():  # what quest_12_2.py does
        images = quest.preprocess(datasets.MNIST(args.data_dir, train=True).data).to(device)
        while True:
            order = torch.randperm(len(images), device=device)
            yield from (images[order[i:i + args.batch_size]] for i in range(0, len(images), args.batch_size))

    spec = transforms.Compose([transforms.Resize(32), transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    literal = DataLoader(datasets.MNIST(args.data_dir, train=True, transform=spec), batch_size=args.batch_size,
                         shuffle=True, drop_last=True)

    def literal_batches():  # the spec as written: per-sample PIL transforms in a DataLoader
        while True:
            yield from (x for x, _ in literal)

    data_only = {}
    for name, make in (("script: on-device tensor", script_batches), ("spec-literal DataLoader", literal_batches)):
        batches, start, seen = make(), time.perf_counter(), 0
        for _ in range(args.steps):
            seen += len(next(batches))
        data_only[name] = seen / (time.perf_counter() - start)
    train_rate = {name: time_training(make(), model, optimizer, schedule, args.steps, device)
                  for name, make in (("script: on-device tensor", script_batches),
                                     ("spec-literal DataLoader", literal_batches))}

    print(f"\ndevice {device}, SimpleUNet base {args.base_channels} x {args.channel_mult}, batch {args.batch_size}, {args.steps} steps")
    print(f"{'pipeline':28} {'train img/s':>12} {'data-only img/s':>16}")
    for name in train_rate:
        print(f"{name:28} {train_rate[name]:12.1f} {data_only[name]:16.0f}")
    ratio = train_rate["script: on-device tensor"] / train_rate["spec-literal DataLoader"]
    print(f"training speed-up of the script's pipeline: {ratio:.2f}x")

    # achieved GFLOP/s: the FLOPs of one training step (forward + backward, counted by torch) per image, times the
    # images/s above, beside what this machine does on a large matmul in the same precision, in the same run
    dtype = quest.speed_path("auto", device)[0]
    batch = torch.rand(args.batch_size, 1, 32, 32, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        quest.train_step(model, optimizer, schedule, batch, dtype, 5.0)
    flops_per_image = counter.get_total_flops() / args.batch_size
    achieved = flops_per_image * train_rate["script: on-device tensor"] / 1e9
    matmul = matmul_gflops(device, dtype)
    print(f"\ntraining: {flops_per_image / 1e6:.0f} MFLOP per image (forward + backward) -> {achieved:.1f} GFLOP/s "
          f"achieved, {achieved / matmul:.0%} of a 2048x2048 matmul's {matmul:.1f} GFLOP/s "
          f"({'bf16' if dtype else 'fp32'}, this run)")

    ema_model, guide = model.eval(), copy.deepcopy(model).eval()  # the script samples guided
    print(f"\n{'sampler (guided)':28} {'digits':>6} {'seconds':>9} {'ms/digit':>9}")
    seconds = {}
    for sampler, steps, n in (("ddpm", 300, 64), ("ddim", 100, 64), ("dpm", 20, 64), ("dpm", 20, 256)):
        sync(device)
        start = time.perf_counter()
        quest.sample(ema_model, schedule, n, sampler, steps, device, dtype=dtype, guide=guide, guidance=2.0, eta=1.0)
        sync(device)
        seconds[sampler, n] = time.perf_counter() - start
        print(f"{sampler.upper() + '-' + str(steps):28} {n:6} {seconds[sampler, n]:9.2f} {1000 * seconds[sampler, n] / n:9.1f}")
    print(f"DPM-20: 256 digits take {seconds['dpm', 256] / seconds['dpm', 64]:.2f}x the time of 64 (4x = flat per digit)")


def matmul_gflops(device, dtype, size=2048, seconds=2.0):
    """GFLOP/s of a large square matmul in the given precision (None: fp32), the best of repeated timings."""
    a, b = (torch.rand(size, size, device=device, dtype=dtype or torch.float32) for _ in range(2))
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def train_digit_classifier(data_dir, device, epochs=8):
    """A small CNN on the real digits, in the DDPM's own 32x32 [-1, 1] space."""
    train_set, test_set = (datasets.MNIST(data_dir, train=split) for split in (True, False))
    x, y = quest.preprocess(train_set.data).to(device), train_set.targets.to(device)
    classifier = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10)).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), device=device)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(classifier(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(quest.preprocess(test_set.data).to(device)).argmax(1).cpu() == test_set.targets)
    return classifier, accuracy.float().mean().item()


def judge_features(classifier, images, chunk=500):
    """The judge's penultimate activations (128-d) and its softmax, in chunks."""
    features, probabilities = [], []
    with torch.no_grad():
        for part in images.split(chunk):
            feature = classifier[:-1](part)
            features.append(feature)
            probabilities.append(F.softmax(classifier[-1](feature), dim=1))
    return torch.cat(features).double().cpu().numpy(), torch.cat(probabilities)


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 sqrt(C_a C_b)), as in FID, on the judge's features."""
    import numpy as np
    from scipy import linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def quality(args, device):
    """Scores each of --runs (default: the one --sampler/--sample-steps/--eta) on the same checkpoint and judge."""
    torch.manual_seed(args.seed)
    classifier, test_accuracy = train_digit_classifier(args.data_dir, device)
    checkpoint = torch.load(args.checkpoint, map_location=device, weights_only=True)
    config = checkpoint["config"]
    conditional = config.get("conditional", False)
    model = quest.SimpleUNet(base_channels=config["base_channels"], attention=config["attention"],
                             channel_mult=tuple(config["channel_mult"]), num_classes=10 if conditional else 0,
                             patch_size=config.get("patch_size", 1)).to(device)
    model.load_state_dict(checkpoint["ema"])
    guide = None  # autoguidance's weaker model, as the script samples with it (unconditional models only)
    if conditional and args.num_samples % 10:
        sys.exit(f"error: a conditional checkpoint is scored on all 10 classes; pass a --num-samples divisible by 10")
    if "guide" in checkpoint and args.guidance != 1 and not conditional:
        guide = copy.deepcopy(model)  # the same architecture
        guide.load_state_dict(checkpoint["guide"])
    elif args.guidance != 1 and not conditional:
        print(f"note: {args.checkpoint} holds no guide weights; scoring plain sampling", flush=True)
    schedule = quest.NoiseSchedule(config["timesteps"], device, config["beta_schedule"])
    test_digits = quest.preprocess(datasets.MNIST(args.data_dir, train=False).data).to(device)
    n = args.num_samples
    if len(test_digits) < 2 * n:
        sys.exit(f"error: the real-vs-real reference needs {2 * n} test digits, {args.data_dir} has {len(test_digits)}")
    real, _ = judge_features(classifier, test_digits[:n])
    fd_real = frechet_distance(judge_features(classifier, test_digits[n:2 * n])[0], real)
    print(f"judge: CNN trained on the real digits, test accuracy {test_accuracy:.3f}; real-vs-real FD {fd_real:.1f} "
          f"(n={n})")
    runs = args.runs.split() if args.runs else [f"{args.sampler}:{args.sample_steps}:{args.eta:g}:{args.cfg:g}"]
    asked = torch.arange(10, device=device).repeat_interleave(n // 10) if conditional else None
    for run in runs:
        sampler, steps, eta, cfg = (run.split(":") + [None, None, None])[:4]
        steps = int(steps) if steps else quest.DEFAULT_SAMPLE_STEPS.get(sampler, 0)
        eta = float(eta) if eta else args.eta
        cfg = float(cfg) if cfg else args.cfg
        start = time.perf_counter()
        samples, *_, steps_run = quest.sample(model, schedule, n, sampler, steps, device,
                                             dtype=quest.speed_path("auto", device)[0], seed=args.seed,
                                             guide=guide, guidance=args.guidance, eta=eta, labels=asked, cfg=cfg)
        seconds = time.perf_counter() - start
        if args.grid:
            args.grid.with_name(f"{args.grid.stem}-{sampler}{steps_run}{f'-cfg{cfg:g}' if conditional else ''}"
                                f"{args.grid.suffix}").write_bytes(quest.png_bytes(samples, nrow=n // 10 if conditional else 16))
        features, probabilities = judge_features(classifier, samples)
        confidence, label = probabilities.max(dim=1)
        confident = confidence >= 0.9
        counts = torch.bincount(label[confident], minlength=10).tolist()
        fd = frechet_distance(features, real)
        figures = {"checkpoint": str(args.checkpoint), "sampler": sampler, "steps": steps_run, "n": n,
                   **({"eta": eta} if sampler != "ddpm" else {}),
                   "guidance": args.guidance if guide is not None else 1.0,
                   "confident": round(confident.float().mean().item(), 4), "classes": sum(c > 0 for c in counts),
                   **({"cfg": cfg, "asked": round((confident & (label == asked)).float().mean().item(), 4)}
                      if conditional else {}),
                   "fd": round(fd, 2), "fd_real": round(fd_real, 2), "fd_ratio": round(fd / fd_real, 3),
                   "seconds": round(seconds, 1)}
        name = f"{sampler}-{steps_run}" + ("" if sampler == "ddpm" else f" eta {eta:g}")
        if conditional:
            name += f" cfg {cfg:g}: the class asked for, confidently, {figures['asked']:.1%};"
        else:
            name += ":"
        print(f"{name} confident (p >= 0.9) {figures['confident']:.1%}, classes {figures['classes']}/10, per class "
              f"{counts}, FD {fd:.1f} ({fd / fd_real:.2f}x real), {seconds:.1f} s")
        print(json.dumps(figures), flush=True)


def best_train_rates(runs, schedule, args, device):
    """runs: name -> (model, optimizer, 8 batches of images, autocast dtype). Rounds of --steps training steps
    per run, interleaved (a busy machine slows all alike); the best round's images/s per run."""
    rates = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, optimizer, images, dtype) in runs.items():
            sync(device)
            start = time.perf_counter()
            for i in range(args.steps):
                batch = images[(i % 8) * args.batch_size:(i % 8 + 1) * args.batch_size]
                quest.train_step(model, optimizer, schedule, batch, dtype, 5.0)
            sync(device)
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
    return {name: max(values) for name, values in rates.items()}


def cpu_variants(args, device):
    """Training img/s of one step in each precision/layout, interleaved (a busy machine slows all alike)."""
    torch.manual_seed(args.seed)
    schedule = quest.NoiseSchedule(300, device)
    images = torch.rand(args.batch_size * 8, 1, 32, 32, device=device) * 2 - 1
    variants = {"fp32": (None, False, False), "bf16 autocast": (torch.bfloat16, False, False),
                "channels_last fp32": (None, True, False), "channels_last bf16": (torch.bfloat16, True, False),
                "torch.compile bf16": (torch.bfloat16, False, True)}
    runs = {}
    for name, (dtype, channels_last, compiled) in variants.items():
        model = quest.SimpleUNet(base_channels=args.base_channels, channel_mult=args.channel_mult,
                                 patch_size=args.patch_size).to(device)
        x = images
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        step_model = torch.compile(model) if compiled else model
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for i in range(3):  # warm-up (and compilation)
            quest.train_step(step_model, optimizer, schedule, x[:args.batch_size], dtype, 5.0)
        if compiled:
            print(f"torch.compile: {time.perf_counter() - start:.0f} s to compile and warm up", flush=True)
        runs[name] = (step_model, optimizer, x, dtype)
    rates = best_train_rates(runs, schedule, args, device)
    print(f"\ndevice {device}, SimpleUNet base {args.base_channels} x {args.channel_mult}, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps, best round")
    print(f"{'variant':22} {'train img/s':>12} {'vs fp32':>8}")
    for name, rate in rates.items():
        print(f"{name:22} {rate:12.1f} {rate / rates['fp32']:7.2f}x")

    model = quest.SimpleUNet(base_channels=args.base_channels, channel_mult=args.channel_mult,
                             patch_size=args.patch_size).to(device).eval()
    dtype = quest.speed_path("auto", device)[0]
    print(f"\n{'DDIM-20 sampling':32} {'seconds':>8} {'ms/digit':>9}")
    for n in (64, 256):
        for chunk in sorted({n, args.sample_batch_size}):
            start = time.perf_counter()
            quest.sample(model, schedule, n, "ddim", 20, device, batch_size=chunk, dtype=dtype)
            seconds = time.perf_counter() - start
            print(f"{n:4} digits, chunks of {chunk:4}        {seconds:8.2f} {1000 * seconds / n:9.1f}")


WIDTHS = {  # (base channels, multiples at the three resolutions, patch size: 1 = 32x32 pixels, 2 = 16x16 patches)
    "32-64-64 (the old Quickstart)": (32, (1, 2, 2), 1), "16-32-64 (pixels)": (16, (1, 2, 4), 1),
    "16-32-32": (16, (1, 2, 2), 1), "16-64-128": (16, (1, 4, 8), 1), "8-16-32": (8, (1, 2, 4), 1),
    "16-32-64 on 2x2 patches (the Quickstart)": (16, (1, 2, 4), 2), "32-64-64 on 2x2 patches": (32, (1, 2, 2), 2),
}


def width_variants(args, device):
    """Training img/s of one step for each UNet width, interleaved, in the precision the script picks."""
    torch.manual_seed(args.seed)
    schedule = quest.NoiseSchedule(300, device)
    dtype = quest.speed_path("auto", device)[0]
    images = torch.rand(args.batch_size * 8, 1, 32, 32, device=device) * 2 - 1
    runs = {}
    for name, (base, mult, patch) in WIDTHS.items():
        model = quest.SimpleUNet(base_channels=base, channel_mult=mult, patch_size=patch).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):  # warm-up
            quest.train_step(model, optimizer, schedule, images[:args.batch_size], dtype, 5.0)
        runs[name] = (model, optimizer, images, dtype)
    rates = best_train_rates(runs, schedule, args, device)
    print(f"\ndevice {device} ({str(dtype).replace('torch.', '') if dtype else 'fp32'}), batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps, best round")
    print(f"{'widths':42} {'params':>8} {'train img/s':>12} {'vs pixels':>10}")
    reference = rates["16-32-64 (pixels)"]
    for name, (model, *_) in runs.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:42} {params:7.2f}M {rates[name]:12.1f} {rates[name] / reference:9.2f}x")


def main():
    args = parse_args()
    device = quest.pick_device(args.device)
    {"speed": speed, "quality": quality, "cpu": cpu_variants, "widths": width_variants}[args.mode](args, device)


if __name__ == "__main__":
    main()
