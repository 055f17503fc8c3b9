"""Quest 12.2 - DDPM "from chaos to a statue": teach a small UNet to predict the noise in MNIST
digits, then carve 64 new digits out of pure noise.

    python quest_12_2.py                                  # the spec: full MNIST (downloaded to ./data), 20 epochs
    python quest_12_2.py --data-dir assets/mnist-5k       # the 4,000 real digits shipped with the repo
    python quest_12_2.py --sample-only --sampler ddim     # new digits from the saved checkpoint, in seconds

Acts: arguments -> the noise schedule -> SimpleUNet -> data -> training (with an EMA of the
weights) -> sampling (DDPM or DDIM) -> the 8x8 grid, the trajectory picture, the checkpoint -> JSON.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets
from torchvision.transforms import functional as TF
from torchvision.utils import save_image
from tqdm import tqdm

DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}
IMAGE_SIZE = 32
TRAJECTORY_POINTS = 8  # columns of trajectory.png: pure noise ... finished digit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    p.add_argument("--data-dir", default="./data",
                   help="dataset root; MNIST is downloaded here unless <data-dir>/MNIST/raw already holds it")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--timesteps", type=int, default=300, help="diffusion steps T (linear betas 1e-4 -> 0.02)")
    p.add_argument("--base-channels", type=int, default=64, help="UNet width (channels at 32x32)")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True,
                   help="self-attention at the 8x8 bottleneck")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights used for sampling")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm: Ho et al. Algorithm 2 over all T steps; ddim: deterministic (eta 0), few steps")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (DDPM always runs all T steps)")
    p.add_argument("--out-dir", default="chaos_sculptures", help="where the grid, trajectory and checkpoint go")
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: <out-dir>/checkpoint.pt)")
    p.add_argument("--sample-only", action="store_true", help="skip training; sample from --checkpoint")
    p.add_argument("--resume", action="store_true", help="continue training from --checkpoint up to --epochs")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet for training")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "timesteps", "base_channels", "num_samples", "sample_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.sample_only and args.resume:
        p.error("--sample-only and --resume exclude each other")
    args.checkpoint = Path(args.checkpoint or Path(args.out_dir) / "checkpoint.pt")
    return args


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda was requested but CUDA is not available here; use --device cpu or auto")
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------- the noise schedule (forward diffusion)
class NoiseSchedule:
    """Linear betas 1e-4 -> 0.02 (Ho et al.); everything the forward and reverse process need, on the device."""

    def __init__(self, timesteps, device):
        self.timesteps = timesteps
        self.betas = torch.linspace(1e-4, 0.02, timesteps, device=device)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def get_noisy_image(self, x0, t, noise):
        """q(x_t | x_0): sqrt(ab_t) * x0 + sqrt(1 - ab_t) * noise, with ab_t = alphas_cumprod[t]."""
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def ddpm_step(self, x, predicted_noise, t):
        """Ho et al. Algorithm 2, line 4: noise (sigma_t^2 = beta_t) is added at every step but the last."""
        beta, alpha, ab = self.betas[t], self.alphas[t], self.alphas_cumprod[t]
        mean = (x - beta / (1 - ab).sqrt() * predicted_noise) / alpha.sqrt()
        return mean + beta.sqrt() * torch.randn_like(x) if t > 0 else mean

    def ddim_step(self, x, predicted_noise, t, t_prev):
        """Song et al. DDIM with eta 0: jump straight from t to t_prev along the predicted x0."""
        ab = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(ab)
        x0 = ((x - (1 - ab).sqrt() * predicted_noise) / ab.sqrt()).clamp(-1, 1)
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * predicted_noise


# ---------------------------------------------------------------- the model
def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (as in the Transformer and DDPM papers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the timestep embedding scales and shifts the middle activation."""

    def __init__(self, in_ch, out_ch, emb_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(8, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.conv2(F.silu(h)) + self.skip(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a small feature map, residual."""

    def __init__(self, ch):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (b, h*w, c) each
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class SimpleUNet(nn.Module):
    """32x32 -> 16x16 -> 8x8 and back, skip connections between the paths, timestep in every block."""

    def __init__(self, image_channels=1, base_channels=64, attention=True):
        super().__init__()
        c1, c2, c3 = base_channels, 2 * base_channels, 2 * base_channels
        self.emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, self.emb_dim), nn.SiLU(),
                                      nn.Linear(self.emb_dim, self.emb_dim), nn.SiLU())
        self.stem = nn.Conv2d(image_channels, c1, 3, padding=1)
        # contracting path
        self.down1 = ResBlock(c1, c1, self.emb_dim)
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)  # 32 -> 16
        self.down2 = ResBlock(c1, c2, self.emb_dim)
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)  # 16 -> 8
        self.down3 = ResBlock(c2, c3, self.emb_dim)
        # bottleneck
        self.mid1 = ResBlock(c3, c3, self.emb_dim)
        self.attn = SelfAttention(c3) if attention else nn.Identity()
        self.mid2 = ResBlock(c3, c3, self.emb_dim)
        # expanding path: each block sees the upsampled features and the skip from the same size
        self.up3 = ResBlock(c3 + c3, c2, self.emb_dim)
        self.unpool2 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c2, c2, 3, padding=1))
        self.up2 = ResBlock(c2 + c2, c1, self.emb_dim)
        self.unpool1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c1, c1, 3, padding=1))
        self.up1 = ResBlock(c1 + c1, c1, self.emb_dim)
        self.head = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, image_channels, 3, padding=1))

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(t, self.time_mlp[0].in_features))
        s1 = self.down1(self.stem(x), emb)
        s2 = self.down2(self.pool1(s1), emb)
        s3 = self.down3(self.pool2(s2), emb)
        h = self.mid2(self.attn(self.mid1(s3, emb)), emb)
        h = self.up3(torch.cat([h, s3], dim=1), emb)
        h = self.up2(torch.cat([self.unpool2(h), s2], dim=1), emb)
        h = self.up1(torch.cat([self.unpool1(h), s1], dim=1), emb)
        return self.head(h)


class EMA:
    """Exponential moving average of the weights; its warm-up lets early checkpoints sample well too."""

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)


# ---------------------------------------------------------------- data
def preprocess(raw_images):
    """The spec's Resize(32) -> ToTensor -> Normalize(0.5, 0.5), done once for the whole uint8 (N, 28, 28) set."""
    resized = TF.resize(raw_images[:, None], [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
    return resized.float() / 127.5 - 1.0


def load_training_images(name, data_dir, device):
    dataset_class = DATASETS[name]
    try:
        dataset = dataset_class(root=data_dir, train=True, download=True)
    except (RuntimeError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        sys.exit(f"error: {name} is not in {Path(data_dir) / dataset_class.__name__ / 'raw'} and could "
                 f"not be downloaded ({reason}); pass --data-dir pointing at a folder that holds "
                 f"{dataset_class.__name__}/raw (e.g. --data-dir assets/mnist-5k)")
    # The whole set as one preprocessed tensor on the device: batches are index draws, no DataLoader.
    return preprocess(dataset.data).to(device)


# ---------------------------------------------------------------- training
def train_step(model, optimizer, schedule, x0):
    """One DDPM step (Ho et al. Algorithm 1): noise x0 at a random t per image, learn to predict the noise."""
    t = torch.randint(0, schedule.timesteps, (len(x0),), device=x0.device)
    noise = torch.randn_like(x0)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        predicted_noise = model(schedule.get_noisy_image(x0, t, noise), t)
    loss = F.mse_loss(predicted_noise.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train(model, ema, optimizer, schedule, images, args, device, first_epoch):
    step_model = torch.compile(model) if args.compile else model
    batches = math.ceil(len(images) / args.batch_size)
    epoch_losses, seen, start = [], 0, time.perf_counter()
    model.train()
    for epoch in range(first_epoch, args.epochs):
        order = torch.randperm(len(images), device=device)
        bar = tqdm(range(batches), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        total = torch.zeros((), device=device)  # summed on the device: no GPU sync per step
        for i in bar:
            x0 = images[order[i * args.batch_size:(i + 1) * args.batch_size]]
            total += train_step(step_model, optimizer, schedule, x0)
            ema.update(model)
            seen += len(x0)
            if i % 10 == 0 or i == batches - 1:
                bar.set_postfix(loss=f"{total.item() / (i + 1):.4f}")
        epoch_losses.append(total.item() / batches)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {epoch_losses[-1]:.4f}", flush=True)
    return epoch_losses, seen / (time.perf_counter() - start)


# ---------------------------------------------------------------- sampling: from chaos to the statue
@torch.no_grad()
def sample(model, schedule, num_samples, sampler, sample_steps, device):
    """Reverse process from pure noise: the final images in [-1, 1], snapshots along the way, steps run."""
    model.eval()
    if sampler == "ddpm":
        steps = list(range(schedule.timesteps - 1, -1, -1))
    else:
        steps = torch.linspace(schedule.timesteps - 1, 0, min(sample_steps, schedule.timesteps)).round().long().tolist()
    keep = set(torch.linspace(0, len(steps) - 1, TRAJECTORY_POINTS - 1).round().long().tolist())
    x = torch.randn(num_samples, 1, IMAGE_SIZE, IMAGE_SIZE, device=device)
    snapshots = [x.clamp(-1, 1)]
    for i, t in enumerate(tqdm(steps, desc=f"sampling ({sampler}, {len(steps)} steps)", leave=False)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            predicted_noise = model(x, torch.full((num_samples,), t, device=device)).float()
        if sampler == "ddpm":
            x = schedule.ddpm_step(x, predicted_noise, t)
        else:
            x = schedule.ddim_step(x, predicted_noise, t, steps[i + 1] if i + 1 < len(steps) else -1)
        if i in keep:
            snapshots.append(x.clamp(-1, 1))
    return x.clamp(-1, 1), snapshots, len(steps)


# ---------------------------------------------------------------- artifacts
def save_png(images, path, nrow):
    """Map [-1, 1] to [0, 1] and write a grid atomically (a failure never leaves half a PNG)."""
    tmp = path.with_name(path.name + ".tmp")
    save_image((images + 1) / 2, tmp, nrow=nrow, format="png")
    os.replace(tmp, path)


def save_checkpoint(path, model, ema, optimizer, epoch, config):
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "ema": ema.model.state_dict(), "ema_updates": ema.updates,
                "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    if not path.is_file():
        sys.exit(f"error: no checkpoint at {path}; train first (without --sample-only/--resume) or pass --checkpoint PATH")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file: say so instead of a pickle traceback
        sys.exit(f"error: {path} is not a quest_12_2 checkpoint ({type(err).__name__}); retrain or pass another --checkpoint")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)

    checkpoint = load_checkpoint(args.checkpoint, device) if (args.sample_only or args.resume) else None
    # The architecture comes from the checkpoint when there is one, so it always matches its weights.
    config = checkpoint["config"] if checkpoint else {
        "dataset": args.dataset, "timesteps": args.timesteps, "base_channels": args.base_channels,
        "attention": args.attention}
    schedule = NoiseSchedule(config["timesteps"], device)
    model = SimpleUNet(base_channels=config["base_channels"], attention=config["attention"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = EMA(model, args.ema_decay)
    first_epoch, epoch_losses, images_per_s = 0, [], None  # what --sample-only reports
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        ema.model.load_state_dict(checkpoint["ema"])
        ema.updates = checkpoint["ema_updates"]
        optimizer.load_state_dict(checkpoint["optimizer"])
        first_epoch = checkpoint["epoch"]
    epochs_done = first_epoch
    print(f"device {device}, SimpleUNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"T={schedule.timesteps}", flush=True)

    if not args.sample_only:
        images = load_training_images(config["dataset"], args.data_dir, device)
        print(f"{len(images)} training images of {config['dataset']} on {device}", flush=True)
        epoch_losses, images_per_s = train(model, ema, optimizer, schedule, images, args, device, first_epoch)
        epochs_done = max(args.epochs, first_epoch)
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(args.checkpoint, model, ema, optimizer, epochs_done, config)

    start = time.perf_counter()
    samples, snapshots, steps_run = sample(ema.model, schedule, args.num_samples, args.sampler, args.sample_steps, device)
    sample_seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path, trajectory_path = out_dir / "new_creation.png", out_dir / "trajectory.png"
    save_png(samples, grid_path, nrow=math.ceil(math.sqrt(args.num_samples)))
    shown = min(8, args.num_samples)  # rows: samples; columns: noise -> digit
    save_png(torch.stack([s[:shown] for s in snapshots], dim=1).flatten(0, 1), trajectory_path, nrow=len(snapshots))
    print(f"saved {args.num_samples} samples to {grid_path}, the trajectory to {trajectory_path}"
          + ("" if args.sample_only else f", the checkpoint to {args.checkpoint}"), flush=True)

    result = {
        "destination": str(out_dir), "path": str(grid_path), "fileName": grid_path.name, "success": True,
        "details": {
            "dataset": config["dataset"], "device": str(device), "epochs": epochs_done, "timesteps": schedule.timesteps,
            "finalLoss": round(epoch_losses[-1], 5) if epoch_losses else None, "epochLosses": [round(v, 5) for v in epoch_losses],
            "trainImagesPerSecond": round(images_per_s, 1) if images_per_s else None,
            "sampler": args.sampler, "sampleSteps": steps_run,
            "numSamples": args.num_samples, "sampleSeconds": round(sample_seconds, 2),
            "trajectory": str(trajectory_path), "checkpoint": str(args.checkpoint), "seed": args.seed,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
