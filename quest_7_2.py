"""Quest 7.2 - the artist's seal: teach a Stable Diffusion v1.x UNet a palette with LoRA.

Point the script at a folder of images and a Stable Diffusion v1.x model (a hub id or a local
folder). It freezes the whole model, adds small LoRA matrices (r=16, alpha=32) to the UNet's
attention projections and trains only those on the images, all captioned with one fixed prompt.
The result is a few megabytes that any diffusers user loads with
`StableDiffusionPipeline.load_lora_weights(outputDir)`.

The spec's settings come as a JSON object (--config, inline or a file) or as kebab-case flags;
flags win. Memory is the point of the quest, so what is fixed is computed once and freed: the
prompt's text embedding, and the VAE latents of every image (both flips), so a training step
runs the UNet alone. On CUDA the frozen UNet is kept in fp16 and only the LoRA weights in fp32.

    python quest_7_2.py --dataset-dir my_palette --output-dir artist_seal
    accelerate launch quest_7_2.py --config settings.json      # several GPUs, same script
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import datasets
import diffusers
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

# The spec's JSON keys, in the order it lists them; each maps to the flag of the same name in kebab case.
SPEC_KEYS = ("datasetDir", "outputDir", "modelId", "resolution", "trainBatchSize",
             "gradientAccumulationSteps", "learningRate", "numTrainEpochs")
LORA_CONFIG = dict(r=16, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                   lora_dropout=0.05, bias="none")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for
CHECKPOINT_PREFIX = "checkpoint-"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends like every other bad input: one line on stderr, no usage dump."""

    def error(self, message):
        sys.exit(f"error: {message}; run with --help to see the flags")


def snake_case(key):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def parse_args(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="JSON_OR_PATH",
                        help=f"the spec's settings as a JSON object, inline or in a file; keys: "
                             f"{', '.join(SPEC_KEYS)}. Flags given on the command line win over it")
    parser.add_argument("--dataset-dir", default="../Quest_1/generated_palette", help="folder of training images")
    parser.add_argument("--output-dir", default="artist_seal", help="where the LoRA, result.json and checkpoints go")
    parser.add_argument("--model-id", default="CompVis/stable-diffusion-v1-4",
                        help="Stable Diffusion v1.x model: a hub id or a local folder in diffusers layout")
    parser.add_argument("--resolution", type=int, default=256, help="images are resized and center-cropped to this")
    parser.add_argument("--train-batch-size", type=int, default=1, help="images per step and device")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=4,
                        help="batches whose gradients add up before one optimizer step")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate of the LoRA weights")
    parser.add_argument("--num-train-epochs", type=int, default=100, help="passes over the images")
    parser.add_argument("--max-train-steps", type=int, help="stop after this many optimizer steps (overrides epochs)")
    parser.add_argument("--train-prompt", default="a painting in the artist's palette",
                        help="the one caption every training image gets")
    parser.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=True,
                        help="encode every image (both flips) with the VAE once before training, then free the VAE")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute UNet activations in the backward pass: less memory, slower steps")
    parser.add_argument("--checkpointing-steps", type=int,
                        help="save a resumable checkpoint-N folder in the output dir every N optimizer steps")
    parser.add_argument("--resume", metavar="CHECKPOINT_DIR|latest",
                        help="continue from a checkpoint folder, or from the newest one in the output dir")
    parser.add_argument("--validation-prompts", nargs="+", default=[], metavar="PROMPT",
                        help="after training, render each prompt without and with the LoRA into validation_<i>.png")
    parser.add_argument("--validation-steps", type=int, default=30, help="denoising steps per validation image")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: CUDA when available (fp16 frozen weights), else CPU (fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seeds LoRA init, data order, noise and timesteps")
    args = parser.parse_args(argv)
    if args.config is not None:
        parser.set_defaults(**read_config(args.config, parser))
        args = parser.parse_args(argv)  # again, so that flags typed on the command line win over the JSON

    for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
                 "num_train_epochs", "max_train_steps", "checkpointing_steps", "validation_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be positive, got {value}; pass a number above 0")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        sys.exit(f"error: --output-dir '{args.output_dir}' is a file; pass a folder path (it is created at the end)")
    if args.resume not in (None, "latest") and not (Path(args.resume) / LORA_FILE).is_file():
        sys.exit(f"error: --resume '{args.resume}' holds no {LORA_FILE}; "
                 f"pass a {CHECKPOINT_PREFIX}N folder written by --checkpointing-steps, or 'latest'")
    return args


def read_config(text_or_path, parser):
    """The spec's JSON object, checked key by key, as argparse defaults."""
    try:
        text = text_or_path if text_or_path.lstrip().startswith("{") else Path(text_or_path).read_text()
        config = json.loads(text)
    except OSError as err:
        sys.exit(f"error: --config '{text_or_path}' is neither a JSON object nor a readable file ({err.strerror}); "
                 "pass an inline object like '{\"resolution\": 256}' or the path of a .json file")
    except json.JSONDecodeError as err:
        sys.exit(f"error: --config is not valid JSON ({err}); check quotes and commas")
    if not isinstance(config, dict):
        sys.exit("error: --config must hold a JSON object; wrap the settings in { }")
    defaults = {}
    for key, value in config.items():
        if key not in SPEC_KEYS:
            sys.exit(f"error: unknown key '{key}' in --config; use only {', '.join(SPEC_KEYS)} "
                     "(other settings are flags)")
        dest = snake_case(key)
        expected = type(parser.get_default(dest))
        allowed = (int, float) if expected is float else expected
        if isinstance(value, bool) or not isinstance(value, allowed):
            json_type = {str: "string", int: "integer", float: "number"}[expected]
            sys.exit(f"error: '{key}' in --config must be a JSON {json_type}, got {json.dumps(value)}; fix its value")
        defaults[dest] = expected(value)
    return defaults


# ---------------------------------------------------------------- device
def make_accelerator(args):
    """Accelerate as diffusers' example scripts use it: one device or `accelerate launch`, no config file needed."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda was requested but CUDA is not available here; use --device cpu or auto")
    on_cuda = args.device != "cpu" and torch.cuda.is_available()
    return Accelerator(
        cpu=args.device == "cpu",
        mixed_precision="fp16" if on_cuda else "no",  # fp16 is the quest's VRAM saver; CPU runs fp32
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # An epoch's order depends on (seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )


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
        sys.exit(f"error: could not load the Stable Diffusion model '{model_id}' ({reason}); "
                 "pass a hub id you can download (or have cached) or a local folder saved with save_pretrained")
    # transformers 5 builds a special-tokens-only tokenizer from a folder without tokenizer files instead of failing.
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        sys.exit(f"error: could not load the Stable Diffusion model '{model_id}' (its tokenizer has no vocabulary); "
                 "pass a complete SD v1.x model folder or hub id")
    if noise_scheduler.config.prediction_type != "epsilon":
        sys.exit(f"error: '{model_id}' predicts '{noise_scheduler.config.prediction_type}', not noise; "
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


def add_lora(unet, accelerator, gradient_checkpointing):
    """Frozen UNet in the training dtype, LoRA adapters on its attention projections, trainable in fp32."""
    weight_dtype = torch.float16 if accelerator.mixed_precision == "fp16" else torch.float32
    unet.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(LoraConfig(**LORA_CONFIG))  # diffusers' way; keys stay loadable by load_lora_weights
    # fp16 trainable weights would make the grad scaler fail ("Attempting to unscale FP16 gradients").
    cast_training_params(unet, dtype=torch.float32)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(unet, directory):
    """pytorch_lora_weights.safetensors plus the adapter config, so the LoRA reloads at its trained strength."""
    metadata = unet.peft_config["default"].to_dict()  # without lora_alpha diffusers assumes alpha = r: half strength
    # Dropout only acts in training; loaded layers come up in train mode, so keeping it would make inference random.
    metadata["lora_dropout"] = 0.0
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=metadata)


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


# ---------------------------------------------------------------- data
def load_palette(dataset_dir):
    """The images of datasetDir as a datasets.Dataset, or one clear line saying why there are none."""
    if not Path(dataset_dir).is_dir():
        sys.exit(f"error: datasetDir '{dataset_dir}' is not a folder; pass --dataset-dir with your palette images")
    try:
        palette = datasets.load_dataset("imagefolder", data_dir=dataset_dir, split="train")
    except (FileNotFoundError, ValueError):  # no data files at all / files but no images
        palette = []
    if len(palette) == 0:
        sys.exit(f"error: no images found in datasetDir '{dataset_dir}'; put .png or .jpg files there")
    return palette


def image_transform(resolution):
    # The spec's Resize + ToTensor + Normalize; the center crop makes every image the same square so batches
    # stack. Its random horizontal flip is drawn per step in latent_distribution, for the cached and live paths alike.
    return transforms.Compose([
        transforms.Resize(resolution), transforms.CenterCrop(resolution),
        transforms.ToTensor(), transforms.Normalize([0.5], [0.5]),
    ])


@torch.no_grad()
def cache_latent_distributions(palette, vae, resolution, device):
    """VAE posterior (mean, logvar) of every image, unflipped and flipped: [N, 2, 2*latent_channels, h, w] on CPU.

    Storing the distribution, not one sample, keeps the randomness of the uncached loop: each step still
    draws its own latent sample and its own flip."""
    transform = image_transform(resolution)
    cache = []
    for example in tqdm(palette, desc="caching latents", leave=False):
        pixels = transform(example["image"].convert("RGB")).to(device)
        cache.append(vae.encode(torch.stack([pixels, pixels.flip(-1)])).latent_dist.parameters.cpu())
    return torch.stack(cache)


def make_dataloader(palette, vae, args, device):
    if args.cache_latents:
        dataset = TensorDataset(cache_latent_distributions(palette, vae, args.resolution, device))
    else:
        transform = image_transform(args.resolution)
        dataset = palette.with_transform(
            lambda batch: {"pixels": [transform(image.convert("RGB")) for image in batch["image"]]})
    # Its own generator: starting an epoch must not draw from the global RNG that the training step uses
    # (flips, latent samples, noise, timesteps, dropout), or a resumed run would drift off the uninterrupted one.
    return DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(args.seed))


# ---------------------------------------------------------------- train
def latent_distribution(batch, vae):
    """The VAE posteriors of a batch after a random horizontal flip of each image: from the cache or encoded now.

    Both paths draw the same random numbers, so caching changes the speed, not the training run."""
    images = batch[0] if vae is None else batch["pixels"]
    flip = torch.randint(0, 2, (len(images),), device=images.device)
    if vae is None:  # cached: [image, 2 flips, posterior parameters, h, w]
        return DiagonalGaussianDistribution(images[torch.arange(len(images), device=images.device), flip])
    with torch.no_grad():
        return vae.encode(torch.where(flip.bool().view(-1, 1, 1, 1), images.flip(-1), images)).latent_dist


def resume_step(args, accelerator):
    """Restore a checkpoint if asked to; returns the optimizer step training continues from."""
    if args.resume is None:
        return 0
    checkpoint = latest_checkpoint(args.output_dir) if args.resume == "latest" else Path(args.resume)
    if checkpoint is None:
        tqdm.write(f"no {CHECKPOINT_PREFIX}* folder in {args.output_dir} yet: starting from step 0")
        return 0
    accelerator.load_state(str(checkpoint))
    return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))


def latest_checkpoint(output_dir):
    steps = {int(p.name.removeprefix(CHECKPOINT_PREFIX)): p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()}
    return steps[max(steps)] if steps else None


def train(args, accelerator, unet, vae, latent_scale, noise_scheduler, text_embedding, optimizer, dataloader):
    """The spec's loop: latents, noise, noisy latents, UNet predicts the noise, MSE, step every N batches.

    vae is None when the latents are cached; latent_scale is the VAE's scaling_factor."""
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    step = resume_step(args, accelerator)
    first_epoch, batches_to_skip = divmod(step, steps_per_epoch)
    epoch_loss = None  # stays None only when a resumed run has no steps left

    progress = tqdm(total=max_steps, initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, num_epochs):
        if step >= max_steps:
            break
        unet.train()
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and batches_to_skip:  # resuming mid-epoch: skip what the checkpoint already saw
            batches = accelerator.skip_first_batches(dataloader, batches_to_skip * args.gradient_accumulation_steps)
        losses = []
        for batch in batches:
            with accelerator.accumulate(unet):
                latents = latent_distribution(batch, vae).sample() * latent_scale
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),),
                                          device=latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                prediction = unet(noisy_latents, timesteps, text_embedding.expand(len(latents), -1, -1)).sample
                loss = F.mse_loss(prediction.float(), noise.float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.item())
            if accelerator.sync_gradients:  # an optimizer step happened
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    accelerator.save_state(str(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{step}"))
                if step >= max_steps:
                    break
        mean_loss = torch.tensor(sum(losses) / len(losses), device=accelerator.device)
        epoch_loss = accelerator.reduce(mean_loss, reduction="mean").item()
        tqdm.write(f"epoch {epoch + 1}/{num_epochs}: loss {epoch_loss:.4f}")
    progress.close()
    return {"steps": step, "epochsCompleted": step // steps_per_epoch, "finalLoss": epoch_loss}


# ---------------------------------------------------------------- artifact
def render_validation_images(args, output_dir, accelerator):
    """Each prompt from the same start noise, without (left) and with (right) the LoRA, loaded the way users load it."""
    dtype = torch.float16 if accelerator.mixed_precision == "fp16" else torch.float32
    pipeline = StableDiffusionPipeline.from_pretrained(args.model_id, dtype=dtype).to(accelerator.device)
    pipeline.load_lora_weights(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    paths = []
    for index, prompt in enumerate(tqdm(args.validation_prompts, desc="validation images", leave=False)):
        side_by_side = Image.new("RGB", (2 * args.resolution, args.resolution))
        for column, lora_on in enumerate((False, True)):
            pipeline.enable_lora() if lora_on else pipeline.disable_lora()
            image = pipeline(prompt, height=args.resolution, width=args.resolution,
                             num_inference_steps=args.validation_steps,
                             generator=torch.Generator(accelerator.device).manual_seed(args.seed)).images[0]
            side_by_side.paste(image, (column * args.resolution, 0))
        paths.append(output_dir / f"validation_{index}.png")
        side_by_side.save(paths[-1])
    return paths


# ---------------------------------------------------------------- report
def report(output_dir, stats, extra_files):
    result = {"success": True, "outputDir": str(output_dir.resolve()), "epochsCompleted": stats["epochsCompleted"],
              "finalLoss": None if stats["finalLoss"] is None else round(stats["finalLoss"], 6),
              "steps": stats["steps"]}
    (output_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    written = ", ".join([LORA_FILE, "result.json", *(p.name for p in extra_files)])
    print(f"wrote {written} to {output_dir}")
    print(json.dumps(result))
    return result


def quiet_libraries():
    """Library info logs and weight-loading bars would bury the one line a failure prints."""
    for logging in (transformers.utils.logging, diffusers.utils.logging, datasets.utils.logging):
        logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    accelerator = make_accelerator(args)
    # Per-process seeds (seed + rank) give each GPU its own noise; rank 0 is the plain seed, so 1 device = --seed.
    set_seed(args.seed, device_specific=True)
    palette = load_palette(args.dataset_dir)  # every process checks it, so a bad folder stops them all alike
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(args.model_id)
    # Every input is checked by now; nothing has been written yet, and from here on nothing fails on user input.

    text_embedding = embed_prompt(tokenizer, text_encoder, args.train_prompt, accelerator.device)
    del tokenizer, text_encoder  # used once: free its memory for the UNet
    # The VAE stays fp32: it only encodes (once per image when caching), and an fp16 VAE can overflow into NaN.
    vae.to(accelerator.device)
    latent_scale = vae.config.scaling_factor
    dataloader = make_dataloader(palette, vae, args, accelerator.device)
    if args.cache_latents:
        vae = None  # every latent is in the cache: a step runs the UNet only
    accelerator.free_memory()  # hand the text encoder's (and the cached VAE's) memory back before the UNet's

    lora_parameters = add_lora(unet, accelerator, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.learning_rate)
    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    checkpoint_only_lora(accelerator)
    stats = train(args, accelerator, unet, vae, latent_scale, noise_scheduler, text_embedding, optimizer, dataloader)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        save_lora(accelerator.unwrap_model(unet), output_dir)
        del unet, optimizer
        accelerator.free_memory()
        images = render_validation_images(args, output_dir, accelerator) if args.validation_prompts else []
        report(output_dir, stats, images)
    accelerator.end_training()


if __name__ == "__main__":
    main()
