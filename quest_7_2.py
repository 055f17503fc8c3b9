"""Quest 7.2 - the artist's seal: teach a Stable Diffusion v1.x UNet a palette with LoRA.

Point the script at a folder of images and a Stable Diffusion v1.x model (a hub id or a local
folder). It freezes the whole model, adds small LoRA matrices (r=16, alpha=32) to the UNet's
attention projections and trains only those on the images, all captioned with one fixed prompt.
The result is a few megabytes, written twice: pytorch_lora_weights.safetensors for diffusers'
`load_lora_weights(outputDir)`, and the same LoRA in the kohya layout
(lora_kohya_for_a1111_forge_comfyui.safetensors) for AUTOMATIC1111, Forge and ComfyUI.

The spec's settings come as a JSON object (--config, inline or a file) or as kebab-case flags;
flags win. Memory is the point of the quest, so what is fixed is computed once and freed: the
prompt's text embedding, and the VAE latents of every image (both flips), so a training step
runs the UNet alone. Under fp16/bf16 mixed precision the frozen UNet is kept in that dtype and
only the LoRA weights in fp32.

    python quest_7_2.py --dataset-dir my_palette --output-dir artist_seal
    torchrun --nproc_per_node 2 quest_7_2.py --config settings.json      # several GPUs, same script
"""
import argparse
import csv
import errno
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

# torchao (when installed) registers enums that torch 2.14 warns about at import time, and diffusers logs a warning
# when it cannot import torchao's tensors: neither concerns this script, and both would bury a one-line error.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
import diffusers  # noqa: E402
import transformers  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()

import safetensors.torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.training_utils import cast_training_params, compute_snr  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402
from torchvision import transforms  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

# The spec's JSON keys, in the order it lists them; each maps to the flag of the same name in kebab case.
SPEC_KEYS = ("datasetDir", "outputDir", "modelId", "resolution", "trainBatchSize",
             "gradientAccumulationSteps", "learningRate", "numTrainEpochs")
LORA_CONFIG = dict(r=16, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                   lora_dropout=0.05, bias="none")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for
KOHYA_FILE = "lora_kohya_for_a1111_forge_comfyui.safetensors"  # the layout AUTOMATIC1111, Forge and ComfyUI read
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "checkpoint.json"  # written last, inside a temp folder that is renamed only when complete
LOSS_LOG, LOSS_PLOT = "loss_log.csv", "loss_plot.png"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MIXED_PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


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


# ---------------------------------------------------------------- settings
def non_negative_float(text):
    """argparse type: a finite number >= 0 (0 turns the feature off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def snake_case(key):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="JSON_OR_PATH",
                        help=f"the spec's settings as a JSON object, inline or in a file; keys: "
                             f"{', '.join(SPEC_KEYS)}. Flags given on the command line win over it")
    parser.add_argument("--dataset-dir", default="../Quest_1/generated_palette",
                        help="folder of training images (.png .jpg .webp .bmp .gif .tif, subfolders included)")
    parser.add_argument("--output-dir", default="artist_seal",
                        help="where the LoRA files, result.json, the loss log and checkpoints go")
    parser.add_argument("--model-id", default="CompVis/stable-diffusion-v1-4",
                        help="Stable Diffusion v1.x model: a hub id or a local folder in diffusers layout")
    parser.add_argument("--resolution", type=positive_int, default=256,
                        help="images are resized and center-cropped to this")
    parser.add_argument("--train-batch-size", type=positive_int, default=1, help="images per step and process")
    parser.add_argument("--gradient-accumulation-steps", type=positive_int, default=4,
                        help="batches whose gradients add up before one optimizer step")
    parser.add_argument("--learning-rate", type=positive_float, default=1e-4,
                        help="AdamW learning rate of the LoRA weights")
    parser.add_argument("--num-train-epochs", type=positive_int, default=100, help="passes over the images")
    parser.add_argument("--max-train-steps", type=positive_int,
                        help="stop after this many optimizer steps (overrides epochs)")
    parser.add_argument("--train-prompt", default="a painting in the artist's palette",
                        help="the one caption every training image gets")
    parser.add_argument("--noise-offset", type=non_negative_float, default=0.0,
                        help="add this times a per-image, per-channel constant to the noise (e.g. 0.05), so the "
                             "LoRA can shift overall brightness and colour; 0 is the spec's plain noise")
    parser.add_argument("--snr-gamma", type=positive_float,
                        help="Min-SNR loss weighting with this gamma (5.0 is the paper's); off by default")
    parser.add_argument("--max-grad-norm", type=non_negative_float, default=1.0,
                        help="clip the LoRA gradients to this norm before each optimizer step; 0 turns it off")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                        help="dtype of the frozen UNet and of autocast; default: what `accelerate launch "
                             "--mixed_precision` set, else fp16 on CUDA and no (fp32) elsewhere")
    parser.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=True,
                        help="encode every image (both flips) with the VAE once before training, then free the VAE")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute UNet activations in the backward pass: less memory, slower steps")
    parser.add_argument("--checkpointing-steps", type=positive_int,
                        help="save a resumable checkpoint-N folder in the output dir every N optimizer steps")
    parser.add_argument("--checkpoints-total-limit", type=positive_int,
                        help="keep only the newest this many checkpoint-N folders")
    parser.add_argument("--resume", metavar="CHECKPOINT_DIR|latest",
                        help="continue from a checkpoint-N folder, or from the newest complete one in the output dir")
    parser.add_argument("--validation-prompts", nargs="+", default=[], metavar="PROMPT",
                        help="after training, render each prompt without and with the LoRA into validation_<i>.png")
    parser.add_argument("--validation-steps", type=positive_int, default=30, help="denoising steps per validation image")
    parser.add_argument("--validation-every", type=positive_int, metavar="N",
                        help="also render the validation prompts every N optimizer steps, into "
                             "validation/step-<N>_<i>.png (keeps the text encoder and VAE in memory)")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                        help="auto: CUDA, then Apple's MPS, then the CPU")
    parser.add_argument("--seed", type=int, default=0, help="seeds LoRA init, data order, noise and timesteps")
    args = parser.parse_args(argv)
    if args.config is not None:
        parser.set_defaults(**read_config(args.config, parser))
        args = parser.parse_args(argv)  # again, so that flags typed on the command line win over the JSON
    if args.validation_every and not args.validation_prompts:
        fail("--validation-every needs --validation-prompts; pass the prompts to render")
    if args.resume not in (None, "latest"):
        check_resumable(Path(args.resume))
    return args


def read_config(text_or_path, parser):
    """The spec's JSON object, checked key by key (type and range, as the flags are), as argparse defaults."""
    try:
        text = text_or_path if text_or_path.lstrip().startswith("{") else Path(text_or_path).read_text()
        config = json.loads(text)
    except (OSError, UnicodeDecodeError) as err:
        fail(f"--config '{text_or_path}' is neither a JSON object nor a readable file "
             f"({getattr(err, 'strerror', None) or err}); pass an inline object like '{{\"resolution\": 256}}' "
             "or the path of a .json file")
    except json.JSONDecodeError as err:
        fail(f"--config is not valid JSON ({err}); check quotes and commas")
    if not isinstance(config, dict):
        fail("--config must hold a JSON object; wrap the settings in { }")
    defaults = {}
    for key, value in config.items():
        if key not in SPEC_KEYS:
            fail(f"unknown key '{key}' in --config; use only {', '.join(SPEC_KEYS)} (other settings are flags)")
        dest = snake_case(key)
        expected = type(parser.get_default(dest))
        allowed = (int, float) if expected is float else expected
        if isinstance(value, bool) or not isinstance(value, allowed):
            json_type = {str: "string", int: "integer", float: "number"}[expected]
            fail(f"'{key}' in --config must be a JSON {json_type}, got {json.dumps(value)}; fix its value")
        if expected is not str:
            try:
                value = (positive_int if expected is int else positive_float)(str(value))
            except argparse.ArgumentTypeError as err:
                fail(f"'{key}' in --config (--{dest.replace('_', '-')}) must be positive: {err}; fix its value")
        defaults[dest] = expected(value)
    return defaults


# ---------------------------------------------------------------- checkpoints on disk
def checkpoint_step(path):
    """N for a folder named checkpoint-N, else None."""
    suffix = Path(path).name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if Path(path).name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoint_problem(path):
    """Why `path` is not a complete checkpoint-N written by this script, or None when it is one."""
    path = Path(path)
    if not path.is_dir():
        return "is not a folder"
    if checkpoint_step(path) is None:
        if (path / CHECKPOINT_MARKER).is_file() or (path / "optimizer.bin").is_file():
            return f"is not named {CHECKPOINT_PREFIX}N (rename it back to the {CHECKPOINT_PREFIX}N it was saved as)"
        if (path / LORA_FILE).is_file() or (path / "result.json").is_file():
            return (f"is a final output folder, not a {CHECKPOINT_PREFIX}N (it holds no optimizer state); pass one "
                    f"of its {CHECKPOINT_PREFIX}N folders, or --resume latest with --output-dir {path}")
        return f"is not named {CHECKPOINT_PREFIX}N"
    try:
        marker = json.loads((path / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError):
        return (f"is not a complete checkpoint (no readable {CHECKPOINT_MARKER}: an interrupted write, or a "
                "checkpoint from an older version of this script)")
    missing = [name for name in (LORA_FILE, "optimizer.bin") if not (path / name).is_file()]
    if missing or not isinstance(marker, dict) or marker.get("step") != checkpoint_step(path):
        return f"is not a complete checkpoint ({', '.join(missing) or CHECKPOINT_MARKER} does not match)"
    for key in ("r", "lora_alpha", "target_modules"):
        if marker.get("lora", {}).get(key) != LORA_CONFIG[key]:
            return (f"holds a LoRA with {key} {marker.get('lora', {}).get(key)}, this script trains "
                    f"{key} {LORA_CONFIG[key]}")
    return None


def check_resumable(path):
    problem = checkpoint_problem(path)
    if problem:
        fail(f"--resume {path} {problem}; pass a {CHECKPOINT_PREFIX}N folder written by --checkpointing-steps, "
             "or 'latest'")


def complete_checkpoints(output_dir):
    """{step: folder} of the complete checkpoint-N folders in output_dir (temp and half-written ones left out)."""
    folders = Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if Path(output_dir).is_dir() else []
    return {checkpoint_step(p): p for p in folders if checkpoint_problem(p) is None}


def latest_checkpoint(output_dir):
    steps = complete_checkpoints(output_dir)
    return steps[max(steps)] if steps else None


# ---------------------------------------------------------------- data
def find_images(dataset_dir):
    """The image files of datasetDir (sorted, subfolders included, hidden files skipped), or one clear line."""
    folder = Path(dataset_dir)
    if not folder.is_dir():
        fail(f"datasetDir '{dataset_dir}' is not a folder; pass --dataset-dir with your palette images")
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    if not files:
        fail(f"no images found in datasetDir '{dataset_dir}'; put .png or .jpg files there")
    return files


def to_rgb(image):
    """Any PIL mode as 8-bit RGB: 16-bit greyscale scaled down (not clipped to white), transparency over white."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and pixels.size and pixels.max() <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1]
        elif image.mode != "F" and (image.mode != "I" or (pixels.size and pixels.max() > 255)):
            pixels = pixels / 257.0  # 16 bits: 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(path, resolution):
    """One image fully decoded, upright, RGB, resized and center-cropped; a bad file ends the run naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                rgb = to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        fail(f"image {path} is too large to decode safely ({str(err).rstrip('.')}); shrink it or remove it "
             "from the dataset folder")
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files; every one means "corrupt"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        fail(f"image {path} is corrupt or not an image ({reason}); replace it or remove it from the dataset folder")
    return transforms.CenterCrop(resolution)(transforms.Resize(resolution)(rgb))


def load_palette(files, resolution):
    """Every image decoded up front, before any model loads: a bad file costs seconds, not a model load."""
    return [decode_image(path, resolution) for path in tqdm(files, desc="reading images", leave=False, disable=None)]


class Pixels(Dataset):
    """The decoded images as the spec's normalized tensors (for --no-cache-latents)."""

    def __init__(self, images):
        self.images = images
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.to_tensor(self.images[index])


@torch.no_grad()
def cache_latent_distributions(images, vae, device):
    """VAE posterior (mean, logvar) of every image, unflipped and flipped: [N, 2, 2*latent_channels, h, w] on CPU.

    Storing the distribution, not one sample, keeps the randomness of the uncached loop: each step still
    draws its own latent sample and its own flip."""
    pixels = Pixels(images)
    cache = []
    for index in tqdm(range(len(pixels)), desc="caching latents", leave=False, disable=None):
        image = pixels[index].to(device)
        cache.append(vae.encode(torch.stack([image, image.flip(-1)])).latent_dist.parameters.cpu())
    return torch.stack(cache)


def make_dataloader(images, vae, args, device):
    dataset = TensorDataset(cache_latent_distributions(images, vae, device)) if args.cache_latents else Pixels(images)
    # Its own generator: starting an epoch must not draw from the global RNG that the training step uses
    # (flips, latent samples, noise, timesteps, dropout), or a resumed run would drift off the uninterrupted one.
    return DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(args.seed))


# ---------------------------------------------------------------- device
def choose_precision(args, device):
    """(mixed precision, where it came from): --mixed-precision, else what `accelerate launch` set (its flag or
    config), else fp16 on CUDA and fp32 elsewhere. A flag that overrides the launcher says so."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if args.mixed_precision:
        precision, source = args.mixed_precision, "--mixed-precision"
        if launcher and launcher != precision:
            source += f", over accelerate launch's {launcher}"
    elif launcher:
        precision, source = launcher, "accelerate launch"
    else:
        precision, source = ("fp16" if device.type == "cuda" else "no"), f"the default on {device.type}"
    if precision == "fp16" and device.type == "cpu":
        fail("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        fail("--mixed-precision bf16 is not supported by this GPU; use fp16 or no")
    return precision, source


def make_accelerator(args, device):
    """Accelerate as diffusers' example scripts use it: one process, torchrun or `accelerate launch`."""
    precision, source = choose_precision(args, device)
    try:
        accelerator = Accelerator(
            cpu=device.type == "cpu", mixed_precision=precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            # An epoch's order depends on (seed, epoch) alone, so a resumed run sees the batches an uninterrupted one
            # would.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    except (ValueError, RuntimeError) as err:
        fail(f"could not set up --device {device.type} with --mixed-precision {precision} ({err}); "
             "try --mixed-precision no")
    if accelerator.is_main_process:
        print(f"training on {accelerator.num_processes} process(es), {accelerator.device}, "
              f"mixed precision {precision} ({source})")
    return accelerator


# ---------------------------------------------------------------- models
def load_components(model_id):
    """The five parts of an SD v1.x pipeline, or one clear line naming the id that could not be loaded."""
    try:
        text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet")
        noise_scheduler = DDPMScheduler.from_pretrained(model_id, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(f"could not load the Stable Diffusion model '{model_id}' ({reason}); "
             "pass a hub id you can download (or have cached) or a local folder saved with save_pretrained")
    # transformers 5 builds a special-tokens-only tokenizer from a folder without tokenizer files instead of failing.
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        fail(f"could not load the Stable Diffusion model '{model_id}' (its tokenizer has no vocabulary); "
             "pass a complete SD v1.x model folder or hub id")
    if noise_scheduler.config.prediction_type != "epsilon":
        fail(f"'{model_id}' predicts '{noise_scheduler.config.prediction_type}', not noise; "
             "this quest trains epsilon-prediction SD v1.x models")
    for part in (text_encoder, vae, unet):
        part.requires_grad_(False)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


@torch.no_grad()
def embed_prompt(tokenizer, text_encoder, prompt, device):
    """The training prompt's text embedding, computed once: the caption never changes."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder.to(device)(ids.to(device))[0]


def weight_dtype(accelerator):
    return MIXED_PRECISION_DTYPES.get(accelerator.mixed_precision, torch.float32)


def add_lora(unet, accelerator, gradient_checkpointing):
    """Frozen UNet in the training dtype, LoRA adapters on its attention projections, trainable in fp32."""
    unet.to(accelerator.device, dtype=weight_dtype(accelerator))
    unet.add_adapter(LoraConfig(**LORA_CONFIG))  # diffusers' way; keys stay loadable by load_lora_weights
    # fp16 trainable weights would make the grad scaler fail ("Attempting to unscale FP16 gradients").
    cast_training_params(unet, dtype=torch.float32)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return [p for p in unet.parameters() if p.requires_grad]


def diffusers_lora_tensors(unet):
    """{'unet.<module>.lora.down.weight' / '.lora.up.weight': tensor}: diffusers' LoRA layout."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{key}": tensor.detach().float().cpu().contiguous() for key, tensor in state.items()}


def kohya_lora_tensors(unet):
    """The same LoRA in kohya's layout, which AUTOMATIC1111, Forge and ComfyUI read:
    lora_unet_<module path, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha (alpha = lora_alpha,
    a 0-d tensor; without it those tools assume alpha = r and apply the LoRA at half strength)."""
    tensors = {}
    for key, tensor in get_peft_model_state_dict(unet).items():
        module, kind = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key).groups()
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = (
            tensor.detach().float().cpu().contiguous())
        tensors[f"{name}.alpha"] = torch.tensor(float(LORA_CONFIG["lora_alpha"]))
    return tensors


def save_lora(unet, directory, kohya=False):
    """pytorch_lora_weights.safetensors with its adapter config (so it reloads at its trained strength), and with
    kohya=True the same LoRA for AUTOMATIC1111/Forge/ComfyUI; each written atomically."""
    adapter = unet.peft_config["default"].to_dict()  # without lora_alpha diffusers assumes alpha = r: half strength
    # Dropout only acts in training; loaded layers come up in train mode, so keeping it would make inference random.
    adapter["lora_dropout"] = 0.0
    adapter = {f"unet.{key}": sorted(value) if isinstance(value, set) else value for key, value in adapter.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, indent=2, sort_keys=True)}
    write_atomically(Path(directory) / LORA_FILE, safetensors.torch.save(diffusers_lora_tensors(unet), metadata))
    if kohya:
        kohya_metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_CONFIG["r"]),
                          "ss_network_alpha": str(float(LORA_CONFIG["lora_alpha"])), "ss_base_model_version": "sd_v1",
                          "ss_training_comment": "quest_7_2.py: UNet attention LoRA (to_q, to_k, to_v, to_out.0)"}
        write_atomically(Path(directory) / KOHYA_FILE,
                         safetensors.torch.save(kohya_lora_tensors(unet), {"format": "pt", **kohya_metadata}))


def load_lora(unet, directory):
    """Put the LoRA weights saved by save_lora back into the UNet's training adapter (for --resume)."""
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(directory)
    unet_state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state_dict), adapter_name="default")


def checkpoint_only_lora(accelerator):
    """accelerator.save_state/load_state write the LoRA (megabytes), not the whole frozen UNet (gigabytes)."""
    def save_hook(models, weights, directory):
        if accelerator.is_main_process:
            save_lora(accelerator.unwrap_model(models[0]), directory)
        weights.clear()

    def load_hook(models, directory):
        load_lora(accelerator.unwrap_model(models.pop()), directory)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------- loss log
def loss_csv(rows):
    lines = ["step,loss"] + [f"{step},{loss:.6g}" for step, loss in rows]
    return ("\n".join(lines) + "\n").encode()


def read_loss_csv(path, up_to_step):
    try:
        with open(path, newline="") as file:
            return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(file)
                    if int(row["step"]) <= up_to_step]
    except (OSError, ValueError, KeyError):
        return []


def smoothed(values, weight=0.9):
    """An exponential moving average, debiased like TensorBoard's smoothing (the first points are not pulled to 0)."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** index))
    return out


def loss_plot_png(rows, size=(800, 450)):
    """The loss per optimizer step (light) and its smoothed curve (dark), drawn with PIL: PNG bytes."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), "training loss per optimizer step (grey) and smoothed (blue)", fill="black")
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    if rows:
        steps = [step for step, _ in rows]
        losses = [loss for _, loss in rows]
        smooth = smoothed(losses)
        low, high = min(losses), max(losses)
        high = high if high > low else low + 1e-6
        first, last = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

        def xy(step, loss):
            x = left + (step - first) / (last - first) * (width - left - right)
            y = height - bottom - (loss - low) / (high - low) * (height - top - bottom)
            return x, y

        for series, colour, line_width in ((losses, (190, 190, 190), 1), (smooth, (31, 90, 200), 3)):
            points = [xy(step, loss) for step, loss in zip(steps, series)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=line_width)
            else:
                x, y = points[0]
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        for loss in (low, high):
            draw.text((4, xy(first, loss)[1] - 6), f"{loss:.4g}", fill="black")
        for step in (first, steps[-1]):
            draw.text((xy(step, low)[0] - 8, height - bottom + 6), str(step), fill="black")
    draw.text((width // 2 - 15, height - 18), "step", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_loss_log(directory, rows):
    write_atomically(Path(directory) / LOSS_LOG, loss_csv(rows))
    write_atomically(Path(directory) / LOSS_PLOT, loss_plot_png(rows))


# ---------------------------------------------------------------- train
class Diverged(Exception):
    """The training loss stopped being a finite number."""


def latent_distribution(batch, vae):
    """The VAE posteriors of a batch after a random horizontal flip of each image: from the cache or encoded now.

    Both paths draw the same random numbers, so caching changes the speed, not the training run."""
    images = batch[0] if vae is None else batch
    flip = torch.randint(0, 2, (len(images),), device=images.device)
    if vae is None:  # cached: [image, 2 flips, posterior parameters, h, w]
        return DiagonalGaussianDistribution(images[torch.arange(len(images), device=images.device), flip])
    with torch.no_grad():
        return vae.encode(torch.where(flip.bool().view(-1, 1, 1, 1), images.flip(-1), images)).latent_dist


def training_loss(prediction, noise, timesteps, noise_scheduler, snr_gamma):
    """MSE between predicted and true noise; with snr_gamma, Min-SNR weighted per image (Hang et al. 2023) exactly as
    diffusers' train_text_to_image_lora.py does it for epsilon prediction: min(SNR, gamma) / SNR."""
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), noise.float())
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
    per_image = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weights).mean()


def resume_step(args, accelerator, unet, optimizer):
    """Restore a checkpoint if asked to; returns (optimizer step to continue from, the loss log so far)."""
    if args.resume is None:
        return 0, []
    checkpoint = latest_checkpoint(args.output_dir) if args.resume == "latest" else Path(args.resume)
    if checkpoint is None:
        if accelerator.is_main_process:
            tqdm.write(f"no complete {CHECKPOINT_PREFIX}N folder in {args.output_dir} yet: starting from step 0")
        return 0, []
    # Same model and LoRA shape? Compare tensor names and shapes before anything is loaded into the UNet.
    expected = {key: tuple(t.shape) for key, t in diffusers_lora_tensors(accelerator.unwrap_model(unet)).items()}
    with safe_open(checkpoint / LORA_FILE, "pt") as file:
        found = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        fail(f"--resume {checkpoint} holds a LoRA for another model ({len(differ)} tensors differ, e.g. {differ[0]}); "
             "resume with the --model-id it was trained on")
    states = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    if not states.is_file():
        fail(f"--resume {checkpoint} was written by fewer processes than this run's {accelerator.num_processes}; "
             "resume with as many processes as it was saved with")
    marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    accelerator.load_state(str(checkpoint))
    for group in optimizer.param_groups:  # the optimizer state brings its learning rate back: the flag wins
        group["lr"] = args.learning_rate
    if marker.get("learningRate") not in (None, args.learning_rate) and accelerator.is_main_process:
        tqdm.write(f"note: {checkpoint.name} was trained with --learning-rate {marker['learningRate']}; "
                   f"continuing with {args.learning_rate}")
    step = checkpoint_step(checkpoint)
    if accelerator.is_main_process:
        tqdm.write(f"resumed from {checkpoint} (step {step})")
    return step, read_loss_csv(checkpoint / LOSS_LOG, step)


def save_checkpoint(args, accelerator, step, loss_rows, run):
    """checkpoint-N, written as .checkpoint-N.tmp and renamed when complete: a folder named checkpoint-N is always
    whole, and --resume latest never picks a half-written one. Keeps --checkpoints-total-limit folders."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)  # checked writable before any work; created when first used
    final, tmp = output_dir / f"{CHECKPOINT_PREFIX}{step}", output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_loss_log(tmp, loss_rows)
            marker = {"step": step, "lora": {key: LORA_CONFIG[key] for key in ("r", "lora_alpha", "target_modules")},
                      "learningRate": args.learning_rate, "numProcesses": accelerator.num_processes,
                      "modelId": args.model_id}
            write_atomically(tmp / CHECKPOINT_MARKER, json.dumps(marker, indent=2).encode())
            if final.exists():  # e.g. a run started again in the same output folder
                old = output_dir / f".{CHECKPOINT_PREFIX}{step}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            run["kept"] = f"the newest checkpoint is {final}: run the same command with --resume latest to continue"
    except OSError as err:
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        fail(f"could not write {final} ({reason}); free some space or pass another output folder")
    except RuntimeError as err:  # torch.save inside accelerate reports a full disk as a RuntimeError
        fail(f"could not write {final} ({str(err).strip().splitlines()[0]}); free some space or pass another "
             "output folder")
    finally:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
    if accelerator.is_main_process:
        write_loss_log(output_dir, loss_rows)
        if args.checkpoints_total_limit:
            complete = complete_checkpoints(output_dir)
            for old_step in sorted(complete)[:-args.checkpoints_total_limit]:
                shutil.rmtree(complete[old_step], ignore_errors=True)
        tqdm.write(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


def train(args, accelerator, unet, vae, latent_scale, noise_scheduler, text_embedding, optimizer, dataloader,
          lora_parameters, validate=None, run=None):
    """The spec's loop: latents, noise, noisy latents, UNet predicts the noise, MSE, step every N batches.

    vae is None when the latents are cached; latent_scale is the VAE's scaling_factor. validate(step) renders the
    validation prompts (--validation-every). run['kept'] says what survives an interruption."""
    run = {} if run is None else run
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    step, loss_rows = resume_step(args, accelerator, unet, optimizer)
    first_epoch, batches_to_skip = divmod(step, steps_per_epoch)
    epoch_loss = None  # stays None only when a resumed run has no steps left

    progress = tqdm(total=max_steps, initial=step, desc="steps",
                    disable=None if accelerator.is_local_main_process else True)  # None: only on a terminal
    try:  # the bar ends its line before any message that follows (Ctrl-C, divergence)
        for epoch in range(first_epoch, num_epochs):
            if step >= max_steps:
                break
            unet.train()
            dataloader.set_epoch(epoch)
            batches = dataloader
            if epoch == first_epoch and batches_to_skip:  # resuming mid-epoch: skip what the checkpoint already saw
                batches = accelerator.skip_first_batches(dataloader, batches_to_skip * args.gradient_accumulation_steps)
            epoch_losses, batch_losses = [], []
            for batch in batches:
                with accelerator.accumulate(unet):
                    latents = latent_distribution(batch, vae).sample() * latent_scale
                    noise = torch.randn_like(latents)
                    if args.noise_offset:  # drawn only when asked for: the default run keeps the spec's random numbers
                        noise = noise + args.noise_offset * torch.randn(
                            (*latents.shape[:2], 1, 1), device=latents.device, dtype=latents.dtype)
                    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),),
                                              device=latents.device)
                    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                    prediction = unet(noisy_latents, timesteps, text_embedding.expand(len(latents), -1, -1)).sample
                    loss = training_loss(prediction, noise, timesteps, noise_scheduler, args.snr_gamma)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                batch_losses.append(loss.detach().float())
                if accelerator.sync_gradients:  # an optimizer step happened
                    step += 1
                    step_loss = accelerator.reduce(torch.stack(batch_losses).mean(), reduction="mean").item()
                    batch_losses = []
                    if not math.isfinite(step_loss):
                        raise Diverged(f"the training loss became {step_loss} at step {step}")
                    loss_rows.append((step, step_loss))
                    epoch_losses.append(step_loss)
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_loss:.4f}")
                    if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                        save_checkpoint(args, accelerator, step, loss_rows, run)
                    if validate is not None and args.validation_every and step % args.validation_every == 0:
                        validate(step)
                    if step >= max_steps:
                        break
            if epoch_losses:
                epoch_loss = sum(epoch_losses) / len(epoch_losses)
                if accelerator.is_main_process:
                    tqdm.write(f"epoch {epoch + 1}/{num_epochs}: loss {epoch_loss:.4f}")
    finally:
        progress.close()
    return {"steps": step, "epochsCompleted": step // steps_per_epoch, "finalLoss": epoch_loss, "lossRows": loss_rows}


# ---------------------------------------------------------------- validation images
def render_side_by_side(pipeline, args, device, set_lora, prompt, path):
    """One prompt from the same start noise, without (left) and with (right) the LoRA, into a PNG."""
    side_by_side = Image.new("RGB", (2 * args.resolution, args.resolution))
    for column, lora_on in enumerate((False, True)):
        set_lora(lora_on)
        image = pipeline(prompt, height=args.resolution, width=args.resolution,
                         num_inference_steps=args.validation_steps,
                         generator=torch.Generator(device).manual_seed(args.seed)).images[0]
        side_by_side.paste(image, (column * args.resolution, 0))
    buffer = io.BytesIO()
    side_by_side.save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue())
    return path


def render_validation_images(args, output_dir, accelerator):
    """Each prompt without and with the LoRA, loaded from the saved file the way users load it. No safety checker:
    it would download another ~1.2 GB for hub ids and black out images."""
    pipeline = StableDiffusionPipeline.from_pretrained(args.model_id, dtype=weight_dtype(accelerator),
                                                       safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False).to(accelerator.device)
    pipeline.load_lora_weights(output_dir)
    pipeline.set_progress_bar_config(disable=True)

    def set_lora(on):
        pipeline.enable_lora() if on else pipeline.disable_lora()

    return [render_side_by_side(pipeline, args, accelerator.device, set_lora, prompt, output_dir / f"validation_{i}.png")
            for i, prompt in enumerate(tqdm(args.validation_prompts, desc="validation images", leave=False, disable=None))]


def make_validator(args, accelerator, unet, text_encoder, vae, tokenizer):
    """validate(step) for --validation-every: the training UNet itself with its adapter switched off and on, in
    eval mode, under the training autocast, with the global RNG untouched (the training run stays the same)."""
    state = {}

    def validate(step):
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(unet)
            if "pipeline" not in state:
                state["pipeline"] = StableDiffusionPipeline.from_pretrained(
                    args.model_id, unet=model, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
                state["pipeline"].set_progress_bar_config(disable=True)
            folder = Path(args.output_dir) / "validation"
            folder.mkdir(parents=True, exist_ok=True)
            devices = [accelerator.device] if accelerator.device.type == "cuda" else []
            model.eval()
            try:
                with torch.random.fork_rng(devices=devices), accelerator.autocast():
                    for index, prompt in enumerate(args.validation_prompts):
                        render_side_by_side(state["pipeline"], args, accelerator.device,
                                            lambda on: model.enable_adapters() if on else model.disable_adapters(),
                                            prompt, folder / f"step-{step}_{index}.png")
            finally:
                model.enable_adapters()
                model.train()
            tqdm.write(f"validation images for step {step} in {folder}")
        accelerator.wait_for_everyone()
    return validate


# ---------------------------------------------------------------- report
def write_result(output_dir, stats):
    result = {"success": True, "outputDir": str(output_dir.resolve()), "epochsCompleted": stats["epochsCompleted"],
              "finalLoss": None if stats["finalLoss"] is None else round(stats["finalLoss"], 6),
              "steps": stats["steps"]}
    write_atomically(output_dir / "result.json", (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    return result


def quiet_libraries():
    """Library info logs and weight-loading bars would bury the one line a failure prints."""
    for logging_module in (transformers.utils.logging, diffusers.utils.logging):
        logging_module.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def run_training(args, run):
    device = pick_device(args.device)
    files = find_images(args.dataset_dir)  # a missing or empty folder is found before anything is created
    check_output_dir(args.output_dir, "--output-dir")
    newest = latest_checkpoint(args.output_dir)
    if newest is not None:
        run["kept"] = f"the newest checkpoint is {newest}: run the same command with --resume latest to continue"
    accelerator = make_accelerator(args, device)
    # Per-process seeds (seed + rank) give each GPU its own noise; rank 0 is the plain seed, so 1 device = --seed.
    set_seed(args.seed, device_specific=True)
    images = load_palette(files, args.resolution)  # every process checks them, so a bad file stops them all alike
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(args.model_id)
    # Every input is checked by now; from here on nothing fails on user input.

    text_embedding = embed_prompt(tokenizer, text_encoder, args.train_prompt, accelerator.device)
    # The VAE stays fp32: it only encodes (once per image when caching), and an fp16 VAE can overflow into NaN.
    vae.to(accelerator.device)
    latent_scale = vae.config.scaling_factor
    dataloader = make_dataloader(images, vae, args, accelerator.device)
    keep_for_validation = args.validation_every is not None and accelerator.is_main_process
    if not keep_for_validation:
        del tokenizer, text_encoder  # used once: free its memory for the UNet
        tokenizer = text_encoder = None
    training_vae = None if args.cache_latents else vae  # cached: a step runs the UNet only
    if not keep_for_validation and args.cache_latents:
        vae = None
    accelerator.free_memory()  # hand the text encoder's (and the cached VAE's) memory back before the UNet's

    lora_parameters = add_lora(unet, accelerator, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.learning_rate)
    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    checkpoint_only_lora(accelerator)
    validate = make_validator(args, accelerator, unet, text_encoder, vae, tokenizer) if args.validation_every else None
    try:
        stats = train(args, accelerator, unet, training_vae, latent_scale, noise_scheduler, text_embedding, optimizer,
                      dataloader, lora_parameters, validate, run)
    except Diverged as err:
        fail(f"{err}; lower --learning-rate (it is {args.learning_rate:g}); "
             "nothing was written over earlier outputs")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_lora(accelerator.unwrap_model(unet), output_dir, kohya=True)
        write_loss_log(output_dir, stats["lossRows"])
        result = write_result(output_dir, stats)  # before validation: a failure there keeps the run's record
        run["kept"] = f"the LoRA, the loss log and result.json in {output_dir} are complete"
        del unet, optimizer
        text_encoder = vae = validate = None
        accelerator.free_memory()
        images = render_validation_images(args, output_dir, accelerator) if args.validation_prompts else []
        written = [LORA_FILE, KOHYA_FILE, LOSS_LOG, LOSS_PLOT, "result.json", *(p.name for p in images)]
        print(f"wrote {', '.join(written)} to {output_dir}")
        print(json.dumps(result, allow_nan=False))
    accelerator.end_training()


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    run = {"kept": "no checkpoint was written (pass --checkpointing-steps N to keep progress)"}
    try:
        run_training(args, run)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process gets Ctrl-C; one line is enough
            print(f"error: interrupted (Ctrl-C); {run['kept']}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        sys.exit(130)
