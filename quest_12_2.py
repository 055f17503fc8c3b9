"""Quest 12.2 - DDPM "from chaos to a statue": teach a small UNet to predict the noise in MNIST
digits, then carve 64 new digits out of pure noise.

    python quest_12_2.py                                  # the spec: full MNIST (downloaded to ./data), 20 epochs
    python quest_12_2.py --data-dir assets/mnist-5k       # the 4,000 real digits shipped with the repo
    python quest_12_2.py --sample-only --sampler ddim     # new digits from the saved checkpoint, in seconds

Acts: arguments -> the noise schedule -> SimpleUNet -> data -> training (with an EMA of the weights,
a checkpoint after every epoch, the EMA of a quarter into training kept as the guide) -> sampling (DDPM or
DDIM, guided away from that weaker EMA) -> the 8x8 grid, the trajectory -> JSON.
"""
import argparse
import copy
import errno
import io
import json
import math
import os
import sys
import tempfile
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
BETA_SCHEDULES = ("linear-scaled", "cosine", "linear")


# ---------------------------------------------------------------- one voice (docs/contributing.md)
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


# ---------------------------------------------------------------- arguments
def ddim_eta(text):
    """argparse type: DDIM's eta, in [0, 1] (0: deterministic; 1: the DDPM posterior's noise at every step)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got '{text}'") from None
    if not 0 <= value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def ema_decay(text):
    """argparse type: the EMA decay, in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got '{text}'") from None
    if not 0 <= value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def channel_mult(text):
    """argparse type: three positive integers, '1,2,4'."""
    try:
        mult = tuple(int(part) for part in text.split(","))
    except ValueError:
        mult = ()
    if len(mult) != 3 or min(mult) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers like 1,2,4, got {text!r}")
    return mult


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist", help="torchvision dataset to learn")
    p.add_argument("--data-dir", default="./data",
                   help="dataset root; MNIST is downloaded here unless <data-dir>/MNIST/raw already holds it")
    p.add_argument("--epochs", type=positive_int, default=20, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training images per step")
    p.add_argument("--lr", type=positive_float, default=2e-3,
                   help="Adam learning rate, the peak of --lr-schedule cosine (the spec: 1e-3, constant)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                   help="cosine: linear warm-up over --warmup-steps, then cosine decay to lr/10; constant: the spec")
    p.add_argument("--warmup-steps", type=int, default=100, help="steps of linear lr warm-up (0 = none)")
    p.add_argument("--timesteps", type=positive_int, default=300, help="diffusion steps T")
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default="linear-scaled",
                   help="linear-scaled: Ho et al.'s linear betas with end points scaled by 1000/T so that x_T is pure "
                        "noise at any T; cosine: Nichol & Dhariwal; linear: 1e-4 -> 0.02 as written (the spec)")
    p.add_argument("--snr-gamma", type=float, default=5.0,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023); 0 = plain MSE (the spec)")
    p.add_argument("--base-channels", type=positive_int, default=64, help="UNet width (channels at 32x32)")
    p.add_argument("--channel-mult", type=channel_mult, default=(1, 2, 4),
                   help="widths at 32x32, 16x16 and 8x8 as multiples of --base-channels (doubling at each halving, "
                        "as in Ho et al.'s UNet: the cheap low resolutions get the width)")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True,
                   help="self-attention at the 8x8 bottleneck")
    p.add_argument("--ema-decay", type=ema_decay, default=0.999, help="EMA of the weights used for sampling")
    p.add_argument("--guidance", type=positive_float, default=2.0,
                   help="autoguidance weight w > 0 (Karras et al. 2024): the predicted noise is pushed away from that "
                        "of the EMA as it was a quarter into training (kept in the checkpoint), eps_guide + w * (eps - "
                        "eps_guide); w > 1 pushes away, 1 = plain sampling (the spec), w < 1 pulls toward the guide; "
                        "costs a second forward pass")
    p.add_argument("--num-samples", type=positive_int, default=64, help="digits to generate")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm: Ho et al. Algorithm 2 over all T steps; ddim: Song et al., --sample-steps steps")
    p.add_argument("--sample-steps", type=positive_int, default=100, help="DDIM steps (DDPM always runs all T steps)")
    p.add_argument("--eta", type=ddim_eta, default=1.0,
                   help="DDIM only: 0 = deterministic DDIM; 1 = fresh noise at every step, as much as DDPM adds")
    p.add_argument("--sample-batch-size", type=positive_int, default=64,
                   help="digits denoised per forward pass; more samples run in chunks (same images, less memory)")
    p.add_argument("--out-dir", default="chaos_sculptures", help="where the grid, trajectory and checkpoint go")
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: <out-dir>/checkpoint.pt)")
    p.add_argument("--sample-only", action="store_true", help="skip training; sample from --checkpoint")
    p.add_argument("--resume", action="store_true", help="continue training from --checkpoint up to --epochs")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet for training")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                   help="auto: CUDA, then Apple MPS, then CPU")
    p.add_argument("--seed", type=int, default=0, help="seeds everything: same seed + device, same digits")
    args = p.parse_args(argv)
    if args.sample_only and args.resume:
        p.error("--sample-only and --resume exclude each other")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if not (math.isfinite(args.snr_gamma) and args.snr_gamma >= 0):
        p.error(f"--snr-gamma must be a finite number >= 0 (0 switches the weighting off), got {args.snr_gamma}")
    if args.base_channels % 8:
        p.error(f"--base-channels must be a multiple of 8 (GroupNorm uses 8 groups), got {args.base_channels}")
    args.checkpoint = Path(args.checkpoint or Path(args.out_dir) / "checkpoint.pt")
    args.set_by_user = {action.dest for action in p._actions if getattr(args, action.dest, None) != action.default}
    return args


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX (x86 Linux): there bf16 convolutions run about twice as fast as fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision, device):
    """The autocast dtype for training and sampling (None: plain fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and (precision == "bf16" or cpu_has_native_bf16()):
        return torch.bfloat16
    if precision == "bf16":
        fail(f"--precision bf16 is not supported on {device}; use --precision fp32 or auto")
    return None  # MPS and older GPUs: fp32


# ---------------------------------------------------------------- the noise schedule (forward diffusion)
def make_betas(kind, timesteps):
    """The variance added at each of the T steps, computed in float64."""
    if kind == "cosine":  # Nichol & Dhariwal 2021, s = 0.008
        t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
        alphas_cumprod = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    else:  # Ho et al. chose 1e-4 -> 0.02 for T = 1000; scaled, x_T is pure noise at any T
        scale = 1000 / timesteps if kind == "linear-scaled" else 1.0
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    return betas.clamp(max=0.999)


class NoiseSchedule:
    """Everything the forward and reverse process need, on the device."""

    def __init__(self, timesteps, device, kind="linear-scaled"):
        self.timesteps, self.kind = timesteps, kind
        betas = make_betas(kind, timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.betas = betas.float().to(device)
        self.alphas = (1 - betas).float().to(device)
        self.alphas_cumprod = alphas_cumprod.float().to(device)
        # Min-SNR weights for an epsilon-predicting model: min(SNR_t, gamma) / SNR_t, SNR_t = ab / (1 - ab)
        self.snr = (alphas_cumprod / (1 - alphas_cumprod)).float().to(device)

    def get_noisy_image(self, x0, t, noise):
        """q(x_t | x_0): sqrt(ab_t) * x0 + sqrt(1 - ab_t) * noise, with ab_t = alphas_cumprod[t]."""
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def ddpm_step(self, x, predicted_noise, t, noise):
        """Ho et al. Algorithm 2, line 4: noise (sigma_t^2 = beta_t) is added at every step but the last."""
        beta, alpha, ab = self.betas[t], self.alphas[t], self.alphas_cumprod[t]
        mean = (x - beta / (1 - ab).sqrt() * predicted_noise) / alpha.sqrt()
        return mean + beta.sqrt() * noise if t > 0 else mean

    def ddim_step(self, x, predicted_noise, t, t_prev, eta=0.0, fresh_noise=None):
        """Song et al. DDIM: jump from t to t_prev along the predicted x0. The x0 is clamped to the data range and
        the noise re-derived from the clamped x0, so the two stay consistent (as lucidrains'
        denoising-diffusion-pytorch does); otherwise early, wild x0 guesses push the next x off the data.
        eta 0 is deterministic; with eta > 0 part of the noise is replaced by `fresh_noise`, with standard deviation
        eta * sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) (eta 1: the DDPM posterior's), which lets a
        later step correct an earlier step's error."""
        ab = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(ab)
        x0 = ((x - (1 - ab).sqrt() * predicted_noise) / ab.sqrt()).clamp(-1, 1)
        noise = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()  # 0 at the last step: x0 itself
        x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * noise
        return x_prev + sigma * fresh_noise if eta > 0 else x_prev


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

    def __init__(self, image_channels=1, base_channels=64, attention=True, channel_mult=(1, 2, 4)):
        super().__init__()
        c1, c2, c3 = (m * base_channels for m in channel_mult)  # widths at 32x32, 16x16, 8x8
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
    raw_dir = Path(data_dir) / dataset_class.__name__ / "raw"
    files = [raw_dir / Path(filename).stem for filename, _ in dataset_class.resources]  # what torchvision reads
    try:
        dataset = dataset_class(root=data_dir, train=True, download=True)  # no download when the files are there
    except Exception as err:  # torchvision raises Runtime/OS errors for a failed download, many kinds for bad files
        if all(path.is_file() for path in files):  # present, yet unreadable: name the first bad file
            bad = next((path for path in files if not readable_idx(path)), raw_dir)
            fail(f"{bad} is corrupt or truncated ({type(err).__name__}); delete it to download it again, "
                 "or pass another --data-dir")
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        fail(f"{name} is not in {raw_dir} and could not be downloaded ({reason}); pass --data-dir pointing at a "
             f"folder that holds {dataset_class.__name__}/raw (e.g. --data-dir assets/mnist-5k)")
    if len(dataset.data) == 0:
        fail(f"the {name} training split in {raw_dir} has no images; pass another --data-dir")
    # The whole set as one preprocessed tensor on the device: batches are index draws, no DataLoader.
    return preprocess(dataset.data).to(device)


def readable_idx(path):
    """Whether an MNIST IDX file parses as the unsigned bytes MNIST holds, as many as its header promises."""
    try:
        return datasets.mnist.read_sn3_pascalvincent_tensor(str(path), strict=False).dtype == torch.uint8
    except Exception:
        return False


# ---------------------------------------------------------------- training
def lr_factor(step, total_steps, args):
    """Linear warm-up, then cosine decay to a tenth of the peak (nanoGPT's shape); 1 for --lr-schedule constant."""
    if args.lr_schedule == "constant":
        return 1.0
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(model, optimizer, schedule, x0, dtype, snr_gamma):
    """One DDPM step (Ho et al. Algorithm 1): noise x0 at a random t per image, learn to predict the noise."""
    t = torch.randint(0, schedule.timesteps, (len(x0),), device=x0.device)
    noise = torch.randn_like(x0)
    with torch.autocast(x0.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        predicted_noise = model(schedule.get_noisy_image(x0, t, noise), t)
    per_image = F.mse_loss(predicted_noise.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:  # Min-SNR-gamma: nearly clean images (high SNR) stop dominating the gradient
        snr = schedule.snr[t]
        per_image = per_image * snr.clamp(max=snr_gamma) / snr
    loss = per_image.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def guide_epoch(epochs):
    """The epoch whose EMA guides sampling: a quarter into training (epoch 8 of the Quickstart's 30)."""
    return math.ceil(epochs / 4)


def train(model, ema, optimizer, schedule, images, args, device, dtype, first_epoch, end_epoch):
    """Train up to --epochs; after every epoch `end_epoch(epoch)` keeps the guide when it is due and checkpoints,
    so Ctrl-C loses one epoch at most."""
    step_model = torch.compile(model) if args.compile else model
    batches = math.ceil(len(images) / args.batch_size)
    total_steps = args.epochs * batches
    epoch_losses, seen, start = [], 0, time.perf_counter()
    model.train()
    for epoch in range(first_epoch, args.epochs):
        order = torch.randperm(len(images), device=device)
        total = torch.zeros((), device=device)  # summed on the device: no GPU sync per step
        with tqdm(range(batches), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                  disable=None) as bar:  # a bar only on a terminal; closed on any exit
            for i in bar:
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * lr_factor(epoch * batches + i, total_steps, args)
                x0 = images[order[i * args.batch_size:(i + 1) * args.batch_size]]
                total += train_step(step_model, optimizer, schedule, x0, dtype, args.snr_gamma)
                ema.update(model)
                seen += len(x0)
                if i % 10 == 0 or i == batches - 1:
                    running = total.item() / (i + 1)
                    if not math.isfinite(running):
                        fail(f"training diverged in epoch {epoch + 1} (loss {running}); nothing was saved over earlier "
                             f"outputs; lower --lr (now {args.lr:g}; try {args.lr / 10:g})")
                    bar.set_postfix(loss=f"{running:.4f}")
        epoch_losses.append(total.item() / batches)
        end_epoch(epoch + 1)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {epoch_losses[-1]:.4f}  checkpoint saved", flush=True)
    return epoch_losses, seen / (time.perf_counter() - start)


# ---------------------------------------------------------------- sampling: from chaos to the statue
@torch.no_grad()
def sample(model, schedule, num_samples, sampler, sample_steps, device, batch_size=64, dtype=None, seed=0,
           guide=None, guidance=1.0, eta=0.0):
    """Reverse process from pure noise: the final images in [-1, 1], snapshots along the way, steps run.

    With a `guide` (the same UNet, less trained) and guidance w != 1, the noise prediction is pushed away from the
    guide's: eps_guide + w * (eps - eps_guide). The weaker model makes the same kinds of mistakes, only more, so
    the difference points away from them (Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself"); it costs a second forward pass per step.

    Every random draw covers all samples at once and the model sees them `batch_size` at a time, so the
    images do not depend on the chunking, and large --num-samples do not slow down per image (one forward
    pass over hundreds of images spends more time in the allocator than in the convolutions on a CPU)."""
    model.eval()
    if guide is not None:
        guide.eval()
    if sampler == "ddpm":
        steps = list(range(schedule.timesteps - 1, -1, -1))
    else:
        steps = torch.linspace(schedule.timesteps - 1, 0, min(sample_steps, schedule.timesteps)).round().long().tolist()
    keep = set(torch.linspace(0, len(steps) - 1, TRAJECTORY_POINTS - 1).round().long().tolist())
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.randn(num_samples, 1, IMAGE_SIZE, IMAGE_SIZE, device=device, generator=generator)
    snapshots = [x[:8].clamp(-1, 1)]
    stochastic = sampler == "ddpm" or eta > 0  # fresh noise at every step
    with tqdm(steps, desc=f"sampling ({sampler}, {len(steps)} steps)", leave=False, disable=None) as bar:
        for i, t in enumerate(bar):
            noise = torch.randn(x.shape, device=device, generator=generator) if stochastic else None
            for chunk in range(0, num_samples, batch_size):
                part = slice(chunk, chunk + batch_size)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    t_part = torch.full((len(x[part]),), t, device=device)
                    predicted_noise = model(x[part], t_part).float()
                    if guide is not None and guidance != 1:
                        guide_noise = guide(x[part], t_part).float()
                        predicted_noise = guide_noise + guidance * (predicted_noise - guide_noise)
                if sampler == "ddpm":
                    x[part] = schedule.ddpm_step(x[part], predicted_noise, t, noise[part])
                else:
                    t_prev = steps[i + 1] if i + 1 < len(steps) else -1
                    x[part] = schedule.ddim_step(x[part], predicted_noise, t, t_prev, eta,
                                                 noise[part] if eta > 0 else None)
            if i in keep:
                snapshots.append(x[:8].clamp(-1, 1))
    return x.clamp(-1, 1), snapshots, len(steps)


# ---------------------------------------------------------------- artifacts
def png_bytes(images, nrow):
    """Map [-1, 1] to [0, 1] and encode a grid as PNG bytes."""
    buffer = io.BytesIO()
    save_image((images.float() + 1) / 2, buffer, nrow=nrow, format="png")
    return buffer.getvalue()


def load_checkpoint(path, device):
    if path.is_dir():
        fail(f"--checkpoint {path} is a folder; pass the checkpoint file (e.g. {path / 'checkpoint.pt'})")
    if not path.is_file():
        fail(f"no checkpoint at {path}; train first (without --sample-only/--resume) or pass --checkpoint PATH")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file: say so instead of a pickle traceback
        fail(f"{path} is not a readable quest_12_2 checkpoint ({type(err).__name__}); retrain or pass another --checkpoint")
    if not isinstance(checkpoint, dict) or not {"model", "ema", "optimizer", "epoch", "config"} <= set(checkpoint):
        fail(f"{path} is a torch file but not a quest_12_2 checkpoint; retrain or pass another --checkpoint")
    return checkpoint


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = autocast_dtype(args.precision, device)  # decided once, for training and sampling
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    # Every place a file will go is checked before any data, model or training.
    check_output_dir(out_dir, "--out-dir")
    if not args.sample_only:
        check_output_dir(args.checkpoint.parent, "--checkpoint's folder")
        if args.checkpoint.is_dir():
            fail(f"--checkpoint {args.checkpoint} is a folder; pass a file path (e.g. {args.checkpoint / 'checkpoint.pt'})")

    checkpoint = load_checkpoint(args.checkpoint, device) if (args.sample_only or args.resume) else None
    # The architecture comes from the checkpoint when there is one, so it always matches its weights.
    config = checkpoint["config"] if checkpoint else {
        "dataset": args.dataset, "timesteps": args.timesteps, "beta_schedule": args.beta_schedule,
        "base_channels": args.base_channels, "channel_mult": list(args.channel_mult), "attention": args.attention}
    config.setdefault("beta_schedule", "linear")  # checkpoints from before the schedule was a choice
    config.setdefault("channel_mult", [1, 2, 2])  # ... and from before the widths were
    if args.resume:  # the architecture must match the weights; the learning rate and the rest are applied
        def as_flag(value):  # 1,2,4 for the widths, as typed
            return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        kept = [f"--{key.replace('_', '-')} {as_flag(config[key])}" for key in config
                if key in args.set_by_user and as_flag(getattr(args, key)) != as_flag(config[key])]
        if kept:
            print(f"note: --resume keeps the checkpoint's {', '.join(kept)} (its weights were trained with them)",
                  flush=True)
    schedule = NoiseSchedule(config["timesteps"], device, config["beta_schedule"])
    model = SimpleUNet(base_channels=config["base_channels"], attention=config["attention"],
                       channel_mult=tuple(config["channel_mult"])).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = EMA(model, args.ema_decay)
    # autoguidance's weaker model: the EMA as it was a quarter into training, taken once; guide_taken is its epoch
    guide, guide_taken = copy.deepcopy(ema.model), None
    first_epoch, epoch_losses, images_per_s = 0, [], None  # what --sample-only reports
    if checkpoint:
        def reason(err):  # torch's load_state_dict errors put a header line before the cause
            return " ".join(str(err).split())[:200]
        try:
            model.load_state_dict(checkpoint["model"])
            ema.model.load_state_dict(checkpoint["ema"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            fail(f"{args.checkpoint} does not match the SimpleUNet of its own config ({reason(err)}); "
                 "retrain or pass another --checkpoint")
        if "guide" in checkpoint and not (args.sample_only and args.guidance == 1):  # needed to sample or to keep
            try:
                guide.load_state_dict(checkpoint["guide"])
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                fail(f"the guide weights in {args.checkpoint} do not fit its SimpleUNet ({reason(err)}); "
                     + ("sample with --guidance 1" if args.sample_only else "retrain without --resume"))
            guide_taken = checkpoint.get("guide_epoch", 0)  # 0: taken at an unrecorded epoch
        ema.updates = checkpoint.get("ema_updates", 0)
        first_epoch = checkpoint["epoch"]
    epochs_done = first_epoch
    print(f"device {device} ({str(dtype).replace('torch.', '') if dtype else 'fp32'}), SimpleUNet "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, T={schedule.timesteps} "
          f"({config['beta_schedule']} betas, alpha_bar_T={schedule.alphas_cumprod[-1].item():.2g})", flush=True)

    if not args.sample_only:
        images = load_training_images(config["dataset"], args.data_dir, device)
        print(f"{len(images)} training images of {config['dataset']} on {device}; a checkpoint is saved to "
              f"{args.checkpoint} after every epoch", flush=True)
        if first_epoch >= args.epochs:
            print(f"note: {args.checkpoint} is already at epoch {first_epoch} of --epochs {args.epochs}; nothing to "
                  f"train (raise --epochs to continue), sampling from it", flush=True)

        saved_epochs = []

        def end_epoch(epoch):
            nonlocal guide_taken
            if guide_taken is None and epoch >= guide_epoch(args.epochs):
                guide.load_state_dict(ema.model.state_dict())
                guide_taken = epoch
            saved_epochs.append(epoch)
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(args.checkpoint, torch_bytes({
                "model": model.state_dict(), "ema": ema.model.state_dict(), "ema_updates": ema.updates,
                **({"guide": guide.state_dict(), "guide_epoch": guide_taken} if guide_taken is not None else {}),
                "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config}))

        try:
            epoch_losses, images_per_s = train(model, ema, optimizer, schedule, images, args, device, dtype,
                                               first_epoch, end_epoch)
        except KeyboardInterrupt:
            last = saved_epochs[-1] if saved_epochs else (first_epoch if args.resume else None)
            kept = (f"{args.checkpoint} holds epoch {last}; to continue, run the same command with --resume"
                    if last else "no epoch had finished, so no checkpoint was written")
            print(f"error: interrupted (Ctrl-C) during training; {kept}", file=sys.stderr, flush=True)
            sys.exit(130)
        epochs_done = max(args.epochs, first_epoch)

    if guide_taken is None:
        guide = None
        if args.guidance != 1:
            print(f"note: {args.checkpoint} holds no guide weights (written before autoguidance, or by a run stopped "
                  "before a quarter of its epochs); sampling without guidance", flush=True)
    start = time.perf_counter()
    samples, snapshots, steps_run = sample(ema.model, schedule, args.num_samples, args.sampler, args.sample_steps,
                                           device, args.sample_batch_size, dtype, args.seed, guide, args.guidance,
                                           args.eta)
    sample_seconds = time.perf_counter() - start
    if not torch.isfinite(samples).all():  # never save a black grid and call it a success
        fail(f"the sampled digits are not finite (NaN or inf): the weights in {args.checkpoint}"
             + (" or its guide weights are broken; try --guidance 1, or retrain" if guide is not None
                else " are broken; retrain"))
    grid_path, trajectory_path = out_dir / "new_creation.png", out_dir / "trajectory.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(grid_path, png_bytes(samples, nrow=math.ceil(math.sqrt(args.num_samples))))
    # rows: the first samples; columns: pure noise -> finished digit
    write_atomically(trajectory_path, png_bytes(torch.stack(snapshots, dim=1).flatten(0, 1), nrow=len(snapshots)))
    print(f"saved {args.num_samples} samples to {grid_path}, the trajectory to {trajectory_path}"
          + ("" if args.sample_only else f", the checkpoint to {args.checkpoint}"), flush=True)

    result = {
        "destination": str(out_dir), "path": str(grid_path), "fileName": grid_path.name, "success": True,
        "details": {
            "dataset": config["dataset"], "device": str(device), "epochs": epochs_done, "timesteps": schedule.timesteps,
            "betaSchedule": config["beta_schedule"],
            "finalLoss": round(epoch_losses[-1], 5) if epoch_losses else None, "epochLosses": [round(v, 5) for v in epoch_losses],
            "trainImagesPerSecond": round(images_per_s, 1) if images_per_s else None,
            "sampler": args.sampler, "sampleSteps": steps_run, "eta": args.eta if args.sampler == "ddim" else None,
            "guidance": args.guidance if guide is not None else 1.0,
            "numSamples": args.num_samples, "sampleSeconds": round(sample_seconds, 2),
            "trajectory": str(trajectory_path), "checkpoint": str(args.checkpoint), "seed": args.seed,
        },
    }
    print(json.dumps(result, allow_nan=False))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C) outside training; no image was written, and a checkpoint this run finished "
              "training is complete: --sample-only samples from it", file=sys.stderr)
        sys.exit(130)
