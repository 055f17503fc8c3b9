"""Quest 12.2 - DDPM "from chaos to a statue": teach a small UNet to predict the noise in MNIST
digits, then carve 64 new digits out of pure noise.

    python quest_12_2.py                                     # the spec: full MNIST (downloaded to ./data), 20 epochs
    python quest_12_2.py --data-dir assets/mnist-5k --time-budget 4m --batch-size 32 --base-channels 16 \\
        --patch-size 2                                       # the Quickstart: 4 minutes on a laptop CPU
    python quest_12_2.py --sample-only --num-samples 256     # new digits from the saved checkpoint, in seconds

Acts: the settings -> the noise schedule -> SimpleUNet -> data -> training (an EMA of the weights, the EMA of a
quarter into training kept as the guide, a checkpoint after every epoch) -> sampling (DPM-Solver++(2M), DDIM or
DDPM, guided away from that weaker EMA) -> the grid, the trajectory -> JSON.
Measured (docs/quest_12_2.md) on a 2-core AMD EPYC with AVX512-BF16 (and AVX2 emulated), torch 2.14.1, 4,000 digits.
"""
import argparse
import copy
import errno
import io
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
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
    from torchvision.transforms import functional as TF
    from PIL import Image
    from torchvision.utils import save_image
    from tqdm import tqdm
    if hasattr(signal, "pthread_sigmask"):  # a signal held meanwhile is raised here, inside this guard
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
except KeyboardInterrupt as stop:
    print("error: interrupted while starting; nothing was done", file=sys.stderr)
    sys.exit(128 + (stop.args[0] if stop.args else signal.SIGINT))

# ---------------------------------------------------------------- settings
DATASETS = ("mnist", "fashion-mnist")
IMAGE_SIZE = 32
TRAJECTORY_POINTS = 8  # columns of trajectory.png: pure noise ... finished digit
BETA_SCHEDULES = ("linear-scaled", "cosine", "linear")
SAMPLERS = ("dpm", "ddim", "ddpm")
DEFAULT_SAMPLE_STEPS = {"dpm": 25, "ddim": 100}  # DDPM always runs all T steps
CLASS_NAMES = {"mnist": [str(digit) for digit in range(10)],
               "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                                 "Bag", "Ankle boot"]}
NO_CLASS = 10  # the class-embedding entry for "no class": the unconditional half of a --conditional model
GIF_FRAMES = 24  # frames of reverse_process.gif (all steps when there are fewer)
MAX_TIMESTEPS, MAX_WIDTH = 10_000, 1024  # beyond these a laptop runs out of memory or patience
# The other counts' upper bounds, generous for real use: a training step at the default width holds about 12 MB
# per image (fp32; 6.6 MB in bf16), so a batch of 4,096 already needs an 80 GB GPU; 100,000 samples are hours of
# sampling on a CPU and a 10,000-pixel grid; warm-up steps and epochs cost no memory, only time.
MAX_BATCH_SIZE, MAX_SAMPLES, MAX_EPOCHS, MAX_WARMUP_STEPS, MAX_CLASS_ROWS = 4096, 100_000, 100_000, 1_000_000, 100


def channel_mult(text):
    """argparse type: three whole numbers from 1 to 16, '1,2,4'."""
    try:
        mult = tuple(int(part) for part in text.split(","))
    except ValueError:
        mult = ()
    if len(mult) != 3 or not all(1 <= m <= 16 for m in mult):
        raise argparse.ArgumentTypeError(f"expected three whole numbers from 1 to 16 like 1,2,4, got {text!r}")
    return mult


def class_list(text):
    """argparse type: classes to draw, '7', '0-9' or '3,5,8' (class indices 0-9, for any dataset; one grid row each,
    at most MAX_CLASS_ROWS rows)."""
    classes = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d)\s*(?:-\s*(\d)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise argparse.ArgumentTypeError(f"expected classes 0-9 like 7, 0-9 or 3,5,8, got {text!r:.80}")
        classes += range(int(match[1]), int(match[2] or match[1]) + 1)
        if len(classes) > MAX_CLASS_ROWS:
            raise argparse.ArgumentTypeError(f"expected at most {MAX_CLASS_ROWS} classes (one grid row each), got "
                                             f"{text!r:.80}")
    return classes


def duration(text):
    """argparse type: a wall-clock time such as 90s, 4m or 1.5h (a bare number is minutes), in seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    seconds = float(match[1]) * {"s": 1, "m": 60, "": 60, "h": 3600}[match[2]] if match else 0.0
    if not 1 <= seconds <= 7 * 24 * 3600:
        raise argparse.ArgumentTypeError(f"expected a time from 1s to 168h like 90s, 4m or 1.5h, got {text!r}")
    return seconds


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help names each flag's default, except where there is none (None): those flags' help says what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp)
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="torchvision dataset to learn")
    p.add_argument("--data-dir", type=utf8_path, default="./data",
                   help="dataset root; MNIST is downloaded here unless <data-dir>/MNIST/raw already holds it")
    p.add_argument("--epochs", type=number(int, 1, MAX_EPOCHS), default=20, help="passes over the training set")
    p.add_argument("--time-budget", type=duration, default=None,
                   help="train for about this long instead of --epochs (e.g. 4m): the first steps are timed, then "
                        "the epochs and the lr schedule are fitted to the budget (default: off)")
    p.add_argument("--batch-size", type=number(int, 1, MAX_BATCH_SIZE), default=128,
                   help=f"training images per step (at most {MAX_BATCH_SIZE:,}: about 50 GB at the default width)")
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=2e-3,
                   help="Adam learning rate, the peak of --lr-schedule cosine (the spec: 1e-3, constant)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                   help="cosine: linear warm-up over --warmup-steps, then cosine decay to lr/10; constant: the spec")
    p.add_argument("--warmup-steps", type=number(int, 0, MAX_WARMUP_STEPS), default=100,
                   help="steps of linear lr warm-up (0 = none)")
    p.add_argument("--timesteps", type=number(int, 2, MAX_TIMESTEPS), default=300, help="diffusion steps T")
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default="linear-scaled",
                   help="linear-scaled: Ho et al.'s linear betas with end points scaled by 1000/T so that x_T is pure "
                        "noise at any T; cosine: Nichol & Dhariwal; linear: 1e-4 -> 0.02 as written (the spec)")
    p.add_argument("--snr-gamma", type=number(float, 0), default=5.0,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023, arXiv:2303.09556); 0 = plain MSE (the spec)")
    p.add_argument("--base-channels", type=number(int, 8, MAX_WIDTH), default=64,
                   help="UNet width (channels at its full resolution: 32x32, or 16x16 on patches), a multiple of 8")
    p.add_argument("--channel-mult", type=channel_mult, default=(1, 2, 4),
                   help="widths at full, half and quarter resolution (32, 16, 8; on patches 16, 8, 4) as multiples "
                        "of --base-channels (doubling at each halving, "
                        "as in Ho et al.'s UNet: the cheap low resolutions get the width)")
    p.add_argument("--patch-size", type=int, choices=[1, 2], default=1,
                   help="2: the UNet works on 16x16 maps of 2x2 pixel patches (4 channels; pixel_unshuffle in, "
                        "pixel_shuffle out), about twice the images/s on a CPU; 1: on the 32x32 pixels (the spec)")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True,
                   help="self-attention at the bottleneck (8x8; 4x4 on patches)")
    p.add_argument("--ema-decay", type=number(float, 0, 1, high_open=True), default=0.999,
                   help="EMA of the weights used for sampling")
    p.add_argument("--guidance", type=number(float, 0, 100, low_open=True), default=2.0,
                   help="autoguidance weight w (Karras et al. 2024, arXiv:2406.02507): the predicted noise is pushed "
                        "away from that of the EMA as it was a quarter into training (kept in the checkpoint), "
                        "eps_guide + w * (eps - eps_guide); 1 = plain sampling (the spec); costs a second forward pass")
    p.add_argument("--conditional", action="store_true",
                   help="train one UNet that is both class-conditional and unconditional, for classifier-free "
                        "guidance (Ho & Salimans 2022, arXiv:2207.12598): a learned class embedding is added to the "
                        "timestep's")
    p.add_argument("--cond-drop", type=number(float, 0, 1, high_open=True), default=0.1,
                   help="--conditional: the share of training images whose label is replaced by 'no class'")
    p.add_argument("--digits", type=class_list, default=None,
                   help="conditional checkpoints: the classes to draw, one grid row each, e.g. 7, 0-9 or 3,5,8 "
                        "(default 0-9)")
    p.add_argument("--cfg", type=number(float, 0, 100), default=1.5,
                   help="conditional checkpoints: classifier-free guidance weight W, eps_uncond + W * (eps_cond - "
                        "eps_uncond); 1 = plain conditional sampling, 0 = unconditional; more W: surer, less varied")
    p.add_argument("--num-samples", type=number(int, 1, MAX_SAMPLES), default=64,
                   help="digits to generate (conditional: a multiple of the number of --digits; left unset, the "
                        "multiple at or below 64)")
    p.add_argument("--sampler", choices=SAMPLERS, default="dpm",
                   help="dpm: DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095) over --sample-steps; ddim: Song et "
                        "al. over --sample-steps; ddpm: Ho et al. Algorithm 2 over all T steps (the spec)")
    p.add_argument("--sample-steps", type=number(int, 1, MAX_TIMESTEPS), default=None,
                   help="steps of dpm (default 25) and ddim (default 100); ddpm always runs all T steps")
    p.add_argument("--eta", type=number(float, 0, 1), default=1.0,
                   help="dpm and ddim: 0 = the deterministic solver; 1 = fresh noise at every step, as much as DDPM "
                        "adds (dpm: its SDE form, diffusers' sde-dpmsolver++)")
    p.add_argument("--sample-batch-size", type=number(int, 1, MAX_BATCH_SIZE), default=64,
                   help="digits denoised per forward pass; more samples run in chunks (same images, less memory)")
    p.add_argument("--out-dir", type=utf8_path, default="chaos_sculptures",
                   help="where the grid, trajectory and checkpoint go")
    p.add_argument("--checkpoint", type=utf8_path, default=None,
                   help="checkpoint path (default: <out-dir>/checkpoint.pt); a new training run will not write over "
                        "an existing one (--resume continues it)")
    p.add_argument("--sample-only", action="store_true", help="skip training; sample from --checkpoint")
    p.add_argument("--resume", action="store_true", help="continue training from --checkpoint up to --epochs")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet for training")
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                   help="auto: CUDA, then Apple MPS, then CPU")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0,
                   help="0 to 2^32-1; seeds everything: same seed + device, same digits")
    args = p.parse_args(argv)
    for action in p._actions:  # parsed once more without defaults: the flags typed, even those typed as the default
        action.default = argparse.SUPPRESS
    args.set_by_user = set(vars(p.parse_args(argv)))
    args.checkpoint = Path(args.checkpoint or Path(args.out_dir) / "checkpoint.pt")
    args.sample_steps = args.sample_steps or DEFAULT_SAMPLE_STEPS.get(args.sampler, 0)
    return args


def check_args(args):
    """Everything that can be refused before data or models are loaded; nothing is created."""
    if args.sample_only and args.resume:
        fail("--sample-only and --resume exclude each other; pass one of them")
    if args.base_channels % 8:
        fail(f"--base-channels must be a multiple of 8 (GroupNorm uses 8 groups), got {args.base_channels}")
    if args.base_channels * max(args.channel_mult) > MAX_WIDTH:
        fail(f"--base-channels {args.base_channels} x --channel-mult {max(args.channel_mult)} is wider than "
             f"{MAX_WIDTH} channels; pass smaller widths")
    if args.sample_only and {"epochs", "time_budget"} & args.set_by_user:
        fail("--sample-only trains nothing, so --epochs/--time-budget have no effect; drop them or --sample-only")
    check_output_dir(args.out_dir, "--out-dir")
    if len(os.fsencode(args.checkpoint.name)) > 200:
        fail(f"--checkpoint's file name {args.checkpoint.name[:40]}... is longer than 200 bytes; pass a shorter one")
    if not args.sample_only:
        check_output_dir(args.checkpoint.parent, "--checkpoint's folder")
        if args.checkpoint.is_dir():
            fail(f"--checkpoint {args.checkpoint} is a folder; pass a file path "
                 f"(e.g. {args.checkpoint / 'checkpoint.pt'})")
        if not args.resume and os.path.lexists(args.checkpoint):  # a forgotten --resume must not wipe out days of work
            fail(f"{args.checkpoint} already holds a checkpoint (an earlier run's training), which a new run would "
                 "write over; pass --resume to continue it, or another --out-dir or --checkpoint (or delete it to "
                 "start over)")
    return args


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX (x86 Linux), and torch allowed to use AVX512 (ATEN_CPU_CAPABILITY can cap it): there bf16
    convolutions run about 1.5x as fast as fp32; elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and "AVX512" in torch.backends.cpu.get_cpu_capability()


def speed_path(precision, device):
    """(autocast dtype or None, why): decided once, for training and sampling; printed at start."""
    if precision == "fp32" or (precision == "auto" and device.type == "mps"):
        dtype, why = None, "fp32 as asked" if precision == "fp32" else "fp32 (MPS)"
    elif device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype, why = torch.bfloat16, "bf16 autocast (this GPU has bf16)"
    elif device.type == "cpu" and precision == "bf16":
        dtype, why = torch.bfloat16, "bf16 autocast as asked"
    elif device.type == "cpu" and cpu_has_native_bf16():
        dtype, why = torch.bfloat16, "bf16 autocast (this CPU has native bf16: AVX512-BF16/AMX)"
    elif precision == "bf16":
        fail(f"--precision bf16 is not supported on {device}; use --precision fp32 or auto")
    else:
        dtype, why = None, "fp32 (no native bf16 here: emulated bf16 would be slower)"
    return dtype, why


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

    def __init__(self, timesteps, device, beta_schedule="linear-scaled"):
        self.timesteps = timesteps
        betas = make_betas(beta_schedule, timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.betas = betas.float().to(device)
        self.alphas = (1 - betas).float().to(device)
        self.alphas_cumprod = alphas_cumprod.float().to(device)
        # Min-SNR weights for an epsilon-predicting model: min(SNR_t, gamma) / SNR_t, SNR_t = ab / (1 - ab)
        self.snr = (alphas_cumprod / (1 - alphas_cumprod)).float().to(device)
        # DPM-Solver's time variable: half the log-SNR, lambda_t = log(alpha_t / sigma_t), in float64
        self.log_snr_half = (0.5 * (alphas_cumprod.log() - (1 - alphas_cumprod).log())).to(device)

    def get_noisy_image(self, x0, t, noise):
        """q(x_t | x_0): sqrt(ab_t) * x0 + sqrt(1 - ab_t) * noise, with ab_t = alphas_cumprod[t]."""
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def predicted_x0(self, x, predicted_noise, t):
        """The clean image the noise prediction implies at step t, clamped to the data range [-1, 1]."""
        ab = self.alphas_cumprod[t]
        return ((x - (1 - ab).sqrt() * predicted_noise) / ab.sqrt()).clamp(-1, 1)

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
        x0 = self.predicted_x0(x, predicted_noise, t)
        noise = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()  # 0 at the last step: x0 itself
        x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * noise
        return x_prev + sigma * fresh_noise if eta > 0 else x_prev

    def dpm_solver_step(self, x, x0, t, t_next, x0_before=None, t_before=None, eta=0.0, fresh_noise=None):
        """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), as diffusers' DPMSolverMultistepScheduler (midpoint
        form): from t to t_next in lambda = log(alpha / sigma), with the x0 predicted at t and, from the second step
        on, the one predicted a step before (at t_before) for a second-order correction, D = x0 + (x0 - x0_before) /
        (2 r), r = h_before / h. eta 0 is the ODE solver (diffusers' "dpmsolver++"); eta 1 its SDE form
        ("sde-dpmsolver++": fresh noise with the posterior's variance), in between k-diffusion's dpmpp_2m_sde eta.
        t_next = -1 is the clean image (sigma 0): that last step is first-order and returns x0 (diffusers'
        final_sigmas_type "zero")."""
        if t_next < 0:
            return x0
        ab, ab_next = self.alphas_cumprod[t], self.alphas_cumprod[t_next]
        h = (self.log_snr_half[t_next] - self.log_snr_half[t]).float()
        direction = x0
        if x0_before is not None:
            r = (self.log_snr_half[t] - self.log_snr_half[t_before]).float() / h
            direction = x0 + (x0 - x0_before) / (2 * r)
        x_next = ((1 - ab_next) / (1 - ab)).sqrt() * torch.exp(-eta * h) * x \
            - ab_next.sqrt() * torch.expm1(-(1 + eta) * h) * direction
        if eta > 0:
            x_next = x_next + (1 - ab_next).sqrt() * (-torch.expm1(-2 * eta * h)).sqrt() * fresh_noise
        return x_next


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
    """32x32 -> 16x16 -> 8x8 and back, skip connections between the paths, timestep in every block. With
    patch_size 2 each 2x2 block of pixels becomes 4 channels of one position first (pixel_unshuffle), so the same
    UNet runs at 16x16 -> 8x8 -> 4x4, and its output is unfolded back to 32x32 pixels (pixel_shuffle)."""

    def __init__(self, image_channels=1, base_channels=64, attention=True, channel_mult=(1, 2, 4), num_classes=0,
                 patch_size=1):
        super().__init__()
        self.patch_size = patch_size
        image_channels *= patch_size ** 2  # what the stem sees and the head predicts
        c1, c2, c3 = (m * base_channels for m in channel_mult)  # widths at full, half, quarter resolution
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
        # classifier-free guidance: one learned vector per class and one for "no class" (NO_CLASS), added to the
        # timestep embedding, so every block is told which digit to carve
        self.class_emb = nn.Embedding(num_classes + 1, self.emb_dim) if num_classes else None

    def forward(self, x, t, labels=None):
        emb = self.time_mlp(timestep_embedding(t, self.time_mlp[0].in_features))
        if self.class_emb is not None:
            emb = emb + self.class_emb(labels)
        s1 = self.down1(self.stem(F.pixel_unshuffle(x, self.patch_size)), emb)
        s2 = self.down2(self.pool1(s1), emb)
        s3 = self.down3(self.pool2(s2), emb)
        h = self.mid2(self.attn(self.mid1(s3, emb)), emb)
        h = self.up3(torch.cat([h, s3], dim=1), emb)
        h = self.up2(torch.cat([self.unpool2(h), s2], dim=1), emb)
        h = self.up1(torch.cat([self.unpool1(h), s1], dim=1), emb)
        return F.pixel_shuffle(self.head(h), self.patch_size)


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
    """The whole training split as one preprocessed tensor on the device, and its labels: batches are index draws,
    no DataLoader."""
    images, labels = load_mnist(name, data_dir, train=True)
    return preprocess(images).to(device), labels.to(device)


# ---------------------------------------------------------------- training
def train_step(model, optimizer, schedule, x0, dtype, snr_gamma, labels=None, cond_drop=0.0):
    """One DDPM step (Ho et al. Algorithm 1): noise x0 at a random t per image, learn to predict the noise. With
    labels (a conditional model) each is replaced by NO_CLASS with probability cond_drop, so the one network
    also learns the unconditional prediction that classifier-free guidance extrapolates from."""
    t = torch.randint(0, schedule.timesteps, (len(x0),), device=x0.device)
    noise = torch.randn_like(x0)
    condition = ()
    if labels is not None:
        dropped = torch.rand(len(labels), device=labels.device) < cond_drop
        condition = (torch.where(dropped, torch.full_like(labels, NO_CLASS), labels),)
    with torch.autocast(x0.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        predicted_noise = model(schedule.get_noisy_image(x0, t, noise), t, *condition)
    per_image = F.mse_loss(predicted_noise.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:  # Min-SNR-gamma: nearly clean images (high SNR) stop dominating the gradient
        snr = schedule.snr[t]
        per_image = per_image * snr.clamp(max=snr_gamma) / snr
    loss = per_image.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def lr_at(step, total_steps, args):
    """The learning rate at `step`: --lr-schedule cosine warms up, then decays to lr/10; constant is the spec's."""
    if args.lr_schedule == "constant":
        return args.lr
    return args.lr * warmup_cosine(step, total_steps, args.warmup_steps, final=0.1)


def divergence_advice(args, saved_epoch):
    """What to do after a divergence: a lower --lr; with --resume when a checkpoint of an earlier epoch is on disk,
    since a new training run refuses to write over it."""
    lower = f"lower --lr (now {args.lr:g}; try {args.lr / 10:g})"
    if saved_epoch is None:
        return lower
    return (f"{lower} and continue with --resume ({args.checkpoint} holds epoch {saved_epoch}), or delete "
            f"{args.checkpoint} to start over")


def train_epoch(step_model, optimizer, ema, schedule, images, labels, args, dtype, epoch, total_steps, bar_label):
    """One pass over the images in random order; returns the epoch's mean loss (a tensor, summed on the device)."""
    batches = math.ceil(len(images) / args.batch_size)
    order = torch.randperm(len(images), device=images.device)
    total = torch.zeros((), device=images.device)  # summed on the device: no GPU sync per step
    with tqdm(range(batches), desc=bar_label, leave=False, disable=None) as bar:  # a bar only on a terminal
        for i in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * batches + i, total_steps, args)
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            total += train_step(step_model, optimizer, schedule, images[batch], dtype, args.snr_gamma,
                                labels[batch] if labels is not None else None, args.cond_drop)
            ema.update(step_model)
            if i % 10 == 0 or i == batches - 1:
                running = total.item() / (i + 1)
                if not math.isfinite(running):
                    saved_epoch = epoch if epoch or args.resume else None  # each finished epoch was saved
                    fail(f"training diverged in epoch {epoch + 1} (loss {running}); nothing was saved over earlier "
                         f"outputs; {divergence_advice(args, saved_epoch)}")
                bar.set_postfix(loss=f"{running:.4f}")
    return total.item() / batches


def fit_epochs_to_budget(model, schedule, images, labels, args, dtype, seconds):
    """How many epochs fit in `seconds`: times 12 training steps (after 3 warm-up steps) on a throwaway copy of the
    model and optimizer, so the real run's weights and lr schedule are untouched. Returns (epochs, images/s)."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(probe.parameters(), lr=args.lr * 1e-3)  # a tiny lr: a probe, not training
    batch = images[:args.batch_size]
    for step in range(15):
        if step == 3:
            if images.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = train_step(probe, optimizer, schedule, batch, dtype, args.snr_gamma,
                          labels[:args.batch_size] if labels is not None else None, args.cond_drop)
    loss.item()  # waits for the device
    images_per_s = 12 * len(batch) / (time.perf_counter() - start)
    # the EMA update and the epoch's bookkeeping cost a few percent more than the bare steps
    return max(1, int(0.95 * seconds * images_per_s / len(images))), images_per_s


def guide_epoch(epochs):
    """The epoch whose EMA guides sampling: a quarter into training (epoch 8 of 30)."""
    return math.ceil(epochs / 4)


def weights_are_usable(models, probe):
    """Whether every weight is finite and each model's prediction on a fixed noisy batch is: a step to weights
    like 1e37 keeps them finite, yet every prediction from them is inf or NaN."""
    with torch.no_grad():
        return all(all_finite(model.state_dict().values())
                   and bool(torch.isfinite(model(*probe).float()).all()) for model in models)


# ---------------------------------------------------------------- sampling: from chaos to the statue
def sample_steps(sampler, schedule, steps):
    """The timesteps a sampler visits, noisiest first."""
    timesteps = schedule.timesteps
    if sampler == "ddpm":
        return list(range(timesteps - 1, -1, -1))
    if sampler == "ddim":  # evenly spaced in t, down to t = 0
        return torch.linspace(timesteps - 1, 0, min(steps, timesteps)).round().long().tolist()
    # DPM-Solver: evenly spaced in lambda = log(alpha / sigma) down to t = 0 (DPM-Solver's "logSNR" steps for small
    # pixel images; diffusers' use_lu_lambdas), at the nearest whole t, each once. On Gaussian data of std 0.3
    # (T=300, 20 steps) they land at std 0.30; steps even in t overshoot to 0.36 (big last steps in lambda), and
    # diffusers' default spacing, which stops at t = T/N, blurs to 0.26 (its last x0 is a posterior mean)
    lam = schedule.log_snr_half.cpu()
    targets = torch.linspace(lam[-1].item(), lam[0].item(), min(steps, timesteps), dtype=torch.float64)
    return sorted(set((lam[None] - targets[:, None]).abs().argmin(1).tolist()), reverse=True)


@torch.no_grad()
def sample(model, schedule, num_samples, sampler, sample_steps_wanted, device, batch_size=64, dtype=None, seed=0,
           guide=None, guidance=1.0, eta=0.0, labels=None, cfg=1.0, shown=range(8)):
    """Reverse process from pure noise: the final images in [-1, 1], snapshots along the way, steps run.

    With a `guide` (the same UNet, less trained) and guidance w != 1, the noise prediction is pushed away from the
    guide's: eps_guide + w * (eps - eps_guide). The weaker model makes the same kinds of mistakes, only more, so
    the difference points away from them (Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself"); it costs a second forward pass per step. A conditional guide is given the same labels.

    With `labels` (a conditional model, one class per sample) and cfg W != 1, classifier-free guidance (Ho &
    Salimans 2022): eps_uncond + W * (eps_cond - eps_uncond), the unconditional prediction being the same network's
    with NO_CLASS; W = 1 is plain conditional sampling, W = 0 unconditional. Also a second forward pass per step.

    Returns the images, the frames (the first 64 samples at up to GIF_FRAMES points, pure noise first) and, for
    trajectory.png, the `shown` samples at TRAJECTORY_POINTS of those points.

    Every random draw covers all samples at once and the model sees them `batch_size` at a time, so the
    images do not depend on the chunking, and large --num-samples do not slow down per image (one forward
    pass over hundreds of images spends more time in the allocator than in the convolutions on a CPU)."""
    model.eval()
    if guide is not None:
        guide.eval()
    steps = sample_steps(sampler, schedule, sample_steps_wanted)
    kept_steps = torch.linspace(0, len(steps) - 1, min(GIF_FRAMES - 1, len(steps))).round().long().unique().tolist()
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.randn(num_samples, 1, IMAGE_SIZE, IMAGE_SIZE, device=device, generator=generator)
    frames = [x[:64].clamp(-1, 1)]
    x0_before = torch.empty_like(x) if sampler == "dpm" else None  # DPM-Solver's previous x0 prediction
    stochastic = sampler == "ddpm" or eta > 0  # fresh noise at every step
    with tqdm(steps, desc=f"sampling ({sampler}, {len(steps)} steps)", leave=False, disable=None) as bar:
        for i, t in enumerate(bar):
            noise = torch.randn(x.shape, device=device, generator=generator) if stochastic else None
            t_next = steps[i + 1] if i + 1 < len(steps) else -1
            for chunk in range(0, num_samples, batch_size):
                part = slice(chunk, chunk + batch_size)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    t_part = torch.full((len(x[part]),), t, device=device)
                    condition = (labels[part],) if labels is not None else ()
                    predicted_noise = model(x[part], t_part, *condition).float()
                    if labels is not None and cfg != 1:
                        unconditional = model(x[part], t_part, torch.full_like(labels[part], NO_CLASS)).float()
                        predicted_noise = unconditional + cfg * (predicted_noise - unconditional)
                    if guide is not None and guidance != 1:
                        guide_noise = guide(x[part], t_part, *condition).float()
                        predicted_noise = guide_noise + guidance * (predicted_noise - guide_noise)
                if sampler == "ddpm":
                    x[part] = schedule.ddpm_step(x[part], predicted_noise, t, noise[part])
                elif sampler == "ddim":
                    x[part] = schedule.ddim_step(x[part], predicted_noise, t, t_next, eta,
                                                 noise[part] if eta > 0 else None)
                else:
                    x0 = schedule.predicted_x0(x[part], predicted_noise, t)
                    x[part] = schedule.dpm_solver_step(x[part], x0, t, t_next, x0_before[part] if i else None,
                                                       steps[i - 1] if i else None, eta,
                                                       noise[part] if eta > 0 else None)
                    x0_before[part] = x0
            if i in kept_steps:
                frames.append(x[:64].clamp(-1, 1))
    columns = torch.linspace(0, len(frames) - 1, TRAJECTORY_POINTS).round().long().tolist()
    trajectory = torch.stack([frames[c][[i for i in shown if i < len(frames[c])]] for c in columns], dim=1)
    return x.clamp(-1, 1), frames, trajectory, len(steps)


# ---------------------------------------------------------------- artifacts
def png_bytes(images, nrow):
    """Map [-1, 1] to [0, 1] and encode a grid as PNG bytes."""
    buffer = io.BytesIO()
    save_image((images.float() + 1) / 2, buffer, nrow=nrow, format="png")
    return buffer.getvalue()


def gif_bytes(frames, nrow, seconds_per_frame=0.12):
    """The reverse process as an animated GIF: one grid per frame, from pure noise to the finished digits (held
    for a second at the end). PIL writes it; the bytes go to disk through write_atomically like every file."""
    grids = [Image.open(io.BytesIO(png_bytes(frame, nrow))).convert("L") for frame in frames]
    buffer = io.BytesIO()
    durations = [int(1000 * seconds_per_frame)] * (len(grids) - 1) + [1000]
    grids[0].save(buffer, format="gif", save_all=True, append_images=grids[1:], duration=durations, loop=0)
    return buffer.getvalue()


CONFIG_CHECKS = {  # what a checkpoint's config must hold: key -> (accepted, what to say)
    "dataset": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "timesteps": (lambda v: type(v) is int and 2 <= v <= MAX_TIMESTEPS, f"a whole number from 2 to {MAX_TIMESTEPS}"),
    "beta_schedule": (lambda v: v in BETA_SCHEDULES, f"one of {', '.join(BETA_SCHEDULES)}"),
    "base_channels": (lambda v: type(v) is int and 8 <= v <= MAX_WIDTH and v % 8 == 0,
                      f"a multiple of 8 from 8 to {MAX_WIDTH}"),
    "channel_mult": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3
                     and all(type(m) is int and 1 <= m <= 16 for m in v), "three whole numbers from 1 to 16"),
    "attention": (lambda v: type(v) is bool, "true or false"),
    "patch_size": (lambda v: type(v) is int and v in (1, 2), "1 or 2"),
    "conditional": (lambda v: type(v) is bool, "true or false"),
}


def load_checkpoint(path, device):
    """A checkpoint this script wrote, checked for content before anything is trusted; a fault ends in one line."""
    retrain = "retrain or pass another --checkpoint"
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as err:  # a name too long, a loop of links
        fail(f"could not read --checkpoint {str(path)[:80]} ({err.strerror or err}); pass another --checkpoint")
    if is_dir:
        fail(f"--checkpoint {path} is a folder; pass the checkpoint file (e.g. {path / 'checkpoint.pt'})")
    if not is_file:  # missing, or a FIFO or device, which torch.load would wait on
        fail(f"no checkpoint file at {path}; train first (without --sample-only/--resume) or pass --checkpoint PATH")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated, unreadable or foreign file: say so instead of a pickle traceback
        fail(f"{path} is not a readable quest_12_2 checkpoint ({type(err).__name__}); {retrain}")
    if not isinstance(checkpoint, dict) or not {"model", "ema", "optimizer", "epoch", "config"} <= set(checkpoint):
        fail(f"{path} is a torch file but not a quest_12_2 checkpoint; {retrain}")
    config = checkpoint["config"]
    if not isinstance(config, dict):
        fail(f"{path} holds no config (a {type(config).__name__}); {retrain}")
    config.setdefault("conditional", False)  # checkpoints of the first release had no classes
    config.setdefault("patch_size", 1)  # nor patches
    for key, (accepted, what) in CONFIG_CHECKS.items():
        if key not in config:
            fail(f"{path}'s config has no {key!r}; {retrain}")
        if not accepted(config[key]):
            fail(f"{path}'s config has {key} = {config[key]!r:.40}, expected {what}; {retrain}")
    for key in ("epoch", "ema_updates", *(("guide_epoch",) if "guide" in checkpoint else ())):
        if type(checkpoint.get(key)) is not int or checkpoint[key] < 0:
            fail(f"{path} has {key} = {checkpoint.get(key)!r:.40}, expected a whole number >= 0; {retrain}")
    for key in ("epoch", *(("guide_epoch",) if "guide" in checkpoint else ())):
        if checkpoint[key] > MAX_EPOCHS:
            fail(f"{path} has {key} = {checkpoint[key]!r:.40}, more than the {MAX_EPOCHS:,} epochs a run may train; "
                 f"{retrain}")
    return checkpoint


def adam_state_fits(optimizer):
    """Whether Adam's state read back from a checkpoint holds, for each weight, a step count and moments of that
    weight's shape: load_state_dict takes anything, and a state that does not fit would crash the first step."""
    return all(not state or (isinstance(state.get("step"), torch.Tensor) and state["step"].numel() == 1
                             and all(isinstance(state.get(key), torch.Tensor) and state[key].shape == weight.shape
                                     for key in ("exp_avg", "exp_avg_sq")))
               for weight, state in optimizer.state.items())


def checkpoint_bytes(model, ema, guide, guide_taken, optimizer, epoch, config):
    """Everything --resume and --sample-only need, the config that built the model included (nanoGPT's way)."""
    return torch_bytes({
        "model": model.state_dict(), "ema": ema.model.state_dict(), "ema_updates": ema.updates,
        **({"guide": guide.state_dict(), "guide_epoch": guide_taken} if guide_taken is not None else {}),
        "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config})



def main(argv=None):
    args = check_args(parse_args(argv))
    device = pick_device(args.device)
    dtype, path_why = speed_path(args.precision, device)  # decided once, for training and sampling
    torch.manual_seed(args.seed)

    # ---- the model: from the checkpoint when there is one (its config built its weights), else from the flags
    checkpoint = load_checkpoint(args.checkpoint, device) if (args.sample_only or args.resume) else None
    config = checkpoint["config"] if checkpoint else {
        "dataset": args.dataset, "timesteps": args.timesteps, "beta_schedule": args.beta_schedule,
        "base_channels": args.base_channels, "channel_mult": list(args.channel_mult), "attention": args.attention,
        "patch_size": args.patch_size, "conditional": args.conditional}
    if checkpoint:  # the architecture must match the weights; the learning rate and the rest are applied
        if args.conditional and not config["conditional"]:  # the same command with --resume is fine otherwise
            fail(f"{args.checkpoint} holds an unconditional model, so it cannot draw the digits asked for; drop "
                 "--conditional (or train a conditional model into another --out-dir)")

        def as_flag(value):  # 1,2,4 for the widths, as typed
            return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        kept = [f"--{key.replace('_', '-')} {as_flag(config[key])}" for key in config if key != "conditional"
                and key in args.set_by_user and as_flag(getattr(args, key)) != as_flag(config[key])]
        if kept:
            print(f"note: {'--resume keeps' if args.resume else '--sample-only uses'} the checkpoint's "
                  f"{', '.join(kept)} (its weights were trained with them)", flush=True)
    # flags for one kind of model only: refused for the other rather than ignored
    model_kind = args.checkpoint if checkpoint else "this run"
    for_conditional = [f"--{key.replace('_', '-')}" for key in ("digits", "cfg", "cond_drop")
                       if key in args.set_by_user]
    if for_conditional and not config["conditional"]:
        fail(f"{', '.join(for_conditional)} {'needs' if len(for_conditional) == 1 else 'need'} a conditional model, "
             f"and {model_kind} is not one; train with --conditional, or drop {', '.join(for_conditional)}")
    if config["conditional"] and "guidance" in args.set_by_user:
        fail(f"--guidance (autoguidance) is for unconditional models, and {model_kind} is conditional (guided by "
             "--cfg); drop --guidance")
    schedule = NoiseSchedule(config["timesteps"], device, config["beta_schedule"])
    model = SimpleUNet(base_channels=config["base_channels"], attention=config["attention"],
                       channel_mult=tuple(config["channel_mult"]), num_classes=10 if config["conditional"] else 0,
                       patch_size=config["patch_size"]).to(device)
    # what to draw: one grid row per requested class (conditional), or --num-samples digits in a square grid
    class_names = CLASS_NAMES[config["dataset"]]
    digits = args.digits or list(range(10))
    whole_rows = len(digits) * max(1, args.num_samples // len(digits))  # conditional: the default 64 -> 60 for 0-9
    if config["conditional"] and "num_samples" not in args.set_by_user:
        args.num_samples = whole_rows
    if config["conditional"] and args.num_samples != whole_rows:
        fail(f"--num-samples {args.num_samples} is not a multiple of the {len(digits)} classes asked for (one grid "
             f"row each); pass e.g. --num-samples {whole_rows}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = EMA(model, args.ema_decay)
    # autoguidance's weaker model: the EMA as it was a quarter into training, taken once; guide_taken is its epoch
    guide, guide_taken = copy.deepcopy(ema.model), None
    first_epoch = 0
    if checkpoint:
        def reason(err):  # torch's load_state_dict errors put a header line before the cause
            return " ".join(str(err).split())[:200]
        try:
            model.load_state_dict(checkpoint["model"])
            ema.model.load_state_dict(checkpoint["ema"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            fail(f"{args.checkpoint} does not match the SimpleUNet of its own config ({reason(err)}); "
                 "retrain or pass another --checkpoint")
        if not all_finite([*model.state_dict().values(), *ema.model.state_dict().values()]):
            fail(f"{args.checkpoint} holds weights that are not finite (NaN or inf: a run that diverged); retrain or "
                 "pass another --checkpoint")
        if args.resume and not adam_state_fits(optimizer):
            fail(f"{args.checkpoint}'s optimizer state does not fit its SimpleUNet (moments of other shapes or no "
                 "step count); retrain or pass another --checkpoint")
        if "guide" in checkpoint and not (args.sample_only and args.guidance == 1):  # needed to sample or to keep
            try:
                guide.load_state_dict(checkpoint["guide"])
            except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
                fail(f"the guide weights in {args.checkpoint} do not fit its SimpleUNet ({reason(err)}); "
                     + ("sample with --guidance 1" if args.sample_only else "retrain without --resume"))
            guide_taken = checkpoint["guide_epoch"]
        ema.updates, first_epoch = checkpoint["ema_updates"], checkpoint["epoch"]
    on_patches = " on 2x2 patches" if config["patch_size"] == 2 else ""
    print(f"device {device} ({path_why}), SimpleUNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters{on_patches}, T={schedule.timesteps} ({config['beta_schedule']} betas, "
          f"alpha_bar_T={schedule.alphas_cumprod[-1].item():.2g})", flush=True)

    # ---- training: one epoch at a time; then the guide when it is due, the weights checked, the checkpoint
    epoch_losses, images_per_s, train_seconds = [], None, None
    epochs = first_epoch if args.sample_only else max(args.epochs, first_epoch)
    if not args.sample_only:
        images, labels = load_training_images(config["dataset"], args.data_dir, device)
        labels = labels if config["conditional"] else None
        if args.time_budget:
            fitted, rate = fit_epochs_to_budget(model, schedule, images, labels, args, dtype, args.time_budget)
            epochs = first_epoch + fitted
            print(f"time budget {args.time_budget / 60:.3g} min: {fitted} epochs of {len(images)} images fit "
                  f"(the first steps ran at {rate:.0f} img/s)", flush=True)
        print(f"{len(images)} training images of {config['dataset']} on {device}; a checkpoint is saved to "
              f"{args.checkpoint} after every epoch", flush=True)
        if first_epoch >= epochs:
            print(f"note: {args.checkpoint} is already at epoch {first_epoch} of --epochs {args.epochs}; nothing to "
                  f"train (raise --epochs to continue), sampling from it", flush=True)
        step_model = torch.compile(model) if args.compile else model
        batches = math.ceil(len(images) / args.batch_size)
        probe = (images[:16], torch.full((len(images[:16]),), schedule.timesteps // 2, device=device),
                 *((labels[:16],) if labels is not None else ()))
        saved_epoch = first_epoch if args.resume else None
        model.train()
        start, epoch = time.perf_counter(), first_epoch
        try:
            while epoch < epochs:
                epoch_losses.append(train_epoch(step_model, optimizer, ema, schedule, images, labels, args, dtype,
                                                epoch, epochs * batches, f"epoch {epoch + 1}/{epochs}"))
                epoch += 1
                if guide_taken is None and epoch >= guide_epoch(epochs):
                    guide.load_state_dict(ema.model.state_dict())
                    guide_taken = epoch
                if not weights_are_usable([model, ema.model, guide], probe):
                    fail(f"training diverged in epoch {epoch} (the weights hold inf/NaN or predict them); nothing "
                         f"was saved over earlier outputs; {divergence_advice(args, saved_epoch)}")
                args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(args.checkpoint,
                                 checkpoint_bytes(model, ema, guide, guide_taken, optimizer, epoch, config))
                saved_epoch = epoch
                print(f"epoch {epoch}/{epochs}  loss {epoch_losses[-1]:.4f}  checkpoint saved", flush=True)
                if args.time_budget:  # re-fitted to the real pace, EMA and checkpoints included (and a busy machine)
                    elapsed = time.perf_counter() - start
                    epochs = epoch + int((args.time_budget - elapsed) / (elapsed / (epoch - first_epoch)))
        except KeyboardInterrupt as stop:
            exit_interrupted(stop, f"{args.checkpoint} holds epoch {saved_epoch}; to continue, run the same command "
                                   "with --resume" if saved_epoch else "no epoch had finished, so no checkpoint "
                                   "was written")
        train_seconds = time.perf_counter() - start
        epochs = epoch  # what the checkpoint holds
        images_per_s = (epoch - first_epoch) * len(images) / train_seconds if epoch > first_epoch else None

    # ---- sampling: autoguidance for an unconditional model, classifier-free guidance for a conditional one
    if config["conditional"]:
        guide = None  # CFG alone: autoguidance on top of it measured no better (docs/quest_12_2.md)
    elif guide_taken is None:
        guide = None
        if args.guidance != 1:
            print(f"note: {args.checkpoint} holds no guide weights (its run stopped before a quarter of its "
                  "epochs); sampling without guidance", flush=True)
    per_class = args.num_samples // len(digits)
    labels = (torch.tensor(digits, device=device).repeat_interleave(per_class) if config["conditional"] else None)
    if config["conditional"]:
        print(f"drawing {per_class} of each of: {', '.join(class_names[d] for d in digits)} (one grid row each), "
              f"classifier-free guidance W={args.cfg:g}", flush=True)
    start = time.perf_counter()
    samples, frames, trajectory, steps_run = sample(
        ema.model, schedule, args.num_samples, args.sampler, args.sample_steps, device,
        batch_size=args.sample_batch_size, dtype=dtype, seed=args.seed, guide=guide, guidance=args.guidance,
        eta=args.eta, labels=labels, cfg=args.cfg,
        shown=[row * per_class for row in range(min(8, len(digits)))] if config["conditional"] else range(8))
    sample_seconds = time.perf_counter() - start
    if not torch.isfinite(samples).all():  # never save a black grid and call it a success
        fail(f"the sampled digits are not finite (NaN or inf): the weights in {args.checkpoint}"
             + (" or its guide weights are broken; try --guidance 1, or retrain" if guide is not None
                else " are broken; retrain"))

    # ---- artifacts
    out_dir = Path(args.out_dir)
    grid_path, trajectory_path = out_dir / "new_creation.png", out_dir / "trajectory.png"
    gif_path = out_dir / "reverse_process.gif"
    nrow = per_class if config["conditional"] else math.ceil(math.sqrt(args.num_samples))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(grid_path, png_bytes(samples, nrow=nrow))
    # rows: the first samples (conditional: the first of each class); columns: pure noise -> finished digit
    write_atomically(trajectory_path, png_bytes(trajectory.flatten(0, 1), nrow=trajectory.shape[1]))
    write_atomically(gif_path, gif_bytes(frames, nrow=min(nrow, 64)))
    print(f"saved {args.num_samples} samples to {grid_path}, the trajectory to {trajectory_path}, its animation to "
          f"{gif_path}" + ("" if args.sample_only else f", the checkpoint to {args.checkpoint}"), flush=True)
    result = {
        "destination": str(out_dir), "path": str(grid_path), "fileName": grid_path.name, "success": True,
        "details": {
            "dataset": config["dataset"], "device": str(device), "precision": "bf16" if dtype else "fp32",
            "epochs": epochs, "timesteps": schedule.timesteps, "betaSchedule": config["beta_schedule"],
            "finalLoss": round(epoch_losses[-1], 5) if epoch_losses else None,
            "epochLosses": [round(v, 5) for v in epoch_losses],
            "trainImagesPerSecond": round(images_per_s, 1) if images_per_s else None,
            "trainSeconds": round(train_seconds, 1) if train_seconds is not None else None,
            "sampler": args.sampler, "sampleSteps": steps_run, "eta": args.eta if args.sampler != "ddpm" else None,
            "guidance": args.guidance if guide is not None else 1.0,
            "patchSize": config["patch_size"],
            "conditional": config["conditional"], "classes": digits if config["conditional"] else None,
            "classNames": [class_names[d] for d in digits] if config["conditional"] else None,
            "cfg": args.cfg if config["conditional"] else None,
            "numSamples": args.num_samples, "sampleSeconds": round(sample_seconds, 2),
            "trajectory": str(trajectory_path), "animation": str(gif_path), "checkpoint": str(args.checkpoint),
            "seed": args.seed,
        },
    }
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


def warmup_cosine(step, total_steps, warmup_steps, final=0.1):
    """The lr multiplier at `step`: a linear warm-up over warmup_steps, then a cosine decay that reaches `final`
    (a share of the peak) at total_steps, nanoGPT's shape."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:
        exit_interrupted(stop, "no image was written; a checkpoint this run finished is complete, and "
                               "--sample-only samples from it")
    except BrokenPipeError:  # stdout closed early by the program reading it
        exit_closed_pipe()
