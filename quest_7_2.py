"""Quest 7.2 - the artist's seal: teach a Stable Diffusion v1.x UNet a palette with LoRA.

Point the script at a folder of images and a Stable Diffusion v1.x model: your model file as A1111,
ComfyUI and model sites have it, a hub id or a diffusers folder. It freezes the whole model, adds small
LoRA matrices (default r=16, alpha=32) to the UNet's attention projections and trains only those on the
images. Each image is trained with its own caption (image.txt beside it, or a metadata.jsonl line) or,
without one, with --train-prompt.
The result is a few megabytes, written twice: pytorch_lora_weights.safetensors for diffusers'
`load_lora_weights(outputDir)`, and the same LoRA in the kohya layout, with the metadata A1111
shows (lora_kohya_for_a1111_forge_comfyui.safetensors), for AUTOMATIC1111, Forge and ComfyUI.

The spec's settings come as a JSON object (--config, inline or a file) or as kebab-case flags;
flags win. Memory is the point of the quest, so what is fixed is computed once and freed: one
text embedding per distinct caption, and the VAE latents of every image (both flips), so a
training step runs the UNet alone. Under fp16/bf16 mixed precision the frozen UNet is kept in
that dtype and only the LoRA weights in fp32.

    python quest_7_2.py --model-id v1-5-pruned-emaonly.safetensors --dataset-dir my_palette --output-dir artist_seal
    python quest_7_2.py --dataset-dir my_palette --output-dir artist_seal                # the hub's SD v1.4
    python quest_7_2.py --dataset-dir my_photos --trigger-word zq --rank 8 --lora-alpha 8
    torchrun --nproc_per_node 2 quest_7_2.py --config settings.json      # several GPUs, same script

Numbers in docs/quest_7_2.md: SD v1.x's architecture, random weights, 256 px, on a 2-core AMD EPYC with AVX512-BF16.
"""
import argparse
import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path


def raise_interrupt(signum, frame):
    """SIGTERM (`timeout`, a scheduler, a closing terminal) stops a run the way Ctrl-C does: see exit_interrupted."""
    raise KeyboardInterrupt(signum)


signal.signal(signal.SIGTERM, raise_interrupt)
try:  # Ctrl-C or SIGTERM while the libraries load ends in one line too
    if hasattr(signal, "pthread_sigmask"):  # held until the imports end: one landing inside numpy's C import breaks it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    import numpy as np
    import torch

    # torchao (when installed) registers enums that torch 2.14 warns about at import time, and diffusers logs a
    # warning when it cannot import torchao's tensors: neither concerns this script, and both would bury a one-line
    # error.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)  # its load errors raise: one line here
    transformers.utils.logging.set_verbosity_error()
    import safetensors.torch
    import torch.nn.functional as F
    from accelerate import Accelerator, DataLoaderConfiguration, init_empty_weights
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, SingleFileComponentError
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.training_utils import cast_training_params, compute_snr
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    from huggingface_hub import snapshot_download
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
    from PIL import Image, ImageDraw, ImageOps
    from safetensors import safe_open
    from torch.utils.data import DataLoader, Dataset, TensorDataset
    from torchvision import transforms
    from tqdm.auto import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    if hasattr(signal, "pthread_sigmask"):  # a signal held meanwhile is raised here, inside this guard
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
except KeyboardInterrupt as stop:
    print("error: interrupted while starting; nothing was done", file=sys.stderr)
    sys.exit(128 + (stop.args[0] if stop.args else signal.SIGINT))


# ---------------------------------------------------------------- settings
# The spec's JSON keys, in the order it lists them; each maps to the flag of the same name in kebab case.
SPEC_KEYS = ("datasetDir", "outputDir", "modelId", "resolution", "trainBatchSize",
             "gradientAccumulationSteps", "learningRate", "numTrainEpochs")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for
KOHYA_FILE = "lora_kohya_for_a1111_forge_comfyui.safetensors"  # the layout AUTOMATIC1111, Forge and ComfyUI read
RESULT_FILE = "result.json"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "checkpoint.json"  # written last, inside a temp folder that is renamed only when complete
LOSS_LOG, LOSS_PLOT = "loss_log.csv", "loss_plot.png"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MIXED_PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
# A LoRA update over 1000x the frozen weight it adapts has diverged: trained ones stay well under 1x.
MAX_LORA_GROWTH = 1e3
MAX_RESOLUTION = 2048  # 4x SD v1's native 512 px: beyond it a step needs more memory than any one GPU has
# Upper bounds of the counts, checked before anything loads: past them a run cannot fit in memory or finish.
MAX_BATCH_SIZE = 1024  # images in one forward pass: no GPU holds more SD v1 activations at once
MAX_ACCUMULATION = 1024  # batches per optimizer step: more gives no better gradient, only slower steps
MAX_EPOCHS = 100_000
MAX_STEPS = 1_000_000  # weeks of GPU time; the loss log keeps one row per step in memory
MAX_CHECKPOINTS_KEPT = 1000
MAX_VALIDATION_STEPS = 1000  # SD v1's scheduler has 1000 timesteps: more denoising steps than that are refused by it
MAX_VALIDATION_PROMPTS = 100
# A single-file --model-id without --model-config is built with the configs diffusers itself picks for SD v1.x files.
SD_V1_CONFIG = DIFFUSERS_DEFAULT_PIPELINE_PATHS["v1"]["pretrained_model_name_or_path"]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# What diffusers' from_single_file fetches of a hub id for its configs: every config and tokenizer file, no weights.
CONFIG_FILES = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="JSON_OR_PATH",
                        help=f"the spec's settings as a JSON object, inline or in a file; keys: "
                             f"{', '.join(SPEC_KEYS)}. Flags given on the command line win over it")
    parser.add_argument("--dataset-dir", default="../Quest_1/generated_palette",
                        help="folder of training images (.png .jpg .webp .bmp .gif .tif, subfolders included); "
                             "captions from image.txt beside image.png (kohya) or metadata.jsonl (datasets' "
                             "imagefolder), the .txt winning where both have one")
    parser.add_argument("--dataset-name", metavar="NAME",
                        help="a Hugging Face datasets name (hub or local) to train on instead of --dataset-dir, "
                             "loaded with datasets.load_dataset(NAME, split='train')")
    parser.add_argument("--image-column", default="image", help="--dataset-name: the column holding the images")
    parser.add_argument("--caption-column", default="text",
                        help="the caption column of metadata.jsonl or of --dataset-name (datasets' convention)")
    parser.add_argument("--output-dir", default="artist_seal",
                        help="where the LoRA files, result.json, the loss log and checkpoints go")
    parser.add_argument("--model-id", default="CompVis/stable-diffusion-v1-4",
                        help="Stable Diffusion v1.x model: a hub id, a local folder in diffusers layout, or one "
                             "checkpoint file as A1111, ComfyUI and model sites have it (.safetensors, or .ckpt, "
                             "read without running its pickled code)")
    parser.add_argument("--model-config", metavar="DIR_OR_HUB_ID",
                        help="a single-file --model-id: the diffusers-format SD v1.x folder (or hub id) whose configs "
                             "and tokenizer it is built with (its weights are not needed); default: diffusers' own "
                             f"for SD v1.x files, {SD_V1_CONFIG}, fetched from the hub")
    parser.add_argument("--resolution", type=number(int, 8, MAX_RESOLUTION), default=256,
                        help="images are resized and center-cropped to this; a multiple of 8 (the VAE's factor)")
    parser.add_argument("--train-batch-size", type=number(int, 1, MAX_BATCH_SIZE), default=1,
                        help="images per step and process")
    parser.add_argument("--gradient-accumulation-steps", type=number(int, 1, MAX_ACCUMULATION), default=4,
                        help="batches whose gradients add up before one optimizer step")
    parser.add_argument("--learning-rate", type=number(float, 0, low_open=True), default=1e-4,
                        help="AdamW learning rate of the LoRA weights")
    parser.add_argument("--num-train-epochs", type=number(int, 1, MAX_EPOCHS), default=100,
                        help="passes over the images")
    parser.add_argument("--max-train-steps", type=number(int, 1, MAX_STEPS),
                        help="stop after this many optimizer steps (overrides epochs)")
    parser.add_argument("--train-prompt", default="a painting in the artist's palette",
                        help="the caption of every image without one of its own (a plain folder: all of them)")
    parser.add_argument("--trigger-word", default="",
                        help="put in front of every caption ('W, caption'), so that W alone calls up the LoRA")
    parser.add_argument("--caption-dropout", type=number(float, 0, 1, high_open=True), default=0.0,
                        help="train this share of images with the empty caption, so the LoRA also acts without "
                             "its words; 0 keeps every caption")
    parser.add_argument("--rank", type=number(int, 1, 1024), default=16,
                        help="LoRA rank r: the size of each adapter (https://arxiv.org/abs/2106.09685)")
    parser.add_argument("--lora-alpha", type=number(float, 0, 65536, low_open=True), default=32.0,
                        help="LoRA alpha: each update is scaled by alpha / r")
    parser.add_argument("--target-modules", type=module_names, default="to_q,to_k,to_v,to_out.0",  # parsed to a list
                        metavar="NAMES", help="comma-separated names of the UNet layers that get adapters; "
                                              "the default is the attention projections")
    parser.add_argument("--lora-dropout", type=number(float, 0, 1, high_open=True), default=0.05,
                        help="dropout on the adapters' input while training")
    parser.add_argument("--init-lora", metavar="PATH",
                        help="start from a finished LoRA instead of zero: this script's "
                             "pytorch_lora_weights.safetensors or kohya file, or an output folder holding them")
    parser.add_argument("--noise-offset", type=number(float, 0, 1), default=0.0,
                        help="add this times a per-image, per-channel constant to the noise (e.g. 0.05), so the "
                             "LoRA can shift overall brightness and colour; 0 is the spec's plain noise")
    parser.add_argument("--snr-gamma", type=number(float, 0, low_open=True),
                        help="Min-SNR loss weighting with this gamma (5.0 is the paper's, "
                             "https://arxiv.org/abs/2303.09556); None: off")
    parser.add_argument("--max-grad-norm", type=number(float, 0), default=1.0,
                        help="clip the LoRA gradients to this norm before each optimizer step; 0 turns it off")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                        help="dtype of the frozen UNet and of autocast; default: what `accelerate launch "
                             "--mixed_precision` set, else fp16 on CUDA and no (fp32) elsewhere")
    parser.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=True,
                        help="encode every image (both flips) with the VAE once before training, then free the VAE")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute UNet activations in the backward pass: less memory, slower steps")
    parser.add_argument("--checkpointing-steps", type=number(int, 1, MAX_STEPS),
                        help="save a resumable checkpoint-N folder in the output dir every N optimizer steps")
    parser.add_argument("--checkpoints-total-limit", type=number(int, 1, MAX_CHECKPOINTS_KEPT),
                        help="keep only the newest this many checkpoint-N folders")
    parser.add_argument("--resume", metavar="CHECKPOINT_DIR|latest",
                        help="continue from a checkpoint-N folder, or from the newest complete one in the output dir")
    parser.add_argument("--validation-prompts", nargs="+", default=[], metavar="PROMPT",
                        help="after training, render each prompt without and with the LoRA into validation_<i>.png "
                             f"(at most {MAX_VALIDATION_PROMPTS} prompts)")
    parser.add_argument("--validation-steps", type=number(int, 1, MAX_VALIDATION_STEPS), default=30,
                        help="denoising steps per validation image")
    parser.add_argument("--validation-every", type=number(int, 1, MAX_STEPS), metavar="N",
                        help="also render the validation prompts every N optimizer steps, into "
                             "validation/step-<N>_<i>.png (keeps the text encoder and VAE in memory)")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto",
                        help="auto: CUDA, then Apple's MPS, then the CPU")
    parser.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0,
                        help="0 to 2^32-1; seeds LoRA init, data order, flips, noise and timesteps")
    args = parser.parse_args(argv)
    if args.config is not None:
        check_text(args.config, "--config")  # a path too: read before check_args runs
        parser.set_defaults(**read_config(args.config, parser))
        args = parser.parse_args(argv)  # again, so that flags typed on the command line win over the JSON
    check_args(args)
    return args


def read_config(text_or_path, parser):
    """The spec's JSON object, checked key by key with the flag's own validator, as argparse defaults. A path must be
    a regular file: a FIFO or a device would block the read, or never end it."""
    if text_or_path.lstrip().startswith("{") or text_or_path.lstrip().startswith("["):
        text = text_or_path
    else:
        path = Path(text_or_path)
        if path.exists() and not path.is_file():
            fail(f"--config '{text_or_path}' is not a regular file (a folder, a FIFO or a device); pass an inline "
                 "object like '{\"resolution\": 256}' or the path of a .json file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            fail(f"--config '{text_or_path}' is neither a JSON object nor a readable file "
                 f"({getattr(err, 'strerror', None) or err}); pass an inline object like '{{\"resolution\": 256}}' "
                 "or the path of a .json file")
    config, problem = read_json(text)
    if problem:
        fail(f"--config is not valid JSON ({problem}); check quotes, commas and numbers")
    if not isinstance(config, dict):
        fail("--config must hold a JSON object; wrap the settings in { }")
    actions = {action.dest: action for action in parser._actions}
    defaults = {}
    for key, value in config.items():
        if key not in SPEC_KEYS:
            fail(f"unknown key '{key}' in --config; use only {', '.join(SPEC_KEYS)} (other settings are flags)")
        action, flag = actions[snake_case(key)], "--" + snake_case(key).replace("_", "-")
        expected = str if action.type is None else int if action.default.__class__ is int else float
        allowed = (int, float) if expected is float else expected
        if isinstance(value, bool) or not isinstance(value, allowed):
            json_type = {str: "string", int: "integer", float: "number"}[expected]
            fail(f"'{key}' in --config must be a JSON {json_type}, got {json.dumps(value)}; fix its value")
        if action.type is not None:
            try:
                value = action.type(str(value))
            except argparse.ArgumentTypeError as err:
                fail(f"'{key}' in --config ({flag}): {err}; fix its value")
        defaults[action.dest] = value
    return defaults


def read_json(text):
    """(the value, None), or (None, why Python cannot read it as JSON): a syntax error, but also nesting deeper than
    Python's recursion limit, or an integer of more than 4300 digits (Python's limit for converting one)."""
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "it is nested too deeply"
    except ValueError as err:  # json.JSONDecodeError, and the int conversion limit's ValueError
        if "integer string conversion" in str(err):
            return None, "it holds a number of more than 4300 digits"
        return None, str(err)


def check_text(text, where):
    """Every text a user gives reaches the tokenizer, safetensors metadata or a JSON file, which take UTF-8 only. A
    non-UTF-8 byte from the shell or a file name (Python keeps it as a lone surrogate), or a JSON escape like
    \\ud800, is refused here, before any model loads; so is a NUL character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        fail(f"{where} is not valid UTF-8 text (character {err.start + 1} is {ascii(text[err.start])}, a byte that is "
             "not UTF-8 or half a surrogate pair); write it in UTF-8")
    if "\0" in text:  # no path can hold one (os.stat raises ValueError), and no prompt means one
        fail(f"{where} holds a NUL character (character {text.index(chr(0)) + 1}); remove it")


def module_names(text):
    """argparse type for --target-modules: comma-separated layer names like to_q,to_out.0."""
    names = [name.strip() for name in text.split(",")]
    if not all(re.fullmatch(r"[A-Za-z0-9_.]+", name) for name in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer names like to_q,to_k,to_v,to_out.0, "
                                         f"got '{text}'")
    return names


def lora_shape(args):
    """What makes two LoRAs interchangeable: checkpoints and --init-lora must match it."""
    return {"r": args.rank, "lora_alpha": args.lora_alpha, "target_modules": args.target_modules}


def snake_case(key):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def check_args(args):
    """What can be refused before any image is read or model loaded."""
    for name, value in vars(args).items():  # flags and --config values alike
        for index, item in enumerate(value if isinstance(value, list) else [value], start=1):
            if isinstance(item, str):
                where = "--" + name.replace("_", "-") + (f" (item {index})" if isinstance(value, list) else "")
                check_text(item, where)
    for flag in ("--output-dir", "--dataset-dir"):  # their folder names go into the kohya file's metadata
        check_text(os.path.realpath(getattr(args, flag[2:].replace("-", "_"))), f"the full path of {flag}")
    if len(args.validation_prompts) > MAX_VALIDATION_PROMPTS:
        fail(f"--validation-prompts has {len(args.validation_prompts)} prompts, more than {MAX_VALIDATION_PROMPTS}; "
             "pass fewer")
    if args.resolution % 8:
        fail(f"--resolution must be a multiple of 8 (the VAE works on 8x8 pixel blocks), got {args.resolution}; "
             f"pass {max(8, args.resolution // 8 * 8)} or {args.resolution // 8 * 8 + 8}")
    if args.validation_every and not args.validation_prompts:
        fail("--validation-every needs --validation-prompts; pass the prompts to render")
    if args.init_lora and args.resume:
        fail("--init-lora and --resume both set where the LoRA starts; pass one (a checkpoint already holds its LoRA)")
    check_output_dir(args.output_dir, "--output-dir")
    if args.dataset_name is None and Path(args.output_dir).resolve().is_relative_to(Path(args.dataset_dir).resolve()):
        fail(f"--output-dir {args.output_dir} is inside --dataset-dir {args.dataset_dir}: the next run would train on "
             "its loss plot and validation images; pass an output folder outside the dataset")
    if args.resume not in (None, "latest"):
        problem = checkpoint_problem(Path(args.resume)) or shape_problem(Path(args.resume), args)
        if problem:
            fail(f"--resume {args.resume} {problem}; pass a {CHECKPOINT_PREFIX}N folder written by "
                 "--checkpointing-steps, or 'latest'")
    check_no_other_run(args)
    if args.init_lora is not None:
        init_lora_file(args.init_lora)  # a missing file ends here; its tensors are checked against the UNet later
    if args.model_config is not None and not is_single_file(args.model_id):
        fail(f"--model-config is for a single-file --model-id; {args.model_id} brings its own configs: "
             "drop --model-config")


# ---------------------------------------------------------------- models
def load_components(model_id, model_config=None):
    """The five parts of an SD v1.x pipeline, or one clear line naming the id that could not be loaded. A single file
    (checked by check_model_file) is built by diffusers' from_single_file with the configs of --model-config."""
    try:
        if is_single_file(model_id):
            if model_config is None and int(os.environ.get("RANK", "0")) == 0:  # said once, under torchrun too
                print(f"{Path(model_id).name}: configs and tokenizer of {SD_V1_CONFIG}, diffusers' default for SD v1.x "
                      "files (pass --model-config to use another model's)")
            pipeline = stable_diffusion_pipeline(model_id, model_config)
            text_encoder, vae, unet, tokenizer = pipeline.text_encoder, pipeline.vae, pipeline.unet, pipeline.tokenizer
            noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        else:
            text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
            vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae")
            unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet")
            noise_scheduler = DDPMScheduler.from_pretrained(model_id, subfolder="scheduler")
            tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
    # A config value diffusers cannot build from (cross_attention_dim -5 or "abc", JSON nested too deeply) raises
    # RuntimeError (RecursionError is one) or TypeError.
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SingleFileComponentError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if is_single_file(model_id):  # the file and the configs' sizes were checked: a shape that differs is left
            fail(f"could not build {model_id} with the configs of {model_config or SD_V1_CONFIG} ({reason[:200]}); "
                 "pass --model-config with the diffusers-format folder of the SD v1.x model the file was made from")
        fail(f"could not load the Stable Diffusion model '{model_id}' ({reason}); "
             "pass a hub id you can download (or have cached) or a local folder saved with save_pretrained")
    # transformers 5 builds a special-tokens-only tokenizer from a folder without tokenizer files instead of failing.
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        fix = ("pass --model-config with a complete diffusers-format SD v1.x folder" if is_single_file(model_id) else
               "pass a complete SD v1.x model folder or hub id")
        fail(f"could not load the Stable Diffusion model '{model_id}' (its tokenizer has no vocabulary); {fix}")
    if noise_scheduler.config.prediction_type != "epsilon":
        fail(f"'{model_id}' predicts '{noise_scheduler.config.prediction_type}', not noise; "
             "this quest trains epsilon-prediction SD v1.x models")
    for part in (text_encoder, vae, unet):
        part.requires_grad_(False)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def check_model_parts_fit(tokenizer, text_encoder, vae, unet, model_id):
    """The parts of a model folder must fit each other, or training fails deep inside the UNet after minutes of
    caching: an SDXL folder (its UNet attends to two text encoders' 2048 wide output and needs their pooled embedding
    too), or parts mixed from different models, is refused here in one line naming the mismatch."""
    config, hidden = unet.config, text_encoder.config.hidden_size
    width = config.cross_attention_dim
    widths = set(width) if isinstance(width, (list, tuple)) else {width}
    extra = config.addition_embed_type or config.class_embed_type or config.encoder_hid_dim_type
    latent = vae.config.latent_channels
    mismatches = [
        (widths != {hidden}, f"its UNet attends to text {'/'.join(sorted(map(str, widths)))} wide, its text encoder "
                             f"gives {hidden}"),
        (extra is not None, f"its UNet needs extra conditioning ({extra}), as SDXL's does"),
        (not config.in_channels == config.out_channels == latent,
         f"its UNet takes {config.in_channels} and gives {config.out_channels} latent channels, its VAE has {latent}"),
        (tokenizer.model_max_length > text_encoder.config.max_position_embeddings,
         f"its tokenizer makes {tokenizer.model_max_length} tokens, its text encoder reads at most "
         f"{text_encoder.config.max_position_embeddings}"),
        (len(tokenizer) > text_encoder.config.vocab_size,
         f"its tokenizer knows {len(tokenizer)} tokens, its text encoder {text_encoder.config.vocab_size}"),
        (not (isinstance(vae.config.scaling_factor, (int, float)) and math.isfinite(vae.config.scaling_factor)
              and vae.config.scaling_factor > 0), f"its VAE's scaling_factor is {vae.config.scaling_factor!r:.20}")]
    problem = next((what for wrong, what in mismatches if wrong), None)
    if problem:
        fail(f"the parts of '{model_id}' do not fit each other ({problem}); pass a complete Stable Diffusion v1.x "
             "model, with all parts from the same one")


def is_single_file(model_id):
    """--model-id names one checkpoint file (a path ending in .safetensors or .ckpt, or any existing file), not a hub id
    or a diffusers folder."""
    return Path(model_id).suffix.lower() in SINGLE_FILE_SUFFIXES or Path(model_id).is_file()


def stable_diffusion_pipeline(model_id, model_config=None, **parts):
    """A StableDiffusionPipeline of --model-id: from_pretrained for a hub id or folder, diffusers' from_single_file for
    one checkpoint file (with the configs and tokenizer of --model-config). `parts` (unet=..., vae=..., dtype=...) go
    to the loader; with the UNet, VAE and text encoder given, a single file is not read again. No safety checker: it
    would download another ~1.2 GB for hub ids and black out images."""
    options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False, **parts}
    if not is_single_file(model_id):
        return StableDiffusionPipeline.from_pretrained(model_id, **options)
    config_dir = model_config_dir(model_config)
    if all(parts.get(name) is not None for name in ("unet", "vae", "text_encoder")):
        return StableDiffusionPipeline.from_pretrained(config_dir, **options)  # the scheduler and tokenizer only
    with torch.serialization.safe_globals(SAFE_PICKLE_GLOBALS):  # a .ckpt is read by torch's weights-only unpickler
        return StableDiffusionPipeline.from_single_file(model_id, config=str(config_dir), local_files_only=True,
                                                        **options)


def check_resolution_fits(resolution, vae, model_id):
    """The VAE halves the image once per down block after the first; --resolution must be a multiple of that."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        fail(f"--resolution {resolution} is not a multiple of {factor}, the downsampling of '{model_id}''s VAE; "
             f"pass a multiple of {factor}")


@torch.no_grad()
def embed_captions(tokenizer, text_encoder, captions, device, batch_size=32):
    """The text embedding of every distinct caption, computed once (captions never change): [captions, 77, dim]."""
    text_encoder.to(device)
    embeddings = []
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(captions[start:start + batch_size], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        embeddings.append(text_encoder(ids.to(device))[0])
    return torch.cat(embeddings)


def weight_dtype(accelerator):
    return MIXED_PRECISION_DTYPES.get(accelerator.mixed_precision, torch.float32)


def add_lora(unet, args, accelerator):
    """Frozen UNet in the training dtype, LoRA adapters on the --target-modules layers, trainable in fp32."""
    unet.to(accelerator.device, dtype=weight_dtype(accelerator))
    try:  # diffusers' way; keys stay loadable by load_lora_weights
        unet.add_adapter(LoraConfig(**lora_shape(args), lora_dropout=args.lora_dropout, bias="none"))
    except ValueError as err:  # peft: a name that matches no layer, or a layer type it cannot adapt
        fail(f"--target-modules {','.join(args.target_modules)} does not fit this UNet "
             f"({str(err).strip().splitlines()[0][:200]}); pass names of its Linear or Conv2d layers, "
             "e.g. to_q,to_k,to_v,to_out.0")
    # fp16 trainable weights would make the grad scaler fail ("Attempting to unscale FP16 gradients").
    cast_training_params(unet, dtype=torch.float32)
    if args.gradient_checkpointing:
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
    state, alpha, tensors = get_peft_model_state_dict(unet), float(unet.peft_config["default"].lora_alpha), {}
    for kohya_key, peft_key in peft_key_of_kohya(unet).items():
        tensors[kohya_key] = state[peft_key].detach().float().cpu().contiguous()
        tensors[kohya_key.rsplit(".lora_", 1)[0] + ".alpha"] = torch.tensor(alpha)  # not shared: safetensors refuses
    return tensors


def peft_key_of_kohya(unet):
    """{kohya tensor name: the UNet adapter's PEFT state-dict key}: the naming kohya_lora_tensors writes and init_lora
    reads back (built from the UNet, since underscores in kohya names are ambiguous)."""
    names = {}
    for key in get_peft_model_state_dict(unet):
        module, kind = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key).groups()
        names[f"lora_unet_{module.replace('.', '_')}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = key
    return names


def save_lora(unet, directory, kohya_keys=None):
    """pytorch_lora_weights.safetensors with its adapter config (so it reloads at its trained strength), and with
    kohya_keys (kohya_metadata's ss_* keys) the same LoRA for AUTOMATIC1111/Forge/ComfyUI; each written atomically."""
    config = unet.peft_config["default"]
    adapter = config.to_dict()  # without lora_alpha diffusers assumes alpha = r: half strength
    # Dropout only acts in training; loaded layers come up in train mode, so keeping it would make inference random.
    # The trained value is kept beside it, under its own key.
    adapter["lora_dropout"] = 0.0
    adapter = {f"unet.{key}": sorted(value) if isinstance(value, set) else value for key, value in adapter.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, indent=2, sort_keys=True),
                "training_lora_dropout": str(config.lora_dropout)}
    write_atomically(Path(directory) / LORA_FILE, safetensors.torch.save(diffusers_lora_tensors(unet), metadata))
    if kohya_keys is not None:
        tensors = kohya_lora_tensors(unet)
        model_hash, legacy_hash = addnet_hashes(tensors, kohya_keys)
        write_atomically(Path(directory) / KOHYA_FILE, safetensors.torch.save(tensors, {
            "format": "pt", **kohya_keys, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}))


def kohya_metadata(args, unet, captions_per_image, dataset_label):
    """The ss_* keys kohya's sd-scripts writes (train_network.py) that AUTOMATIC1111's Lora extension shows: its name
    (ss_output_name, the output folder's), its tags with their counts over the training images (ss_tag_frequency:
    each caption split at commas, stripped and lower-cased, kohya's rule), resolution, image count, base model (a
    single file: its name and kohya's two hashes of it, see model_file_hashes), network shape. Values are strings, as
    kohya writes them."""
    tags = {}
    for caption in captions_per_image:
        for tag in caption.split(","):
            if tag.strip():
                tags[tag.strip().lower()] = tags.get(tag.strip().lower(), 0) + 1
    model = args.model_id
    config = unet.peft_config["default"]
    base_model_hashes = {}
    if Path(model).is_file():
        try:
            base_model_hashes["ss_sd_model_hash"], base_model_hashes["ss_new_sd_model_hash"] = model_file_hashes(model)
        except OSError:  # the file went away during training: its name alone, as for a folder
            pass
    return {"ss_output_name": Path(args.output_dir).resolve().name,
            "ss_tag_frequency": json.dumps({dataset_label: tags}),
            "ss_resolution": str((args.resolution, args.resolution)),
            "ss_num_train_images": str(len(captions_per_image)),
            "ss_sd_model_name": Path(model).name if Path(model).exists() else model, **base_model_hashes,
            "ss_base_model_version": "sd_v1", "ss_v2": "False",
            "ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
            "ss_network_alpha": str(float(config.lora_alpha)), "ss_network_dropout": str(config.lora_dropout),
            "ss_network_args": json.dumps({"target_modules": sorted(config.target_modules)}),
            "ss_caption_dropout_rate": str(args.caption_dropout),
            "ss_training_comment": "quest_7_2.py: a LoRA on the UNet of a Stable Diffusion v1.x model"}


def model_file_hashes(path):
    """(ss_sd_model_hash, ss_new_sd_model_hash) of the base model file, as kohya's train_util.model_hash and
    calculate_sha256 compute them: the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (A1111's old
    model hash), and the SHA-256 of the whole file (A1111's and model sites' hash of a checkpoint)."""
    whole, legacy = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(0x100000)
        legacy.update(file.read(0x10000))
        file.seek(0)
        for block in iter(lambda: file.read(1 << 20), b""):
            whole.update(block)
    return legacy.hexdigest()[:8], whole.hexdigest()


def addnet_hashes(tensors, metadata):
    """(sshs_model_hash, sshs_legacy_hash) as kohya's train_util.precalculate_safetensors_hashes computes them: the
    file saved with only its ss_* metadata; the model hash is the SHA-256 of everything after the safetensors header
    (A1111's hashes.addnet_hash_safetensors, which it reads from sshs_model_hash instead of hashing the file), the
    legacy hash the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB."""
    data = safetensors.torch.save(tensors, {key: value for key, value in metadata.items() if key.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[header_end:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def load_lora(unet, directory):
    """Put the LoRA weights saved by save_lora back into the UNet's training adapter (for --resume). Read as the
    safetensors file checkpoint_damage checked, never through a loader that would fall back to a pickled .bin."""
    state_dict = safetensors.torch.load_file(Path(directory) / LORA_FILE)
    unet_state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state_dict), adapter_name="default")


def init_lora_file(path):
    """--init-lora: the file itself, or the diffusers file (else the kohya file) of an output folder."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in (LORA_FILE, KOHYA_FILE) if (path / name).is_file()), path / LORA_FILE)
    if not path.is_file():
        fail(f"--init-lora {path} is not a file; pass a {LORA_FILE} or {KOHYA_FILE}, or the folder holding one")
    try:  # the header only: a file that is no safetensors at all is refused before the model loads
        with safe_open(path, "pt") as file:
            file.keys()
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file raises several types
        fail(f"--init-lora {path} does not load as safetensors ({str(err).strip()[:200]}); pass a LoRA file this "
             "script wrote")
    return path


def init_lora(unet, path, args):
    """Start the adapter from a finished LoRA (this script's diffusers or kohya file) instead of zero. It must have
    this run's shape (--rank, --lora-alpha, --target-modules) and finite weights; otherwise one line says which."""
    try:
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
        tensors = safetensors.torch.load_file(path)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file raises several types
        fail(f"--init-lora {path} does not load as safetensors ({str(err).strip()[:200]}); pass a LoRA file this "
             "script wrote")
    expected = get_peft_model_state_dict(unet)
    fix = "pass a LoRA file this script wrote"
    if any(key.startswith("lora_unet_") for key in tensors):  # kohya: per-module alpha tensors
        alpha_tensors = {key: t for key, t in tensors.items() if key.endswith(".alpha")}
        bad = next((key for key, t in alpha_tensors.items() if t.numel() != 1 or t.dtype.is_complex), None)
        if bad:
            fail(f"--init-lora {path}: {bad} holds {alpha_tensors[bad].numel()} numbers, not one; {fix}")
        alphas = {float(t) for t in alpha_tensors.values()}
        kohya_names = peft_key_of_kohya(unet)
        found = {kohya_names.get(key, key): t for key, t in tensors.items() if not key.endswith(".alpha")}
    else:  # diffusers: unet.<module>.lora.down/up.weight, alpha in the adapter metadata
        adapter, problem = read_json(metadata.get("lora_adapter_metadata", "{}"))
        if problem or not isinstance(adapter, dict):
            fail(f"--init-lora {path}: its lora_adapter_metadata is not a JSON object ({problem or 'another type'}); "
                 f"{fix}")
        alpha = adapter.get("unet.lora_alpha", 1.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            fail(f"--init-lora {path}: its lora_adapter_metadata has a lora_alpha that is not a number "
                 f"({json.dumps(alpha)[:40]}); {fix}")
        alphas = {float(alpha)} if "unet.lora_alpha" in adapter else set()
        found = {re.sub(r"\.lora\.(down|up)\.weight$", lambda m: f".lora_{'A' if m[1] == 'down' else 'B'}.weight",
                        key.removeprefix("unet.")): t for key, t in tensors.items()}
    if set(found) != set(expected):
        fail(f"--init-lora {path} adapts other layers than this run ({len(set(found) ^ set(expected))} tensors "
             f"differ); pass the --target-modules and --model-id it was trained with")
    for key, tensor in found.items():
        shape, wanted, rank_axis = tuple(tensor.shape), tuple(expected[key].shape), 0 if "lora_A" in key else 1
        if shape == wanted:
            continue
        if len(shape) == len(wanted) and all(a == b for axis, (a, b) in enumerate(zip(shape, wanted))
                                             if axis != rank_axis):
            fail(f"--init-lora {path} has rank {shape[rank_axis]}; pass --rank {shape[rank_axis]}")
        fail(f"--init-lora {path}: {key} has shape {shape}, this run's UNet needs {wanted}; pass the --model-id "
             "it was trained with")
    if not all(math.isfinite(alpha) and alpha > 0 for alpha in alphas):
        fail(f"--init-lora {path} holds a lora_alpha that is not a positive finite number; {fix}")
    if alphas and alphas != {float(args.lora_alpha)}:
        fail(f"--init-lora {path} was trained with lora_alpha {min(alphas):g}; pass --lora-alpha {min(alphas):g}")
    set_peft_model_state_dict(unet, found, adapter_name="default")
    try:
        check_weights(unet, list(get_peft_model_state_dict(unet).values()), step=0)
    except Diverged as err:
        fail(f"--init-lora {path} is not usable ({str(err).replace(' at step 0', '')}); pass a LoRA from a run that "
             "did not diverge")


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


# ---------------------------------------------------------------- data
def visible_files(folder, keep):
    """The files under folder (subfolders included, hidden ones skipped) for which keep(path) holds, sorted; each
    checked to lie inside the folder (see check_inside)."""
    files = sorted(path for path in folder.rglob("*") if keep(path) and not path.is_dir()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    for path in files:
        check_inside(path, folder)
        if not path.is_file():  # skipping it would train on other images or captions than the user counted
            fail(f"{path} is not a regular file (a FIFO, a device or a broken link); replace it with the file, or "
                 "remove it")
    return files


def check_inside(path, folder):
    """Nothing outside --dataset-dir is read through a link: a caption linked to /proc/self/environ would put the
    environment, tokens included, into the metadata of the LoRA people share. Refused, not skipped, so that the run
    never trains on other images than the user counted; a link within the folder is fine."""
    target = os.path.realpath(path)
    if not Path(target).is_relative_to(os.path.realpath(folder)):
        fail(f"{path} is a link to {target}, outside --dataset-dir; copy the file into the folder (cp -L) or remove "
             "the link")


def find_images(dataset_dir):
    """The image files of datasetDir (sorted, subfolders included, hidden files skipped), or one clear line."""
    folder = Path(dataset_dir)
    if not folder.is_dir():
        fail(f"datasetDir '{dataset_dir}' is not a folder; pass --dataset-dir with your palette images")
    files = visible_files(folder, lambda path: path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        fail(f"no images found in datasetDir '{dataset_dir}'; put .png or .jpg files there")
    return files


def read_utf8(path, what):
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        fail(f"{what} {path} is not UTF-8 (byte 0x{err.object[err.start]:02x} at position {err.start}); save it as "
             "UTF-8 text")
    except OSError as err:
        fail(f"could not read {what} {path} ({err.strerror or err}); check the file")


def txt_caption(path, folder):
    """kohya's convention: image.txt beside image.png holds the image's caption, on its first line. It must be a
    regular file inside the dataset folder (a FIFO would block the read, a device never end it)."""
    check_inside(path, folder)
    if not path.is_file():
        fail(f"caption file {path} is not a regular file (a folder, a FIFO, a device or a broken link); replace it "
             "with a text file, or delete it (the image then gets --train-prompt)")
    lines = [line.strip() for line in read_utf8(path, "caption file").splitlines() if line.strip()]
    if not lines:
        fail(f"caption file {path} is empty; write the image's caption in it, or delete it (the image then gets "
             "--train-prompt)")
    check_text(lines[0], f"caption file {path}")
    return lines[0]


def caption_value(value, caption_column, where):
    """A caption cell as datasets holds it: a string, or a list of strings (the first is taken, as diffusers'
    train_text_to_image_lora.py does outside training)."""
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        value = value[0]
    if not isinstance(value, str):
        fail(f"{where} has a '{caption_column}' that is not a string ({json.dumps(value)[:60]}); write the caption "
             "as a JSON string")
    check_text(value, f"the caption in {where}")
    if not value.strip():  # the same rule as an empty .txt: a caption not yet written is not trained on silently
        fail(f"{where} has an empty caption; write the image's caption there (an image with no caption of its own "
             "gets --train-prompt)")
    return value.strip()


def metadata_captions(folder, images, caption_column):
    """datasets' imagefolder convention: a metadata.jsonl (in the folder or a subfolder) holds one JSON object per
    line, {"file_name": <image path relative to that metadata.jsonl>, "<caption column>": caption}. Every line is
    checked; a bad one ends the run naming the file and the line. Returns {image path: caption}."""
    known, captions = set(images), {}
    example = f'{{"file_name": "a.png", "{caption_column}": "a caption"}}'
    for metadata in visible_files(folder, lambda path: path.name == "metadata.jsonl"):
        for number, line in enumerate(read_utf8(metadata, "metadata file").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{metadata} line {number}"
            row, problem = read_json(line)
            if problem:
                fail(f"{where} is not JSON this script can read ({problem}); write one object per line, like {example}")
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                fail(f"{where} has no \"file_name\" string; write one object per line, like {example}")
            check_text(row["file_name"], f"the file_name in {where}")
            image = Path(os.path.normpath(metadata.parent / row["file_name"]))
            if image not in known:
                try:
                    inside = Path(os.path.realpath(image)).is_relative_to(os.path.realpath(folder))
                    what = (f"is outside the dataset folder {folder}" if not inside else
                            f"is not an image file in {metadata.parent}" if image.is_file() else
                            f"does not exist in {metadata.parent}")
                except OSError as err:  # a name longer than the file system takes
                    what = f"cannot be a file ({err.strerror or err})"
                fail(f"{where} names {row['file_name'][:80]}, which {what}; fix the file_name or remove the line")
            if caption_column not in row:
                fail(f"{where} has no '{caption_column}' column (it has {', '.join(map(str, row)) or 'none'}); "
                     "pass --caption-column with the one that holds the captions")
            if image in captions:
                fail(f"{where} names {row['file_name']} a second time; keep one line per image")
            captions[image] = caption_value(row[caption_column], caption_column, where)
    return captions


def read_folder(args):
    """(image paths, each one's caption, where the captions came from) for --dataset-dir. A caption comes from
    image.txt if there is one, else from a metadata.jsonl line, else it is --train-prompt."""
    files = find_images(args.dataset_dir)
    from_metadata = metadata_captions(Path(args.dataset_dir), files, args.caption_column)
    captions, sources = [], {"txt": 0, "metadata.jsonl": 0, "--train-prompt": 0}
    for path in files:
        if os.path.lexists(path.with_suffix(".txt")):
            captions.append(txt_caption(path.with_suffix(".txt"), Path(args.dataset_dir)))
            sources["txt"] += 1
        elif path in from_metadata:
            captions.append(from_metadata[path])
            sources["metadata.jsonl"] += 1
        else:
            captions.append(args.train_prompt)
            sources["--train-prompt"] += 1
    return files, captions, sources


def read_hub_dataset(args):
    """(each image as (name, file-like or path), each one's caption, where the captions came from) for
    --dataset-name, loaded as diffusers' train_text_to_image_lora.py loads it; offline or unknown: one line."""
    import datasets  # here, not at the top: it (and pyarrow) take ~0.6 s to import, and only --dataset-name uses it

    datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()
    name = args.dataset_name
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as err:  # noqa: BLE001 - offline, unknown name, no train split, a broken file: all one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        offline = isinstance(err, ConnectionError) or "offline" in reason.lower()
        fail(f"--dataset-name {name} could not be loaded ({reason}); "
             + ("connect to the internet (or unset HF_HUB_OFFLINE), or pass --dataset-dir with a local folder"
                if offline else "check the name, or pass --dataset-dir with a local folder"))
    for flag, column in (("--image-column", args.image_column), ("--caption-column", args.caption_column)):
        if column not in dataset.column_names:
            fail(f"--dataset-name {name} has no column '{column}' (it has {', '.join(dataset.column_names)}); "
                 f"pass {flag} with the right one")
    if len(dataset) == 0:
        fail(f"--dataset-name {name} has no rows in its train split; pass another dataset")
    dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))  # decoded and checked below
    sources, images, captions = {"--caption-column": 0, "--train-prompt": 0}, [], []
    for index, row in enumerate(dataset):
        cell = row[args.image_column]
        images.append((f"{name} row {index}", io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]))
        caption = row[args.caption_column]
        if caption is None:
            captions.append(args.train_prompt)
            sources["--train-prompt"] += 1
        else:
            captions.append(caption_value(caption, args.caption_column, f"--dataset-name {name} row {index}"))
            sources["--caption-column"] += 1
    return images, captions, sources


def to_rgb(image):
    """Any PIL mode as 8-bit RGB: 16-bit greyscale scaled down (not clipped to white), transparency over white."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise ValueError("it holds NaN or infinite pixel values")
        if image.mode == "F" and pixels.size and pixels.max() <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1]
        elif image.mode != "F" and (image.mode != "I" or (pixels.size and pixels.max() > 255)):
            pixels = pixels / 257.0  # 16 bits: 65535 -> 255
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(source, resolution, name=None):
    """One image (a path, or a file object called `name`) fully decoded, upright, RGB, resized and center-cropped;
    a bad file ends the run naming it."""
    name = source if name is None else name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()
                rgb = to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        fail(f"image {name} is too large to decode safely ({str(err).rstrip('.')}); shrink it or remove it "
             "from the dataset")
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files; every one means "corrupt"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        fail(f"image {name} is corrupt or not an image ({reason}); replace it or remove it from the dataset")
    return transforms.CenterCrop(resolution)(transforms.Resize(resolution)(rgb))


def load_palette(files, resolution):
    """Every image decoded up front, before any model loads: a bad file costs seconds, not a model load. files: paths,
    or (name, file object or path) pairs."""
    named = [(None, file) if isinstance(file, Path) else file for file in files]
    return [decode_image(source, resolution, name)
            for name, source in tqdm(named, desc="reading images", leave=False, disable=None)]


def caption_table(captions, args):
    """(the distinct final captions, each image's index into them, each image's final caption): the trigger word goes
    in front of every caption; with --caption-dropout the empty caption is appended as the last entry."""
    final = [f"{args.trigger_word}, {caption}" if args.trigger_word and caption else args.trigger_word or caption
             for caption in captions]
    distinct = list(dict.fromkeys(final))
    index = {caption: i for i, caption in enumerate(distinct)}
    return distinct + ([""] if args.caption_dropout else []), [index[caption] for caption in final], final


def caption_hash(final_captions):
    """A short fingerprint of every image's caption, in order: kept in each checkpoint, so that a resumed run can say
    when the captions changed since."""
    return hashlib.sha256(json.dumps(final_captions).encode()).hexdigest()[:16]


class Pixels(Dataset):
    """The decoded images as the spec's normalized tensors, each with its caption's index (--no-cache-latents)."""

    def __init__(self, images, caption_ids):
        self.images, self.caption_ids = images, caption_ids
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.to_tensor(self.images[index]), self.caption_ids[index]


@torch.no_grad()
def cache_latent_distributions(images, vae, device):
    """VAE posterior (mean, logvar) of every image, unflipped and flipped: [N, 2, 2*latent_channels, h, w] on CPU.

    Storing the distribution, not one sample, keeps the randomness of the uncached loop: each step still
    draws its own latent sample and its own flip."""
    pixels = Pixels(images, [0] * len(images))
    cache = []
    for index in tqdm(range(len(pixels)), desc="caching latents", leave=False, disable=None):
        image = pixels[index][0].to(device)
        cache.append(vae.encode(torch.stack([image, image.flip(-1)])).latent_dist.parameters.cpu())
    return torch.stack(cache)


def make_dataloader(images, caption_ids, vae, args, device):
    """Batches of (cached posteriors or pixels, caption index). The VAE is used here only when caching."""
    if args.cache_latents:
        dataset = TensorDataset(cache_latent_distributions(images, vae, device), torch.tensor(caption_ids))
    else:
        dataset = Pixels(images, caption_ids)
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


# ---------------------------------------------------------------- training
def check_planned_steps(args, image_count, num_processes):
    """--num-train-epochs over this many images must stay within MAX_STEPS optimizer steps, like --max-train-steps
    (which wins when given); said before the model loads."""
    batches = math.ceil(math.ceil(image_count / num_processes) / args.train_batch_size)
    steps = args.max_train_steps or args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps)
    if steps > MAX_STEPS:
        fail(f"--num-train-epochs {args.num_train_epochs} over {image_count} images is {steps} optimizer steps, more "
             f"than {MAX_STEPS}; pass fewer epochs, or --max-train-steps")


class Diverged(Exception):
    """The training loss, or the LoRA weights after an optimizer step, stopped being finite or blew up."""


def batch_posteriors(images, cached, vae):
    """The VAE posteriors of a batch after a random horizontal flip of each image. cached: `images` holds the
    posteriors of both flips, encoded once before training; else `images` holds pixels and the VAE encodes them now.
    Both paths draw the same random numbers, so caching changes the speed, not the training run."""
    flip = torch.randint(0, 2, (len(images),), device=images.device)
    if cached:  # [image, 2 flips, posterior parameters, h, w]
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


def check_weights(unet, lora_parameters, step):
    """Before anything is saved or rendered: the loss is computed before the optimizer step, so weights that blow up
    on the last step would pass a loss check. Finite is not enough: one step at a huge lr leaves finite weights whose
    product B @ A swamps the layer it adapts, so each adapted layer's update must stay within MAX_LORA_GROWTH times
    its frozen weight (bounded by the norms, ||B @ A|| <= ||B|| ||A||, so no product is formed)."""
    if not all_finite(lora_parameters):
        raise Diverged(f"the LoRA weights became NaN or infinite at step {step}")
    for name, layer in unet.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            bound = layer.scaling["default"] * (torch.linalg.norm(layer.lora_B["default"].weight.float())
                                                * torch.linalg.norm(layer.lora_A["default"].weight.float()))
            if not bound <= MAX_LORA_GROWTH * torch.linalg.norm(layer.base_layer.weight.float()):
                raise Diverged(f"the LoRA weights blew up at step {step} (the update of {name} is over "
                               f"{MAX_LORA_GROWTH:g}x the layer it adapts)")


def train(args, accelerator, unet, optimizer, dataloader, lora_parameters, noise_scheduler, text_embeddings, vae,
          latent_scale, start_step, loss_rows, validation_pipeline=None, captions_hash=None):
    """The spec's loop: latents, noise, noisy latents, UNet predicts the noise, MSE, step every N batches.

    text_embeddings[i] is caption i's embedding (computed once); vae encodes pixels when the latents are not cached
    (args.cache_latents); latent_scale is the VAE's scaling_factor. Checkpoints every --checkpointing-steps,
    validation images every --validation-every (with validation_pipeline); each checkpoint records captions_hash.
    Returns the run's figures; its loss rows continue `loss_rows`."""
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    step, loss_rows = start_step, list(loss_rows)
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
            for images, caption_ids in batches:
                with accelerator.accumulate(unet):
                    latents = batch_posteriors(images, args.cache_latents, vae).sample() * latent_scale
                    noise = torch.randn_like(latents)
                    if args.noise_offset:  # drawn only when asked for: the default run keeps the spec's random numbers
                        noise = noise + args.noise_offset * torch.randn(
                            (*latents.shape[:2], 1, 1), device=latents.device, dtype=latents.dtype)
                    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),),
                                              device=latents.device)
                    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                    if args.caption_dropout:  # drawn only when asked for, like the noise offset; "" is the last entry
                        dropped = torch.rand(len(caption_ids), device=caption_ids.device) < args.caption_dropout
                        caption_ids = torch.where(dropped, len(text_embeddings) - 1, caption_ids)
                    prediction = unet(noisy_latents, timesteps, text_embeddings[caption_ids]).sample
                    loss = training_loss(prediction, noise, timesteps, noise_scheduler, args.snr_gamma)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                batch_losses.append(loss.detach().float())
                if not accelerator.sync_gradients:
                    continue
                step += 1  # an optimizer step happened
                step_loss = accelerator.reduce(torch.stack(batch_losses).mean(), reduction="mean").item()
                batch_losses = []
                if not math.isfinite(step_loss):
                    raise Diverged(f"the training loss became {step_loss} at step {step}")
                loss_rows.append((step, step_loss))
                epoch_losses.append(step_loss)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}")
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    check_weights(accelerator.unwrap_model(unet), lora_parameters, step)
                    save_checkpoint(args, accelerator, step, loss_rows, captions_hash)
                if args.validation_every and step % args.validation_every == 0:
                    check_weights(accelerator.unwrap_model(unet), lora_parameters, step)
                    render_during_training(validation_pipeline, args, accelerator, unet, step)
                if step >= max_steps:
                    break
            if epoch_losses:
                epoch_loss = sum(epoch_losses) / len(epoch_losses)
                if accelerator.is_main_process:
                    tqdm.write(f"epoch {epoch + 1}/{num_epochs}: loss {epoch_loss:.4f}")
    finally:
        progress.close()
    check_weights(accelerator.unwrap_model(unet), lora_parameters, step)  # before the final save
    return {"steps": step, "epochsCompleted": step // steps_per_epoch, "finalLoss": epoch_loss, "lossRows": loss_rows}


# ---------------------------------------------------------------- checkpoints: written whole, read back checked
def checkpoint_step(path):
    """N for a folder named checkpoint-N as this script names them (ASCII digits, no leading zero), else None:
    str.isdigit would also take 'checkpoint-²', which int() refuses."""
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"([1-9][0-9]*)", Path(path).name)
    return int(match[1]) if match else None


def marker_problem(marker, step):
    """Why a checkpoint.json's content is not one this script wrote for `step` (types, ranges), or None."""
    if not isinstance(marker, dict):
        return "is not a JSON object"
    lora = marker.get("lora")
    fields = {"step": isinstance(marker.get("step"), int) and marker.get("step") == step,
              "lora": isinstance(lora, dict),
              "lora.r": isinstance(lora, dict) and type(lora.get("r")) is int and lora.get("r") >= 1,
              "lora.lora_alpha": isinstance(lora, dict) and type(lora.get("lora_alpha")) in (int, float)
              and math.isfinite(lora.get("lora_alpha")) and lora.get("lora_alpha") > 0,
              "lora.target_modules": isinstance(lora, dict) and isinstance(lora.get("target_modules"), list)
              and all(isinstance(name, str) and name for name in lora.get("target_modules")),
              "learningRate": type(marker.get("learningRate")) in (int, float)
              and math.isfinite(marker.get("learningRate")) and marker.get("learningRate") > 0,
              "numProcesses": type(marker.get("numProcesses")) is int and marker.get("numProcesses") >= 1,
              "modelId": isinstance(marker.get("modelId"), str)}
    wrong = [name for name, ok in fields.items() if not ok]
    return f"has a wrong or missing '{wrong[0]}'" if wrong else None


def torch_file_problem(path):
    """Why a checkpoint's optimizer.bin, scaler.pt or random_states_<rank>.pkl cannot be trusted, or None. Read with
    load_weights_only; the RNG states are tried on fresh generators, since accelerate.load_state skips RNG states it
    cannot set without a word, and a resumed run would then silently draw other numbers."""
    try:
        content = load_weights_only(path)
    except pickle.UnpicklingError as err:
        return (f"its {path.name} holds objects other than tensors and numbers (it asks for {pickle_culprit(err)}): "
                "loading it could run code, so it is not loaded")
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a damaged file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"its {path.name} does not load ({reason[:120]})"
    if not path.name.startswith("random_states_"):  # optimizer.bin, scaler.pt: state dicts
        keys = {"state", "param_groups"} if path.name == "optimizer.bin" else set()
        return None if isinstance(content, dict) and keys <= content.keys() else f"its {path.name} holds no state"
    try:
        random.Random().setstate(content["random_state"])
        np.random.RandomState().set_state(content["numpy_random_seed"])
        torch.Generator().set_state(content["torch_manual_seed"])
    except (TypeError, KeyError, ValueError, IndexError, RuntimeError) as err:
        return f"its {path.name} holds no usable random-number states ({str(err)[:80] or type(err).__name__})"
    return None


def checkpoint_damage(path):
    """Why the files of a checkpoint-N folder cannot be trusted (they are not regular files, do not load, could run
    code, or hold non-finite weights), or None. Read for content, not existence: a truncated file or a hand-edited
    marker is found here, not mid-resume. Every file is checked to be a regular file before it is opened: a FIFO
    would block the read forever."""
    rng_files = sorted(p.name for p in path.glob("random_states_*.pkl"))
    if "random_states_0.pkl" not in rng_files:
        return "it has no random_states_0.pkl"
    optional = [name for name in ("scaler.pt",) if os.path.lexists(path / name)]  # fp16 runs only
    for name in [CHECKPOINT_MARKER, LORA_FILE, "optimizer.bin", LOSS_LOG, *rng_files, *optional]:
        if not (path / name).is_file():
            return f"its {name} is missing or not a regular file (a folder, a FIFO or a device)"
    if list(path.glob("custom_checkpoint_*.pkl")):  # accelerate.load_state fails on any: this script registers none
        return "it holds custom_checkpoint files, which this script never writes"
    try:
        marker, problem = read_json((path / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        marker, problem = None, getattr(err, "strerror", None) or str(err)
    if problem:
        return f"its {CHECKPOINT_MARKER} does not load ({problem})"
    problem = marker_problem(marker, checkpoint_step(path))
    if problem:
        return f"its {CHECKPOINT_MARKER} {problem}"
    try:
        lora = safetensors.torch.load_file(path / LORA_FILE)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file raises several types
        return f"its {LORA_FILE} does not load ({str(err).strip().splitlines()[0] if str(err).strip() else err!r})"
    if not lora or not all_finite(lora.values()):
        return f"its {LORA_FILE} holds no weights or non-finite ones"
    for name in ["optimizer.bin", *rng_files, *optional]:
        problem = torch_file_problem(path / name)
        if problem:
            return problem
    return read_loss_csv(path / LOSS_LOG, checkpoint_step(path))[1]


def checkpoint_problem(path):
    """Why `path` is not a checkpoint-N this run can resume from (name, completeness, content, LoRA shape), or None."""
    path = Path(path)
    if not path.is_dir():
        return "is not a folder"
    if checkpoint_step(path) is None:
        if (path / CHECKPOINT_MARKER).is_file() or (path / "optimizer.bin").is_file():
            return f"is not named {CHECKPOINT_PREFIX}N (rename it back to the {CHECKPOINT_PREFIX}N it was saved as)"
        if (path / LORA_FILE).is_file() or (path / RESULT_FILE).is_file():
            return (f"is a final output folder, not a {CHECKPOINT_PREFIX}N (it holds no optimizer state); pass one "
                    f"of its {CHECKPOINT_PREFIX}N folders, or --resume latest with --output-dir {path}")
        return f"is not named {CHECKPOINT_PREFIX}N"
    if not (path / CHECKPOINT_MARKER).is_file():
        return (f"is not a complete checkpoint (no {CHECKPOINT_MARKER}: an interrupted write, or a checkpoint from an "
                "older version of this script)")
    damage = checkpoint_damage(path)
    return f"is damaged: {damage}" if damage else None


def shape_problem(path, args):
    """Why the intact checkpoint `path` holds a LoRA of another shape than this run's flags ask for, or None."""
    lora = json.loads((path / CHECKPOINT_MARKER).read_text(encoding="utf-8"))["lora"]
    for (key, wanted), flag in zip(lora_shape(args).items(), ("--rank", "--lora-alpha", "--target-modules")):
        if lora[key] != wanted:
            saved = ",".join(lora[key]) if isinstance(lora[key], list) else f"{lora[key]:g}"
            return f"holds a LoRA with {key} {saved}, this run asks for another; pass {flag} {saved}"
    return None


def checkpoint_folders(output_dir):
    """{step: folder} of every checkpoint-N folder in output_dir, complete or not (temp folders left out)."""
    folders = Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if Path(output_dir).is_dir() else []
    return {checkpoint_step(p): p for p in folders if checkpoint_step(p) is not None and p.is_dir()}


def finished_checkpoints(output_dir):
    """{step: folder} of the checkpoint-N folders in output_dir that were completed (their marker written last);
    temp folders and ones cut off by older versions are left out. Their content is checked only when used."""
    return {step: p for step, p in checkpoint_folders(output_dir).items() if (p / CHECKPOINT_MARKER).is_file()}


def check_no_other_run(args):
    """An output folder's checkpoint-N folders belong to one run, and only its newest is continued. A run that does
    not continue from there (no --resume, --resume from another folder, or from an earlier checkpoint-N while newer
    ones remain) is refused: its checkpoints would mix with the other ones, --checkpoints-total-limit could delete its
    own new ones as older, and a stop would name another run's as the one to resume. Refusing loses nothing; moving
    the old ones aside would change the user's folder unasked."""
    earlier = checkpoint_folders(args.output_dir)
    if not earlier or args.resume == "latest":
        return
    newest = earlier[max(earlier)]
    if args.resume is None or os.path.realpath(Path(args.resume).parent) != os.path.realpath(args.output_dir):
        fail(f"--output-dir {args.output_dir} holds {newest.name} of an earlier run, which this run's checkpoints "
             f"would mix with; pass --resume latest to continue that run, or another --output-dir (or delete its "
             f"{CHECKPOINT_PREFIX}N folders to start over there)")
    newer = [earlier[step].name for step in sorted(earlier) if step > (checkpoint_step(args.resume) or 0)]
    if newer:
        fail(f"--resume {args.resume}: {args.output_dir} also holds newer checkpoints ({', '.join(newer)}), which "
             f"this run's would mix with; to go back to {Path(args.resume).name}, delete them (or copy it into "
             "another --output-dir and resume there); to continue the newest, pass --resume latest")


def newest_intact_checkpoint(output_dir):
    """(the newest finished checkpoint that passes checkpoint_problem or None, [(newer folder, its problem)])."""
    skipped = []
    for step, folder in sorted(finished_checkpoints(output_dir).items(), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def resume_checkpoint(args):
    """The folder --resume names (checked in check_args), the newest intact one for 'latest', or None. A damaged
    newest checkpoint is never skipped silently: the run stops and names the newest intact one."""
    if args.resume is None:
        return None
    if args.resume != "latest":
        return Path(args.resume)
    intact, skipped = newest_intact_checkpoint(args.output_dir)
    if skipped:
        folder, problem = skipped[0]
        instead = (f"delete it (and any other damaged one newer than {intact.name}), and --resume latest continues "
                   f"from the newest intact one, {intact}" if intact is not None
                   else f"no intact checkpoint is left: delete the {CHECKPOINT_PREFIX}N folders to start again")
        fail(f"--resume latest: the newest checkpoint {folder} {problem}; {instead}")
    problem = intact and shape_problem(intact, args)
    if problem:
        fail(f"--resume latest: {intact} {problem}")
    return intact


def resume(checkpoint, args, accelerator, unet, optimizer, captions_hash=None):
    """Restore a checkpoint into the prepared UNet, optimizer and RNGs; returns (its step, its loss rows). A note says
    when the captions it was trained on (captions_hash, see caption_hash) changed since."""
    if checkpoint is None:
        if args.resume == "latest" and accelerator.is_main_process:
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
    if not (checkpoint / f"random_states_{accelerator.process_index}.pkl").is_file():
        fail(f"--resume {checkpoint} was written by fewer processes than this run's {accelerator.num_processes}; "
             "resume with as many processes as it was saved with")
    if accelerator.scaler is not None and not (checkpoint / "scaler.pt").is_file():
        fail(f"--resume {checkpoint} was not trained with --mixed-precision fp16 (it has no scaler.pt); resume with "
             "the --mixed-precision it was trained with (no or bf16)")
    marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    try:
        accelerator.load_state(str(checkpoint))
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as err:  # e.g. an optimizer state of other shapes
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        fail(f"--resume {checkpoint} does not load into this run ({reason}); pass a checkpoint this script wrote "
             "with the same flags")
    for group in optimizer.param_groups:  # the optimizer state brings its learning rate back: the flag wins
        group["lr"] = args.learning_rate
    if marker["learningRate"] != args.learning_rate and accelerator.is_main_process:
        tqdm.write(f"note: {checkpoint.name} was trained with --learning-rate {marker['learningRate']}; "
                   f"continuing with {args.learning_rate}")
    if marker.get("captionsHash", captions_hash) != captions_hash and accelerator.is_main_process:  # older: no hash
        tqdm.write(f"note: the captions (or the images they belong to) changed since {checkpoint.name} was saved; "
                   "training continues on the new ones")
    step = checkpoint_step(checkpoint)
    if accelerator.is_main_process:
        tqdm.write(f"resumed from {checkpoint} (step {step})")
    return step, read_loss_csv(checkpoint / LOSS_LOG, step)[0]


def save_checkpoint(args, accelerator, step, loss_rows, captions_hash=None):
    """checkpoint-N, written as .checkpoint-N.tmp and renamed when complete: a folder named checkpoint-N is always
    whole, and --resume latest never picks a half-written one. Keeps --checkpoints-total-limit folders, counting only
    those up to this step: newer ones (left by a run resumed from an earlier checkpoint) never push this one out."""
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
            marker = {"step": step, "lora": lora_shape(args), "learningRate": args.learning_rate,
                      "numProcesses": accelerator.num_processes,
                      "modelId": args.model_id, "captionsHash": captions_hash}
            write_atomically(tmp / CHECKPOINT_MARKER, json.dumps(marker, indent=2).encode())
            if final.exists():  # e.g. a run started again in the same output folder
                old = output_dir / f".{CHECKPOINT_PREFIX}{step}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
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
            kept = sorted((old_step, folder) for old_step, folder in finished_checkpoints(output_dir).items()
                          if old_step <= step)
            for old_step, folder in kept[:-args.checkpoints_total_limit]:
                shutil.rmtree(folder, ignore_errors=True)
        tqdm.write(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


def what_was_kept(output_dir):
    """The line a stopped run ends with: the newest intact checkpoint and how to continue from it."""
    intact, skipped = newest_intact_checkpoint(output_dir)
    if intact is None:
        return "no checkpoint was kept (pass --checkpointing-steps N to keep progress); " + how_to_run_again(output_dir)
    how = ("run the same command with --resume latest" if not skipped else
           f"delete the damaged {', '.join(folder.name for folder, _ in skipped)} and run the same command with "
           "--resume latest")
    return f"the newest checkpoint is {intact}: {how} to continue"


def how_to_run_again(output_dir):
    """The same command again, as check_no_other_run lets it run: with --resume latest once the output folder holds
    checkpoints (at the last step it trains nothing more and writes the final files)."""
    if not checkpoint_folders(output_dir):
        return "run the same command again"
    if newest_intact_checkpoint(output_dir)[0] is None:
        return f"delete the {CHECKPOINT_PREFIX}N folders in {output_dir} (none is intact), then run the same command"
    return "run the same command again with --resume latest"


def stop_interrupted(stop, what_was_kept_line):
    """exit_interrupted on the first process; under torchrun every process gets the signal, and one line is enough."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.exit(128 + (stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT))
    exit_interrupted(stop, what_was_kept_line)


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


def training_validation_pipeline(args, accelerator, unet, text_encoder, vae, tokenizer):
    """For --validation-every: a pipeline around the training UNet itself (first process only), or None."""
    if not (args.validation_every and accelerator.is_main_process):
        return None
    pipeline = stable_diffusion_pipeline(args.model_id, args.model_config, unet=accelerator.unwrap_model(unet),
                                         text_encoder=text_encoder, vae=vae, tokenizer=tokenizer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render_during_training(pipeline, args, accelerator, unet, step):
    """validation/step-<N>_<i>.png from the training UNet with its adapter switched off and on, in eval mode, under
    the training autocast, with the global RNG untouched (turning this on does not change the training run)."""
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        folder = Path(args.output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices), accelerator.autocast():
                for index, prompt in enumerate(args.validation_prompts):
                    render_side_by_side(pipeline, args, accelerator.device,
                                        lambda on: model.enable_adapters() if on else model.disable_adapters(),
                                        prompt, folder / f"step-{step}_{index}.png")
        finally:
            model.enable_adapters()
            model.train()
        tqdm.write(f"validation images for step {step} in {folder}")
    accelerator.wait_for_everyone()


def render_validation_images(args, output_dir, accelerator):
    """Each prompt without and with the LoRA, loaded from the saved file the way users load it."""
    pipeline = stable_diffusion_pipeline(args.model_id, args.model_config,
                                         dtype=weight_dtype(accelerator)).to(accelerator.device)
    pipeline.load_lora_weights(output_dir)
    pipeline.set_progress_bar_config(disable=True)

    def set_lora(on):
        pipeline.enable_lora() if on else pipeline.disable_lora()

    prompts = tqdm(args.validation_prompts, desc="validation images", leave=False, disable=None)
    return [render_side_by_side(pipeline, args, accelerator.device, set_lora, prompt,
                                output_dir / f"validation_{i}.png") for i, prompt in enumerate(prompts)]


# ---------------------------------------------------------------- artifacts: the loss log and its plot
def loss_csv(rows):
    lines = ["step,loss"] + [f"{step},{loss:.6g}" for step, loss in rows]
    return ("\n".join(lines) + "\n").encode()


def read_loss_csv(path, up_to_step):
    """(the rows of a checkpoint's loss log up to its step, None), or ([], why it is not one this script wrote)."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            rows = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(file)]
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as err:
        return [], f"its {LOSS_LOG} does not load ({getattr(err, 'strerror', None) or err})"
    if any(not (1 <= step <= up_to_step and math.isfinite(loss)) for step, loss in rows):
        return [], f"its {LOSS_LOG} holds a step outside 1..{up_to_step} or a non-finite loss"
    return rows, None


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


def remove_earlier_result(output_dir):
    """An earlier run's result.json describes the LoRA this run is about to replace: it goes first, so that a failure
    while writing or rendering cannot leave it claiming success beside the new files."""
    try:
        (output_dir / RESULT_FILE).unlink(missing_ok=True)
    except OSError as err:
        fail(f"could not remove the earlier {output_dir / RESULT_FILE} ({err.strerror or err}); remove it yourself "
             "or pass another output folder")


def quiet_libraries():
    """Weight-loading bars would bury the one line a failure prints (info logs are off since the imports)."""
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------- files read back without running code
# .ckpt models and checkpoints' optimizer and RNG files are pickles, and unpickling can run any code a file names.
# torch's weights-only unpickler builds tensors and plain containers only; it may also rebuild what these files hold
# besides: numpy's scalars, arrays and dtypes (RNG states; Lightning's callback state in SD .ckpt files, under numpy
# 1.x's names too) and the one Lightning class name SD .ckpt files carry. AUTOMATIC1111's modules/safe.py allows the
# same names. Nothing here runs code; a pickle that names anything else is refused.
class LightningCallbackName:
    """SD .ckpt files written by the original (PyTorch Lightning) training code may name pytorch_lightning's
    ModelCheckpoint class in their callback state: the weights-only unpickler maps that name to this empty class, so
    pytorch_lightning is never imported."""

    def __init__(self, *args, **kwargs):
        pass


SAFE_PICKLE_GLOBALS = [
    np.ndarray, np.dtype, *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")),
    *((function, f"numpy.{core}.multiarray.{function.__name__}")
      for function in (np._core.multiarray.scalar, np._core.multiarray._reconstruct) for core in ("core", "_core")),
    (LightningCallbackName, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def load_weights_only(path, mmap=False):
    """torch.load that runs no code (see SAFE_PICKLE_GLOBALS): a pickle naming anything else raises
    pickle.UnpicklingError, whose culprit pickle_culprit names."""
    with torch.serialization.safe_globals(SAFE_PICKLE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def pickle_culprit(err):
    """What a refused pickle asked for (e.g. posix.system), from the weights-only unpickler's message."""
    called = re.search(r"GLOBAL ([\w.]+)", str(err))
    return called[1] if called else "objects other than tensors and numbers"


# ---------------------------------------------------------------- the model file: checked before anything loads
def read_ckpt(path):
    """A .ckpt's state dict, unpickled by torch's weights-only unpickler (tensors and plain containers; memory-mapped
    when it is a zip): a pickle that would call code is refused, naming what it would call."""
    try:
        checkpoint = load_weights_only(path, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        fail(f"--model-id {path} is a .ckpt whose pickle would run code ({pickle_culprit(err)}), so it was not loaded; "
             "use the model's .safetensors file, or a .ckpt from a source you trust")
    except Exception as err:  # noqa: BLE001 - a truncated zip, a text file, an old pickle: several types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        fail(f"--model-id {path} does not load as a .ckpt ({reason}): truncated, or not a PyTorch checkpoint; "
             "download it again or pass the model's .safetensors file")
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # Lightning's files keep the weights under state_dict
    return checkpoint if isinstance(checkpoint, dict) else {}


def checkpoint_shapes(path):
    """{tensor name: shape} of a single-file checkpoint: a .safetensors file's header alone (no weight is read), or the
    tensors of a .ckpt read by read_ckpt. Anything unreadable ends in one line."""
    path = Path(path)
    if not path.is_file():
        fail(f"--model-id {path} is not a file; pass the path of your model's .safetensors or .ckpt file, a diffusers "
             "folder or a hub id")
    if path.suffix.lower() == ".ckpt":
        return {key: tuple(value.shape) for key, value in read_ckpt(path).items() if isinstance(value, torch.Tensor)}
    try:
        with safe_open(path, "pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors reports a bad header, a short file, ... as several types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        fail(f"--model-id {path} is not a readable safetensors file ({reason}): truncated, or not a model at all; "
             "download it again or pass another file")


def not_sd_v1(shapes):
    """Why a single file's tensors are not an SD v1.x checkpoint in the original (LDM) layout, saying what it looks
    like, or None. The names are the ones diffusers' single_file_utils and A1111 tell the model families by."""
    def has(prefix):
        return any(name.startswith(prefix) for name in shapes)

    if any(name.startswith(("lora_unet_", "lora_te")) or re.search(r"\.(lora_down|lora_A|lora\.down)\.", name)
           for name in shapes):
        return ("is a LoRA, not a model; pass the base model as --model-id (and the LoRA as --init-lora to keep "
                "training it)")
    if has("conditioner.embedders."):
        return ("looks like an SDXL checkpoint (conditioner.embedders.*); this quest trains SD v1.x: pass an SD v1.x "
                "file such as v1-5-pruned-emaonly.safetensors")
    if has("cond_stage_model.model."):
        return ("looks like an SD 2.x checkpoint (an OpenCLIP text encoder, cond_stage_model.model.*); this quest "
                "trains SD v1.x: pass an SD v1.x file such as v1-5-pruned-emaonly.safetensors")
    if not has("model.diffusion_model."):
        if has("encoder.conv_in.") and has("decoder.conv_out."):
            return "is a VAE alone; pass the whole SD v1.x checkpoint as --model-id (the VAE is inside it)"
        return ("holds no SD UNet (no model.diffusion_model.* tensors); pass an SD v1.x checkpoint in the original "
                "layout (A1111's, ComfyUI's), or a diffusers folder holding unet/, vae/ and text_encoder/")
    missing = [what for prefix, what in (("first_stage_model.", "VAE (first_stage_model.*)"),
                                         ("cond_stage_model.transformer.", "CLIP text encoder "
                                                                           "(cond_stage_model.transformer.*)"))
               if not has(prefix)]
    if missing:
        return (f"holds a UNet but no {' and no '.join(missing)}; pass a complete SD v1.x checkpoint (UNet, VAE and "
                "text encoder in one file)")
    if has("cond_stage_model.transformer.embeddings."):
        return ("keeps its text encoder in an old key layout (cond_stage_model.transformer.embeddings.*, without "
                "text_model.), which diffusers cannot read; save it again with a current tool (A1111's checkpoint "
                "merger renames these keys) or pass a diffusers folder of the model")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", ())
    if len(conv_in) == 4 and conv_in[1] != 4:
        return (f"has a UNet with {conv_in[1]} input channels (an inpainting or instruct-pix2pix model); this quest "
                "trains text-to-image SD v1.x models, which take 4")
    return None


def model_config_dir(model_config):
    """The folder whose configs and tokenizer a single-file model is built with: --model-config's folder, or its hub id
    (or, without it, diffusers' default SD_V1_CONFIG) fetched without weights into the Hugging Face cache."""
    if model_config is not None and Path(model_config).is_dir():
        return Path(model_config)
    repo = model_config or SD_V1_CONFIG
    try:
        return Path(snapshot_download(repo, allow_patterns=CONFIG_FILES))
    except (OSError, ValueError) as err:  # offline and not cached, no network, an unknown or malformed id
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0].rstrip(".")[:160]
        if model_config is not None:
            fail(f"--model-config {model_config} is neither a folder nor a hub id that could be fetched ({reason}); "
                 "pass a diffusers-format SD v1.x folder")
        fail(f"a single-file --model-id needs the configs and tokenizer of SD v1.x, and diffusers' default, "
             f"{repo}, is not cached and could not be fetched ({reason}); pass --model-config DIR, a diffusers-format "
             f"SD v1.x folder (weights not needed: `hf download {repo} --include '*.json' --include '*.txt' "
             "--local-dir sd15-config` where there is network)")


def config_misfit(shapes, config_dir):
    """Why the configs in config_dir build a UNet, VAE or text encoder of another size than the file's weights, or
    None: tensors and numbers counted per part, the models built on the meta device (nothing is allocated). Files
    often carry extra tensors that diffusers ignores when it loads them (a text_projection, an EMA copy under another
    prefix): a part with more tensors than its config builds is left to the loader, which names any real misfit."""
    parts = (("unet", "model.diffusion_model.", UNet2DConditionModel), ("vae", "first_stage_model.", AutoencoderKL),
             ("text_encoder", "cond_stage_model.transformer.", CLIPTextModel))
    for part, prefix, model_class in parts:
        try:
            with init_empty_weights():
                config = (CLIPTextConfig.from_pretrained(config_dir, subfolder=part) if part == "text_encoder"
                          else model_class.load_config(config_dir, subfolder=part))
                model = model_class(config) if part == "text_encoder" else model_class.from_config(config)
        except (OSError, ValueError, TypeError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            return f"is not a diffusers-format SD v1.x folder ({part}: {reason})"
        expected = [tensor.numel() for tensor in model.state_dict().values()]
        found = [math.prod(shape) for name, shape in shapes.items()
                 if name.startswith(prefix) and not name.endswith(".position_ids")]  # a buffer, not a weight
        if len(found) < len(expected) or len(found) == len(expected) and sum(found) != sum(expected):
            return (f"builds a {part} of {len(expected)} tensors ({sum(expected):,} numbers), the file holds "
                    f"{len(found)} ({sum(found):,})")
    return None


def check_model_file(model_id, model_config):
    """Before anything is loaded: a single-file --model-id must be an SD v1.x checkpoint, read from its tensor list, and
    its configs (--model-config, or diffusers' default) must fit its weights. A hub id or folder is loaded as it is."""
    if not is_single_file(model_id):
        return
    suffix = Path(model_id).suffix
    if suffix.lower() not in SINGLE_FILE_SUFFIXES:
        fail(f"--model-id {model_id} is a file but neither .safetensors nor .ckpt; pass an SD v1.x checkpoint file "
             "(A1111's, ComfyUI's), a diffusers folder or a hub id")
    if suffix not in SINGLE_FILE_SUFFIXES:  # diffusers tells the formats by the lower-case suffix alone
        fail(f"--model-id {model_id}: diffusers reads only lower-case {suffix.lower()} names; rename the file to "
             f"{Path(model_id).with_suffix(suffix.lower()).name}")
    shapes = checkpoint_shapes(model_id)
    problem = not_sd_v1(shapes)
    if problem:
        fail(f"--model-id {model_id} {problem}")
    misfit = config_misfit(shapes, model_config_dir(model_config))
    if misfit:
        fail(f"--model-config {model_config or SD_V1_CONFIG} {misfit}; pass --model-config with the diffusers-format "
             f"folder of the SD v1.x model {Path(model_id).name} was made from")


# ---------------------------------------------------------------- main: the quest's acts
def main(argv=None):
    args = parse_args(argv)  # every flag, the --config file and the output folder checked before any work
    quiet_libraries()
    device = pick_device(args.device)
    output_dir = Path(args.output_dir)
    checkpoint = resume_checkpoint(args)  # a damaged --resume latest is found before the model loads
    check_model_file(args.model_id, args.model_config)  # a single file's kind and configs, from its tensor list

    # Act 1: the images and their captions, every image decoded before the model loads (a bad file costs seconds).
    files, captions, sources = read_hub_dataset(args) if args.dataset_name else read_folder(args)
    images = load_palette(files, args.resolution)
    distinct_captions, caption_ids, final_captions = caption_table(captions, args)
    accelerator = make_accelerator(args, device)
    check_planned_steps(args, len(images), accelerator.num_processes)
    if accelerator.is_main_process:
        print(f"{len(images)} images, {len(set(final_captions))} distinct captions ("
              + ", ".join(f"{count} from {source}" for source, count in sources.items() if count) + ")")
    # Per-process seeds (seed + rank) give each GPU its own noise; rank 0 is the plain seed, so 1 device = --seed.
    set_seed((args.seed + accelerator.process_index) % 2**32)

    # Act 2: the frozen model; what is fixed (text embeddings, VAE latents) is computed once and freed.
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(args.model_id, args.model_config)
    check_model_parts_fit(tokenizer, text_encoder, vae, unet, args.model_id)
    check_resolution_fits(args.resolution, vae, args.model_id)
    text_embeddings = embed_captions(tokenizer, text_encoder, distinct_captions, accelerator.device)
    vae.to(accelerator.device)  # fp32: it only encodes, and an fp16 VAE can overflow into NaN
    latent_scale = vae.config.scaling_factor
    dataloader = make_dataloader(images, caption_ids, vae, args, accelerator.device)
    keep_for_validation = args.validation_every is not None and accelerator.is_main_process
    if not keep_for_validation:
        tokenizer = text_encoder = None  # used once: their memory goes to the UNet
    if args.cache_latents and not keep_for_validation:
        vae = None  # cached: a step runs the UNet alone
    accelerator.free_memory()

    # Act 3: LoRA adapters on the frozen UNet (from zero, --init-lora or a checkpoint), trained with checkpoints.
    lora_parameters = add_lora(unet, args, accelerator)
    if args.init_lora:
        init_lora(unet, init_lora_file(args.init_lora), args)
    # Every input is checked by now; from here on nothing fails on user input.
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.learning_rate)
    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    checkpoint_only_lora(accelerator)
    captions_hash = caption_hash(final_captions)  # kept in each checkpoint: a resume says when the captions changed
    start_step, loss_rows = resume(checkpoint, args, accelerator, unet, optimizer, captions_hash)
    validation_pipeline = training_validation_pipeline(args, accelerator, unet, text_encoder, vae, tokenizer)
    try:
        stats = train(args, accelerator, unet, optimizer, dataloader, lora_parameters, noise_scheduler,
                      text_embeddings, vae, latent_scale, start_step, loss_rows, validation_pipeline, captions_hash)
    except Diverged as err:
        scale = args.lora_alpha / args.rank  # each update is scaled by alpha / r: a large one amplifies every step
        also = f" or --lora-alpha (alpha / rank is {scale:g})" if scale > 4 else ""
        fail(f"{err}; lower --learning-rate (it is {args.learning_rate:g}){also} and {how_to_run_again(output_dir)}; "
             "the LoRA was not saved and nothing was written over earlier outputs")
    except KeyboardInterrupt as stop:
        stop_interrupted(stop, what_was_kept(output_dir))
    accelerator.wait_for_everyone()

    # Act 4: the LoRA in both layouts, the loss log, the validation images from the saved file, and the result last:
    # result.json and the JSON line say success only once every promised file is there.
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_earlier_result(output_dir)
        model = accelerator.unwrap_model(unet)
        dataset = Path(args.dataset_name or args.dataset_dir)  # kohya keys the tag counts by the folder's name
        dataset_label = dataset.resolve().name if dataset.exists() else args.dataset_name
        result = {"success": True, "outputDir": str(output_dir.resolve()), "epochsCompleted": stats["epochsCompleted"],
                  "finalLoss": None if stats["finalLoss"] is None else round(stats["finalLoss"], 6),
                  "steps": stats["steps"]}
        try:  # each file whole (atomic)
            save_lora(model, output_dir, kohya_metadata(args, model, final_captions, dataset_label))
            write_loss_log(output_dir, stats["lossRows"])
        except KeyboardInterrupt as stop:
            stop_interrupted(stop, f"stopped while writing the LoRA files in {output_dir}; "
                                   f"{what_was_kept(output_dir)}")
        del unet, model, optimizer, validation_pipeline
        text_encoder = vae = None
        accelerator.free_memory()
        unfinished = f"the LoRA files and the loss log in {output_dir} are complete, but not {RESULT_FILE}"
        try:
            validation = render_validation_images(args, output_dir, accelerator) if args.validation_prompts else []
            write_atomically(output_dir / RESULT_FILE, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
        except KeyboardInterrupt as stop:
            stop_interrupted(stop, f"{unfinished} or the validation images; {how_to_run_again(output_dir)} for them")
        except (RuntimeError, ValueError, OSError) as err:  # e.g. out of memory while rendering
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            fail(f"the validation images could not be rendered ({reason}); {unfinished}: "
                 f"{how_to_run_again(output_dir)}, with fewer or no --validation-prompts")
        written = [LORA_FILE, KOHYA_FILE, LOSS_LOG, LOSS_PLOT, *(path.name for path in validation), RESULT_FILE]
        print(f"wrote {', '.join(written)} to {output_dir}")
        print(json.dumps(result, allow_nan=False))
    accelerator.end_training()


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


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:
        exit_interrupted(stop, "nothing new was written; run the same command again")
    except BrokenPipeError:  # stdout closed early by the program reading it
        exit_closed_pipe()
