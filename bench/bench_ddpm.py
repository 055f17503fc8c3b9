"""Benchmarks for quest_12_2.py (DDPM on MNIST).

    python bench/bench_ddpm.py speed   --data-dir assets/mnist-5k
        training images/s of the script's pipeline (one preprocessed tensor on the device, index-drawn
        batches) vs the spec-literal one (torchvision transforms per sample + DataLoader), same model
        and batch size; and seconds to sample 64 digits with DDPM-300 vs DDIM-50.

    python bench/bench_ddpm.py quality --checkpoint chaos_sculptures/checkpoint.pt --data-dir assets/mnist-5k
        samples digits from a checkpoint's EMA weights and scores them with a small CNN trained on the
        real digits: share classified with confidence >= 0.9, and how many of the 10 classes appear.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import quest_12_2 as quest  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=["speed", "quality"])
    p.add_argument("--data-dir", default="assets/mnist-5k")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-channels", type=int, default=32, help="speed: UNet width")
    p.add_argument("--batch-size", type=int, default=128, help="speed: training batch")
    p.add_argument("--steps", type=int, default=20, help="speed: timed training steps per pipeline")
    p.add_argument("--checkpoint", type=Path, default=Path("chaos_sculptures/checkpoint.pt"), help="quality")
    p.add_argument("--num-samples", type=int, default=256, help="quality: digits to generate and score")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="quality")
    p.add_argument("--sample-steps", type=int, default=50, help="quality: DDIM steps")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(batches, model, optimizer, schedule, steps, device):
    """Images/s over `steps` training steps fed by `batches` (after two warm-up steps)."""
    seen, start = 0, None
    for i, x0 in enumerate(batches):
        if i == 2:
            sync(device)
            seen, start = 0, time.perf_counter()
        if i == steps + 2:
            break
        quest.train_step(model, optimizer, schedule, x0.to(device, non_blocking=True))
        seen += len(x0)
    sync(device)
    return seen / (time.perf_counter() - start)


def speed(args, device):
    torch.manual_seed(args.seed)
    schedule = quest.NoiseSchedule(300, device)
    model = quest.SimpleUNet(base_channels=args.base_channels).to(device)
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

    print(f"\ndevice {device}, SimpleUNet base {args.base_channels}, batch {args.batch_size}, {args.steps} steps")
    print(f"{'pipeline':28} {'train img/s':>12} {'data-only img/s':>16}")
    for name in train_rate:
        print(f"{name:28} {train_rate[name]:12.1f} {data_only[name]:16.0f}")
    ratio = train_rate["script: on-device tensor"] / train_rate["spec-literal DataLoader"]
    print(f"training speed-up of the script's pipeline: {ratio:.2f}x")

    ema_model = model.eval()
    print(f"\n{'sampler (64 digits)':28} {'seconds':>12}")
    for sampler, steps in (("ddpm", 300), ("ddim", 50)):
        sync(device)
        start = time.perf_counter()
        quest.sample(ema_model, schedule, 64, sampler, steps, device)
        sync(device)
        print(f"{sampler.upper() + '-' + str(steps):28} {time.perf_counter() - start:12.2f}")


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


def quality(args, device):
    torch.manual_seed(args.seed)
    classifier, test_accuracy = train_digit_classifier(args.data_dir, device)
    checkpoint = torch.load(args.checkpoint, map_location=device, weights_only=True)
    config = checkpoint["config"]
    model = quest.SimpleUNet(base_channels=config["base_channels"], attention=config["attention"]).to(device)
    model.load_state_dict(checkpoint["ema"])
    schedule = quest.NoiseSchedule(config["timesteps"], device)
    start = time.perf_counter()
    samples, _, _ = quest.sample(model, schedule, args.num_samples, args.sampler, args.sample_steps, device)
    seconds = time.perf_counter() - start
    real = quest.preprocess(datasets.MNIST(args.data_dir, train=False).data[:args.num_samples]).to(device)
    print(f"\ncheckpoint {args.checkpoint} (epoch {checkpoint['epoch']}, base {config['base_channels']}, "
          f"T={config['timesteps']}), sampler {args.sampler}, "
          f"{args.num_samples} samples in {seconds:.1f}s")
    print(f"judge: CNN trained on the real digits, test accuracy {test_accuracy:.3f}")
    for name, images in (("generated", samples), ("real test digits (reference)", real)):
        with torch.no_grad():
            confidence, label = F.softmax(classifier(images), dim=1).max(dim=1)
        confident = confidence >= 0.9
        counts = torch.bincount(label[confident], minlength=10).tolist()
        print(f"{name:30} confident (p >= 0.9): {confident.float().mean().item():6.1%}   "
              f"classes: {sum(c > 0 for c in counts)}/10   per class: {counts}")


def main():
    args = parse_args()
    device = quest.pick_device(args.device)
    speed(args, device) if args.mode == "speed" else quality(args, device)


if __name__ == "__main__":
    main()
