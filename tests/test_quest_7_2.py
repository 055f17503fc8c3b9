"""quest_7_2.py (LoRA on an SD v1.x UNet): tiny runs on a tiny random pipeline, offline, and the failure paths.

No hub here: build_tiny_pipeline (the tiny_sd fixture, conftest.py) writes a random SD v1.x-shaped pipeline with
save_pretrained, as a user's local model folder would look. The builders live in tools/kit.py (bench/bench_lora.py
uses them too).
"""
import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import (DEVICES, OFFLINE_ENV, REPO, assert_clean_failure, import_script, message, result_json,
                      run_script)
from tools.kit import interrupt_script, stop_while_starting, write_captioned_images, write_palette

SCRIPT = "quest_7_2.py"
PROMPT = "a red seal"
KOHYA_FILE = "lora_kohya_for_a1111_forge_comfyui.safetensors"
# 4 images, 2 per batch, no accumulation: 2 optimizer steps per epoch, so 4 steps = 2 epochs and step 3 is mid-epoch.
# lr 1e-2: at the spec's 1e-4 a few steps move the tiny pipeline's output by less than a grey level.
TINY_RUN = ["--resolution", 32, "--train-batch-size", 2, "--gradient-accumulation-steps", 1, "--max-train-steps", 4,
            "--learning-rate", 1e-2, "--train-prompt", PROMPT]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def env():
    # One torch thread keeps the tiny runs quick on a small shared CPU (two threads per process thrash when several
    # processes share two cores). Progress bars show on a terminal only, so a failure's stderr here is its one line.
    return {"OMP_NUM_THREADS": "1"}


def train(tiny_sd, palette, out_dir, *extra, env):
    return run_script(SCRIPT, "--model-id", tiny_sd, "--dataset-dir", palette, "--output-dir", out_dir,
                      *TINY_RUN, *extra, cwd=out_dir.parent, env=env)


@pytest.fixture(scope="module")
def trained(tiny_sd, palette, env, tmp_path_factory):
    """The main tiny run per device, run once and shared: (out_dir, result JSON, process)."""
    runs = {}

    def run(device):
        if device not in runs:
            out_dir = tmp_path_factory.mktemp(f"seal-{device}") / "artist_seal"
            proc = train(tiny_sd, palette, out_dir, "--checkpointing-steps", 1, "--checkpoints-total-limit", 2,
                         "--validation-prompts", PROMPT, "--validation-steps", 2, "--validation-every", 2,
                         "--device", device, env=env)
            runs[device] = out_dir, result_json(proc), proc
        return runs[device]
    return run


@pytest.fixture(scope="module")
def quest():
    """The script as a module, for its parts (fast, no subprocess)."""
    return import_script(SCRIPT)


def lora_weights(out_dir):
    return load_file(out_dir / "pytorch_lora_weights.safetensors")


@pytest.mark.slow
# ---------------------------------------------------------------- the tiny run
@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_tiny_run_writes_loras_result_loss_log_checkpoints_and_validation_images(trained, device):
    out_dir, result, proc = trained(device)
    assert result == json.loads((out_dir / "result.json").read_text())
    assert result["success"] is True and result["outputDir"] == str(out_dir.resolve())
    assert result["epochsCompleted"] == 2 and result["steps"] == 4
    assert 0 < result["finalLoss"] < 10
    assert "epoch 1/2: loss" in proc.stdout and "epoch 2/2: loss" in proc.stdout
    assert proc.stdout.splitlines()[-2].endswith(f"result.json to {out_dir}")  # where it wrote; the result last
    weights = lora_weights(out_dir)
    ups = [tensor for key, tensor in weights.items() if ".lora.up." in key]
    assert ups and all(key.startswith("unet.") for key in weights)
    assert any(tensor.abs().max() > 0 for tensor in ups), "LoRA up-projections start at zero: nothing was trained"
    # --checkpointing-steps 1 --checkpoints-total-limit 2: the newest two of four, each complete, no temp folders.
    assert sorted(p.name for p in out_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]
    for checkpoint in ("checkpoint-3", "checkpoint-4"):
        assert (out_dir / checkpoint / "pytorch_lora_weights.safetensors").is_file()
        assert (out_dir / checkpoint / "optimizer.bin").is_file()
        assert not list((out_dir / checkpoint).glob("model*")), "a checkpoint holds the LoRA, not the frozen UNet"
    # The loss log: one row per optimizer step, finite, and its plot decodes; the checkpoint has the log up to it.
    rows = (out_dir / "loss_log.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and [int(row.split(",")[0]) for row in rows[1:]] == [1, 2, 3, 4]
    assert all(0 < float(row.split(",")[1]) < 10 for row in rows[1:])
    assert (out_dir / "checkpoint-3" / "loss_log.csv").read_text().splitlines() == rows[:4]
    for plot in (out_dir / "loss_plot.png", out_dir / "checkpoint-3" / "loss_plot.png"):
        with Image.open(plot) as image:
            assert image.size == (800, 450) and len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 2
    # Validation: at the end from the saved file, and every 2 steps during training; without | with the LoRA.
    for name in ("validation_0.png", "validation/step-2_0.png", "validation/step-4_0.png"):
        with Image.open(out_dir / name) as image:
            assert image.size == (64, 32)
    with Image.open(out_dir / "validation/step-4_0.png") as during, Image.open(out_dir / "validation_0.png") as end:
        # Step 4 is the final LoRA: rendered in training (in memory) and after it (from the file), it is the same.
        assert np.abs(np.asarray(during, dtype=int) - np.asarray(end, dtype=int)).max() <= 2
        left, right = np.asarray(end)[:, :32], np.asarray(end)[:, 32:]
        assert np.abs(left.astype(int) - right.astype(int)).max() > 0, "the LoRA does not change the image"
    assert not [p for p in out_dir.rglob(".*")], "temp files left behind"


def denoising_loss(quest, model_dir, lora_dir, pairs, resolution=32):
    """Mean denoising MSE over (image file, caption) pairs of the base model, or of the base model with the LoRA saved
    in lora_dir, on the same fixed noise and timesteps for every model (the VAE mean, not a sample)."""
    from diffusers import DDPMScheduler
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir)
    if lora_dir is not None:
        pipeline.load_lora_weights(lora_dir)
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    generator, timesteps, losses = torch.Generator().manual_seed(0), torch.tensor([50, 250, 450, 650, 850]), []
    with torch.no_grad():
        for path, caption in pairs:
            pixels = torch.from_numpy(np.array(quest.decode_image(path, resolution))).permute(2, 0, 1) / 127.5 - 1
            latents = pipeline.vae.encode(pixels[None]).latent_dist.mean * pipeline.vae.config.scaling_factor
            latents = latents.expand(len(timesteps), -1, -1, -1)
            ids = pipeline.tokenizer(caption, padding="max_length", max_length=77, truncation=True,
                                     return_tensors="pt").input_ids
            embedding = pipeline.text_encoder(ids)[0].expand(len(timesteps), -1, -1)
            noise = torch.randn(latents.shape, generator=generator)
            prediction = pipeline.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, embedding).sample
            losses.append(torch.nn.functional.mse_loss(prediction, noise).item())
    return sum(losses) / len(losses)


CAPTIONS = {"red": ((200, 30, 40), "a red seal, square"), "blue": ((20, 60, 220), "a blue wave")}
TRIGGER = "zq"
SMALL_LORA = ["--rank", 4, "--lora-alpha", 8, "--trigger-word", TRIGGER]


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    """A noisy red and a noisy blue image, each with its own caption in a .txt beside it (kohya's layout)."""
    return write_captioned_images(tmp_path_factory.mktemp("two") / "images", CAPTIONS)


@pytest.fixture(scope="module")
def learned(tiny_sd, two_images, env, tmp_path_factory):
    """20 steps at lr 3e-2 on the two captioned images, rank 4, alpha 8, with a trigger word: (out_dir, process)."""
    out_dir = tmp_path_factory.mktemp("learned") / "red_and_blue"
    proc = train(tiny_sd, two_images, out_dir, "--max-train-steps", 20, "--learning-rate", 3e-2, *SMALL_LORA,
                 env=env)
    result_json(proc)
    return out_dir, proc


@pytest.mark.slow
def test_the_lora_learns_its_captioned_images_it_lowers_their_denoising_loss(learned, tiny_sd, two_images, quest,
                                                                             one_thread):
    """On fixed noise and timesteps, the LoRA denoises its (image, caption) pairs better than the base model
    (0.97x is the bar)."""
    out_dir, proc = learned
    assert "2 images, 2 distinct captions (2 from txt)" in proc.stdout
    pairs = [(two_images / f"{name}.png", f"{TRIGGER}, {caption}") for name, (_, caption) in CAPTIONS.items()]
    base, tuned = denoising_loss(quest, tiny_sd, None, pairs), denoising_loss(quest, tiny_sd, out_dir, pairs)
    print(f"denoising loss on the training pairs: base {base:.4f}, with the LoRA {tuned:.4f} ({tuned / base:.3f}x)")
    assert tuned < 0.97 * base, (base, tuned)


@pytest.mark.slow
def test_rank_alpha_and_a1111_metadata_are_in_both_files(learned, tiny_sd, one_thread):
    out_dir, _ = learned
    diffusers_file, kohya = lora_weights(out_dir), load_file(out_dir / KOHYA_FILE)
    assert {t.shape[0] for k, t in diffusers_file.items() if ".lora.down." in k} == {4}
    assert {t.shape[1] for k, t in kohya.items() if ".lora_up." in k} == {4}
    assert {t.item() for k, t in kohya.items() if k.endswith(".alpha")} == {8.0}
    with safe_open(out_dir / "pytorch_lora_weights.safetensors", "pt") as file:
        adapter = json.loads(file.metadata()["lora_adapter_metadata"])
        assert (adapter["unet.r"], adapter["unet.lora_alpha"]) == (4, 8.0)
        assert file.metadata()["training_lora_dropout"] == "0.05"
    with safe_open(out_dir / KOHYA_FILE, "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_output_name"] == "red_and_blue" and metadata["ss_num_train_images"] == "2"
    assert json.loads(metadata["ss_tag_frequency"]) == {"images": {TRIGGER: 2, "a red seal": 1, "square": 1,
                                                                   "a blue wave": 1}}
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_resolution"]) == \
        ("4", "8.0", "(32, 32)")
    assert metadata["ss_sd_model_name"] == "model" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dropout"] == "0.05"
    # A1111 takes sshs_model_hash instead of hashing the file (hashes.addnet_hash_safetensors: the SHA-256 of all
    # bytes after the safetensors header); the file hashed that way gives the same value.
    data = (out_dir / KOHYA_FILE).read_bytes()
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    # Both files give the same images, at the trained strength alpha / r = 2.
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)
    images = {}
    for name in ("pytorch_lora_weights.safetensors", KOHYA_FILE):
        pipeline.load_lora_weights(out_dir, weight_name=name, adapter_name=name.split(".")[0])
        pipeline.set_adapters(name.split(".")[0])
        images[name] = pipeline(f"{TRIGGER}, a red seal", height=32, width=32, num_inference_steps=2,
                                output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(images[KOHYA_FILE], images["pytorch_lora_weights.safetensors"], atol=1e-6)


@pytest.mark.slow
def test_init_lora_continues_a_finished_lora(learned, tiny_sd, two_images, env, tmp_path):
    """--init-lora with a learning rate too small to move anything: the saved LoRA is the finished one, and the first
    step's loss (same seed: same batch, noise and timesteps as the finished run's first step) is the finished LoRA's,
    below the base model's."""
    out_dir, _ = learned
    proc = train(tiny_sd, two_images, tmp_path / "more", "--max-train-steps", 1, "--learning-rate", 1e-12,
                 *SMALL_LORA, "--init-lora", out_dir, env=env)
    result_json(proc)
    continued, finished = lora_weights(tmp_path / "more"), lora_weights(out_dir)
    for key, tensor in finished.items():
        torch.testing.assert_close(continued[key], tensor, rtol=0, atol=1e-6)
    first_loss = {folder: float((folder / "loss_log.csv").read_text().splitlines()[1].split(",")[1])
                  for folder in (out_dir, tmp_path / "more")}
    assert first_loss[tmp_path / "more"] < first_loss[out_dir], first_loss


@pytest.mark.slow
def test_init_lora_of_another_shape_is_one_line_and_the_kohya_file_loads_as_the_diffusers_file(learned, tiny_sd,
                                                                                                 quest, one_thread):
    from diffusers import UNet2DConditionModel
    out_dir, _ = learned
    args = quest.parse_args(["--output-dir", str(out_dir.parent), *map(str, SMALL_LORA)])
    loaded = {}
    for weight_name in ("pytorch_lora_weights.safetensors", KOHYA_FILE):
        unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
        unet.add_adapter(quest.LoraConfig(**quest.lora_shape(args)))
        quest.init_lora(unet, out_dir / weight_name, args)
        loaded[weight_name] = quest.get_peft_model_state_dict(unet)
    assert loaded[KOHYA_FILE].keys() == loaded["pytorch_lora_weights.safetensors"].keys()
    for key, tensor in loaded["pytorch_lora_weights.safetensors"].items():
        torch.testing.assert_close(loaded[KOHYA_FILE][key], tensor, rtol=0, atol=0)
    for flags, words in [([], ["rank 4", "--rank 4"]), (["--rank", "4"], ["lora_alpha 8", "--lora-alpha 8"]),
                         (["--rank", "4", "--lora-alpha", "8", "--target-modules", "to_q,to_k"],
                          ["other layers", "--target-modules"])]:
        args = quest.parse_args(["--output-dir", str(out_dir.parent), *flags])
        unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
        unet.add_adapter(quest.LoraConfig(**quest.lora_shape(args)))
        for weight_name in ("pytorch_lora_weights.safetensors", KOHYA_FILE):
            with pytest.raises(SystemExit) as exit_info:
                quest.init_lora(unet, out_dir / weight_name, args)
            for word in words:
                assert word in message(exit_info)


def damage_lora(source, target, metadata=None, tensors=None):
    """A copy of the LoRA file `source` with its metadata and tensors updated."""
    with safe_open(source, "pt") as file:
        old_metadata = file.metadata()
    save_file({**load_file(source), **(tensors or {})}, target, {**old_metadata, **(metadata or {})})
    return target


@pytest.mark.slow
@pytest.mark.parametrize("file_name, metadata, tensors, words", [
    ("pytorch_lora_weights.safetensors", {"lora_adapter_metadata": "{not json"}, None, ["not a JSON object"]),
    ("pytorch_lora_weights.safetensors", {"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000}, None,
     ["nested too deeply"]),
    ("pytorch_lora_weights.safetensors", {"lora_adapter_metadata": '{"unet.lora_alpha": "abc"}'}, None,
     ["lora_alpha", "not a number", '"abc"']),
    (KOHYA_FILE, None, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha":
                        torch.tensor([8.0, 8.0])}, ["attn1_to_q.alpha", "2 numbers"]),
    (KOHYA_FILE, None, {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha":
                        torch.tensor(float("nan"))}, ["lora_alpha", "positive finite"]),
])
def test_a_damaged_init_lora_is_one_line(learned, tiny_sd, quest, tmp_path, file_name, metadata, tensors, words):
    from diffusers import UNet2DConditionModel
    out_dir, _ = learned
    args = quest.parse_args(["--output-dir", str(tmp_path), *map(str, SMALL_LORA)])
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet.add_adapter(quest.LoraConfig(**quest.lora_shape(args)))
    damaged = damage_lora(out_dir / file_name, tmp_path / file_name, metadata, tensors)
    with pytest.raises(SystemExit) as exit_info:
        quest.init_lora(unet, damaged, args)
    for word in ["--init-lora", str(damaged), *words]:
        assert word in message(exit_info)


@pytest.mark.slow
def test_lora_reloads_at_trained_strength_and_infers_deterministically(trained, tiny_sd, one_thread):
    out_dir, _, _ = trained("cpu")
    with safe_open(out_dir / "pytorch_lora_weights.safetensors", "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 16 and metadata["unet.lora_alpha"] == 32

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline(PROMPT, height=32, width=32, num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    without_lora = render()
    pipeline.load_lora_weights(out_dir)  # the README's snippet: no .eval(), no extra arguments
    # Every adapted layer computes base(x) + alpha/r * B(A(x)) = base(x) + 2 * ...: the saved alpha came back.
    # (Saved without adapter metadata, diffusers would assume alpha = r and load it at half strength.)
    weights = lora_weights(out_dir)
    adapted = {name: module for name, module in pipeline.unet.named_modules() if hasattr(module, "lora_A")}
    assert len(adapted) == sum(key.endswith(".lora.down.weight") for key in weights) > 0
    for name, layer in adapted.items():
        assert set(layer.scaling.values()) == {2.0}
        down, up = weights[f"unet.{name}.lora.down.weight"], weights[f"unet.{name}.lora.up.weight"]
        x = torch.randn(3, down.shape[1])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * x @ down.T @ up.T)
    with_lora = render()
    assert np.abs(with_lora - without_lora).max() > 1e-3, "the LoRA does not change the images"
    np.testing.assert_array_equal(render(), with_lora)  # no LoRA dropout left active at inference


@pytest.mark.slow
def test_kohya_file_has_the_a1111_layout_and_loads_to_the_same_images(trained, tiny_sd, one_thread):
    """The file for AUTOMATIC1111/Forge/ComfyUI: kohya key names with a per-module alpha = lora_alpha, and diffusers'
    own kohya converter loads it to the same images as the diffusers file."""
    out_dir, _, _ = trained("cpu")
    kohya, diffusers_file = load_file(out_dir / KOHYA_FILE), lora_weights(out_dir)
    modules = {key.split(".")[0] for key in kohya}
    assert len(modules) == sum(key.endswith(".lora.down.weight") for key in diffusers_file) > 0
    for module in modules:
        assert module.startswith("lora_unet_") and "." not in module
        assert set(k for k in kohya if k.startswith(module + ".")) == {
            f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"}
        assert kohya[f"{module}.alpha"].ndim == 0 and kohya[f"{module}.alpha"].item() == 32.0
    example = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    torch.testing.assert_close(
        kohya[f"{example}.lora_down.weight"],
        diffusers_file["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight"])

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline(PROMPT, height=32, width=32, num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    images = {}
    for name in ("pytorch_lora_weights.safetensors", KOHYA_FILE):
        pipeline.load_lora_weights(out_dir, weight_name=name, adapter_name=name.split(".")[0])
        pipeline.set_adapters(name.split(".")[0])
        assert {layer.scaling[name.split(".")[0]] for layer in pipeline.unet.modules() if hasattr(layer, "lora_A")} \
            == {2.0}, "loaded at another strength than trained"
        images[name] = render()
    np.testing.assert_allclose(images[KOHYA_FILE], images["pytorch_lora_weights.safetensors"], atol=1e-6)


@pytest.mark.slow
def test_resume_mid_epoch_without_the_cache_gives_the_uninterrupted_run(trained, tiny_sd, palette, env, tmp_path):
    """Resumed from checkpoint-3 of the cached run, with the live VAE and gradient checkpointing: the same weights as
    the uninterrupted run. So resuming restores every RNG and the data order, cached posteriors (both flips) and the
    live VAE draw the same random numbers, and gradient checkpointing recomputes the same activations."""
    out_dir, _, _ = trained("cpu")
    proc = train(tiny_sd, palette, tmp_path / "resumed", "--resume", out_dir / "checkpoint-3", "--no-cache-latents",
                 "--gradient-checkpointing", "--device", "cpu", env=env)
    assert result_json(proc)["steps"] == 4
    resumed, uninterrupted = lora_weights(tmp_path / "resumed"), lora_weights(out_dir)
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-4, atol=1e-5)
    # The loss log continues the checkpoint's: steps 1-3 from it, step 4 from the resumed run, as uninterrupted.
    resumed_rows = (tmp_path / "resumed" / "loss_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in resumed_rows] == ["step", "1", "2", "3", "4"]


@pytest.mark.slow
def test_two_processes_write_the_lora_once(tiny_sd, palette, env, tmp_path):
    """torchrun really starts two CPU processes (gloo); only rank 0 writes. 4 images, 1 per process and step: one
    epoch is 2 optimizer steps of an effective batch of 2. Min-SNR, the noise offset, caption dropout and a trigger
    word run along."""
    out_dir = tmp_path / "seal"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / SCRIPT),
               "--model-id", tiny_sd, "--dataset-dir", palette, "--output-dir", out_dir, "--device", "cpu",
               "--resolution", 32, "--train-batch-size", 1, "--gradient-accumulation-steps", 1,
               "--max-train-steps", 2, "--learning-rate", 1e-2, "--checkpointing-steps", 2,
               "--snr-gamma", 5, "--noise-offset", 0.05, "--caption-dropout", 0.5, "--trigger-word", "zq"]
    proc = subprocess.run([str(part) for part in command], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE_ENV, **env})
    result = result_json(proc)
    assert "training on 2 process(es)" in proc.stdout
    assert proc.stdout.count("wrote pytorch_lora_weights.safetensors") == 1
    assert result["steps"] == 2 and result["epochsCompleted"] == 1 and 0 < result["finalLoss"] < 10
    assert (out_dir / "checkpoint-2" / "random_states_0.pkl").is_file()
    assert (out_dir / "checkpoint-2" / "random_states_1.pkl").is_file()  # each rank's RNG, for an exact resume
    assert len(load_file(out_dir / KOHYA_FILE)) > 0 and len(lora_weights(out_dir)) > 0
    assert not [p for p in out_dir.rglob(".*")], "temp files left behind"


# ---------------------------------------------------------------- settings
SPEC_DEFAULTS = {"dataset_dir": "../Quest_1/generated_palette", "output_dir": "artist_seal",
                 "model_id": "CompVis/stable-diffusion-v1-4", "resolution": 256, "train_batch_size": 1,
                 "gradient_accumulation_steps": 4, "learning_rate": 1e-4, "num_train_epochs": 100}


def test_defaults_equal_the_spec_and_help_shows_them(quest, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps help at the terminal width, even inside words with '-'
    args = quest.parse_args([])
    assert {key: getattr(args, key) for key in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert args.device == "auto" and args.seed == 0 and args.max_train_steps is None
    assert (args.noise_offset, args.snr_gamma, args.max_grad_norm, args.mixed_precision) == (0.0, None, 1.0, None)
    with pytest.raises(SystemExit) as exit_info:
        quest.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for shown in ("--config JSON_OR_PATH", "../Quest_1/generated_palette", "CompVis/stable-diffusion-v1-4",
                  "(default: 0.0001)", "--gradient-accumulation-steps", "--checkpointing-steps", "--resume",
                  "--snr-gamma", "--noise-offset", "--mixed-precision {no,fp16,bf16}", "--validation-every"):
        assert shown in help_text


def test_config_inline_or_file_and_flags_win(quest, tmp_path):
    args = quest.parse_args(["--config", '{"resolution": 64, "learningRate": 1, "datasetDir": "x"}'])
    assert (args.resolution, args.learning_rate, args.dataset_dir) == (64, 1.0, "x")
    config_file = tmp_path / "settings.json"
    config_file.write_text(json.dumps({"numTrainEpochs": 3, "outputDir": "seal", "resolution": 64}))
    args = quest.parse_args(["--config", str(config_file), "--resolution", "128"])
    assert (args.num_train_epochs, args.output_dir, args.resolution) == (3, "seal", 128)


@pytest.mark.parametrize("config, words", [
    ('{"resolutoin": 64}', ["unknown key", "resolutoin", "resolution"]),
    ('{"resolution": "64"}', ["resolution", "integer"]),
    ('{"learningRate": true}', ["learningRate", "number"]),
    ('{"resolution": 0}', ["--resolution", "[8, 2048]"]),
    ('{"learningRate": NaN}', ["--learning-rate", "finite"]),
    ('{"learningRate": -1e-4}', ["--learning-rate", "above 0"]),
    ("[1, 2]", ["JSON object"]),
    ("{not json", ["not valid JSON"]),
    ("missing.json", ["missing.json", "neither"]),
    ("[" * 100_000 + "]" * 100_000, ["not valid JSON", "nested too deeply"]),  # RecursionError inside json
    ('{"resolution": ' + "1" * 5000 + "}", ["not valid JSON", "4300 digits"]),  # past Python's int conversion limit
])
def test_bad_config_is_one_clear_line(quest, config, words):
    with pytest.raises(SystemExit) as exit_info:
        quest.parse_args(["--config", config])
    text = message(exit_info)
    for word in words:
        assert word in text


@pytest.mark.parametrize("flags, words", [
    (["--learning-rate", "inf"], ["--learning-rate", "finite"]),
    (["--learning-rate", "nan"], ["--learning-rate", "finite"]),
    (["--learning-rate", "0"], ["--learning-rate", "above 0"]),
    (["--resolution", "0"], ["--resolution", "[8, 2048]"]),
    (["--resolution", "4096"], ["--resolution", "[8, 2048]"]),
    (["--resolution", "100"], ["--resolution", "multiple of 8", "96", "104"]),
    (["--seed", "-1"], ["--seed", "[0, 4294967295]"]),
    (["--seed", str(2**32)], ["--seed", "[0, 4294967295]"]),
    (["--output-dir", "x" * 300], ["--output-dir", "pass a shorter path"]),
    (["--noise-offset", "-0.1"], ["--noise-offset", "[0, 1]"]),
    (["--snr-gamma", "0"], ["--snr-gamma", "above 0"]),
    (["--max-grad-norm", "nan"], ["--max-grad-norm", "finite"]),
    (["--mixed-precision", "fp8"], ["--mixed-precision", "fp8"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--validation-every", "5"], ["--validation-every", "--validation-prompts"]),
    # Every count has an upper bound that fits memory and time.
    (["--train-batch-size", "1025"], ["--train-batch-size", "[1, 1024]"]),
    (["--gradient-accumulation-steps", "1000000000"], ["--gradient-accumulation-steps", "[1, 1024]"]),
    (["--num-train-epochs", "1000000000"], ["--num-train-epochs", "[1, 100000]"]),
    (["--max-train-steps", "1000000000000"], ["--max-train-steps", "[1, 1000000]"]),
    (["--checkpointing-steps", "1000001"], ["--checkpointing-steps", "[1, 1000000]"]),
    (["--checkpoints-total-limit", "1001"], ["--checkpoints-total-limit", "[1, 1000]"]),
    (["--validation-steps", "1001"], ["--validation-steps", "[1, 1000]"]),
    (["--validation-prompts", "x", "--validation-every", "1000001"], ["--validation-every", "[1, 1000000]"]),
    (["--validation-prompts", *["x"] * 101], ["--validation-prompts", "101 prompts", "100"]),
    # Every text must be UTF-8: a Latin-1 byte from the shell reaches Python as a lone surrogate, as here.
    (["--trigger-word", "z\udce9"], ["--trigger-word", "not valid UTF-8", "'\\udce9'"]),
    (["--validation-prompts", "fine", "caf\udce9"], ["--validation-prompts (item 2)", "not valid UTF-8"]),
    (["--train-prompt", "caf\udce9"], ["--train-prompt", "not valid UTF-8"]),
    (["--config", "settings\udce9.json"], ["--config", "not valid UTF-8"]),
    (["--config", '{"datasetDir": "bad \\ud800"}'], ["--dataset-dir", "not valid UTF-8"]),  # valid JSON, no UTF-8
    (["--output-dir", "seal\udce9"], ["--output-dir", "not valid UTF-8"]),
    (["--config", '{"outputDir": "seal\\u0000"}'], ["--output-dir", "NUL"]),  # no path holds one: os.stat raises
])
def test_bad_numbers_and_choices_stop_before_anything_loads(quest, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        quest.parse_args(flags)
    text = message(exit_info)
    for word in words:
        assert word in text


def test_epochs_over_many_images_are_bounded_like_max_train_steps(quest):
    args = quest.parse_args(["--num-train-epochs", "100000", "--gradient-accumulation-steps", "1"])
    quest.check_planned_steps(args, 10, num_processes=1)  # 1M steps: the most
    with pytest.raises(SystemExit) as exit_info:
        quest.check_planned_steps(args, 11, num_processes=1)
    assert "1100000 optimizer steps" in message(exit_info) and "--max-train-steps" in message(exit_info)
    quest.check_planned_steps(quest.parse_args([*map(str, ["--num-train-epochs", 100000, "--max-train-steps", 5])]),
                              11, num_processes=1)  # --max-train-steps wins


def test_mixed_precision_follows_the_flag_then_accelerate_launch_then_the_device(quest, monkeypatch):
    args = quest.parse_args([])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # as on an Ampere or newer GPU
    assert quest.choose_precision(args, torch.device("cuda")) == ("fp16", "the default on cuda")
    assert quest.choose_precision(args, torch.device("cpu")) == ("no", "the default on cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert quest.choose_precision(args, torch.device("cuda"))[0] == "bf16"  # no longer overridden by fp16
    args = quest.parse_args(["--mixed-precision", "no"])
    precision, source = quest.choose_precision(args, torch.device("cuda"))
    assert precision == "no" and "over accelerate launch's bf16" in source  # said, not silent
    with pytest.raises(SystemExit) as exit_info:
        quest.choose_precision(quest.parse_args(["--mixed-precision", "fp16"]), torch.device("cpu"))
    assert "fp16" in message(exit_info) and "GPU" in message(exit_info)


def test_min_snr_weighting_is_min_snr_gamma_over_snr(quest):
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    timesteps = torch.tensor([10, 500, 999])
    prediction, noise = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)  # per-image MSE = 1
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = (torch.clamp(snr, max=5.0) / snr).mean()
    torch.testing.assert_close(quest.training_loss(prediction, noise, timesteps, scheduler, 5.0), expected)
    assert quest.training_loss(prediction, noise, timesteps, scheduler, None).item() == 1.0
    assert snr[0] > 5 > snr[2], "the test must cover both sides of gamma"


# ---------------------------------------------------------------- images: decoded up front, odd modes converted
def write_truncated_png(path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])


def write_png_bomb(path, side=20_000):
    """A real PNG whose header declares side x side pixels (400 M: over PIL's bomb limit); only a few bytes long."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("writer, words", [
    (write_truncated_png, ["corrupt", "bad.png"]),
    (lambda path: path.write_text("not a picture, just text"), ["corrupt", "bad.png", "not an image"]),
    (write_png_bomb, ["bad.png", "too large", "decompression bomb"]),
    (lambda path: Image.fromarray(np.full((16, 16), np.nan, np.float32), "F").save(path, format="TIFF"),
     ["bad.png", "NaN"]),  # a float image of NaN: refused, not trained on as black with a numpy warning
])
def test_a_bad_image_is_named_in_one_line(quest, palette, tmp_path, writer, words):
    folder = tmp_path / "images"
    shutil.copytree(palette, folder)
    writer(folder / "bad.png")
    with pytest.raises(SystemExit) as exit_info:
        quest.load_palette(quest.find_images(folder), 32)
    text = message(exit_info)
    for word in words:
        assert word in text


def test_a_bad_image_stops_the_run_before_the_model_loads(quest, palette, tmp_path):
    """A model id that cannot load: had the model been loaded first, the error would name it, not the image."""
    folder = tmp_path / "images"
    shutil.copytree(palette, folder)
    write_truncated_png(folder / "z_last.png")
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--model-id", str(tmp_path / "no-model"), "--dataset-dir", str(folder), "--output-dir",
                    str(tmp_path / "seal"), "--device", "cpu"])
    assert "z_last.png" in message(exit_info) and "corrupt" in message(exit_info)
    assert not (tmp_path / "seal").exists()


def test_16_bit_palette_and_transparent_images_convert_to_the_right_colours(quest, tmp_path):
    grey16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I"), image.mode  # PIL opens 16-bit PNGs in an I mode
    pixels = np.asarray(quest.decode_image(tmp_path / "grey16.png", 64))
    np.testing.assert_allclose(pixels[..., 0], np.rint(grey16 / 257), atol=1)  # scaled, not clipped to white
    assert pixels.std() > 50

    indexed = Image.new("P", (64, 64))
    indexed.putpalette([200, 30, 40] + [10, 120, 220] + [0, 0, 0] * 254)
    indexed.paste(1, (0, 0, 32, 64))
    indexed.save(tmp_path / "palette.png")
    pixels = np.asarray(quest.decode_image(tmp_path / "palette.png", 64))
    assert tuple(pixels[10, 10]) == (10, 120, 220) and tuple(pixels[10, 50]) == (200, 30, 40)

    indexed.save(tmp_path / "transparent.png", transparency=1)  # palette entry 1 is see-through
    pixels = np.asarray(quest.decode_image(tmp_path / "transparent.png", 64))
    assert tuple(pixels[10, 10]) == (255, 255, 255) and tuple(pixels[10, 50]) == (200, 30, 40)


# ---------------------------------------------------------------- captions
def write_mixed_folder(folder):
    """kohya .txt captions, a metadata.jsonl in the folder and one in a subfolder, an image with both, one with none."""
    write_palette(folder, count=5)
    (folder / "sub").mkdir()
    os.replace(folder / "palette_4.png", folder / "sub" / "deep.png")
    (folder / "palette_0.txt").write_text("from txt, red\n\nignored second line", encoding="utf-8")
    (folder / "palette_1.txt").write_text("txt wins", encoding="utf-8")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "palette_1.png", "text": "metadata loses"}) + "\n\n"
        + json.dumps({"file_name": "palette_2.png", "text": "from metadata", "extra": 1}) + "\n", encoding="utf-8")
    (folder / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "deep.png", "text": ["first", "second"]}))
    return folder


def test_captions_come_from_txt_then_metadata_then_the_train_prompt(quest, tmp_path):
    folder = write_mixed_folder(tmp_path / "mixed")
    args = quest.parse_args(["--dataset-dir", str(folder), "--train-prompt", "plain", "--output-dir", str(tmp_path)])
    files, captions, sources = quest.read_folder(args)
    assert [path.relative_to(folder).as_posix() for path in files] == [
        "palette_0.png", "palette_1.png", "palette_2.png", "palette_3.png", "sub/deep.png"]
    assert captions == ["from txt, red", "txt wins", "from metadata", "plain", "first"]
    assert sources == {"txt": 2, "metadata.jsonl": 2, "--train-prompt": 1}
    (folder / "palette_3.txt").symlink_to(folder / "palette_1.txt")  # a link that stays inside the folder is read
    assert quest.read_folder(args)[1][3] == "txt wins"
    args = quest.parse_args(["--trigger-word", "zq", "--caption-dropout", "0.1", "--output-dir", str(tmp_path)])
    distinct, ids, final = quest.caption_table(["a", "b", "a", ""], args)
    assert final == ["zq, a", "zq, b", "zq, a", "zq"] and distinct == ["zq, a", "zq, b", "zq", ""]
    assert ids == [0, 1, 0, 2]  # one text embedding per distinct caption; the empty one last, for the dropout


@pytest.mark.parametrize("damage, words", [
    (lambda folder: (folder / "palette_3.txt").write_bytes(b"caf\xe9 au lait"), ["palette_3.txt", "not UTF-8"]),
    (lambda folder: (folder / "palette_3.txt").write_text(" \n"), ["palette_3.txt", "empty"]),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "palette_2.png", "text": "ok"}\n{oops\n'),
     ["metadata.jsonl line 2", "not JSON"]),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}'),
     ["metadata.jsonl line 1", "gone.png", "does not exist"]),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "palette_1.txt", "text": "x"}'),
     ["metadata.jsonl line 1", "palette_1.txt", "not an image"]),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "palette_2.png", "caption": "x"}'),
     ["metadata.jsonl line 1", "no 'text' column", "caption", "--caption-column"]),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "palette_2.png", "text": 7}'),
     ["metadata.jsonl line 1", "not a string"]),
    (lambda folder: (folder / "metadata.jsonl").write_text('["palette_2.png"]'),
     ["metadata.jsonl line 1", "file_name"]),
    # One rule for empty captions, .txt or metadata.jsonl: refused.
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "palette_2.png", "text": "  "}'),
     ["metadata.jsonl line 1", "empty caption"]),
    # Valid JSON, no UTF-8 text; JSON Python cannot parse (too deep, a number past the int conversion limit).
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "palette_2.png", "text": "bad \\ud800"}'),
     ["caption in", "metadata.jsonl line 1", "not valid UTF-8"]),
    (lambda folder: (folder / "metadata.jsonl").write_text("[" * 100_000 + "]" * 100_000),
     ["metadata.jsonl line 1", "nested too deeply"]),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "palette_2.png", "n": ' + "9" * 5000 + "}"),
     ["metadata.jsonl line 1", "4300 digits"]),
    (lambda folder: (Image.new("RGB", (8, 8)).save(folder.parent / "outside.png"),
                     (folder / "metadata.jsonl").write_text('{"file_name": "../outside.png", "text": "x"}')),
     ["metadata.jsonl line 1", "../outside.png", "outside the dataset folder"]),
    # Nothing is read through a link that leaves the dataset folder, and no caption from a FIFO.
    (lambda folder: (folder / "palette_3.txt").symlink_to("/proc/self/environ"),
     ["palette_3.txt", "/proc/", "outside --dataset-dir"]),
    (lambda folder: (folder / "linked.png").symlink_to(folder.parent / "elsewhere.png"),
     ["linked.png", "outside --dataset-dir", "cp -L"]),
    (lambda folder: (os.replace(folder / "metadata.jsonl", folder.parent / "metadata.jsonl"),
                     (folder / "metadata.jsonl").symlink_to(folder.parent / "metadata.jsonl")),
     ["metadata.jsonl", "outside --dataset-dir"]),
    (lambda folder: os.mkfifo(folder / "palette_3.txt"), ["palette_3.txt", "not a regular file"]),
    (lambda folder: os.mkfifo(folder / "palette_9.png"), ["palette_9.png", "not a regular file"]),
    # A file_name is a path too: text it can hold, of a length the file system takes.
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "p\\ud800.png", "text": "x"}'),
     ["file_name in", "metadata.jsonl line 1", "not valid UTF-8"]),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "p\\u0000.png", "text": "x"}'),
     ["file_name in", "NUL"]),
    (lambda folder: (folder / "metadata.jsonl").write_text('{"file_name": "' + "a" * 300 + '.png", "text": "x"}'),
     ["metadata.jsonl line 1", "cannot be a file"]),
])
def test_a_bad_caption_file_or_metadata_line_is_named_in_one_line(quest, tmp_path, damage, words):
    folder = write_mixed_folder(tmp_path / "mixed")
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.png")
    damage(folder)
    with pytest.raises(SystemExit) as exit_info:
        quest.read_folder(quest.parse_args(["--dataset-dir", str(folder), "--output-dir", str(tmp_path)]))
    for word in words:
        assert word in message(exit_info)


def test_dataset_name_loads_an_imagefolder_through_datasets_and_offline_is_one_line(quest, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub
    folder = write_captioned_images(tmp_path / "imagefolder", CAPTIONS, metadata=True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    args = quest.parse_args(["--dataset-name", str(folder), "--output-dir", str(tmp_path / "seal")])
    images, captions, sources = quest.read_hub_dataset(args)
    assert sorted(captions) == sorted(caption for _, caption in CAPTIONS.values()) and sources["--caption-column"] == 2
    assert len(quest.load_palette(images, 32)) == 2  # decoded and checked like the folder's images
    with pytest.raises(SystemExit) as exit_info:
        quest.read_hub_dataset(quest.parse_args(["--dataset-name", str(folder), "--caption-column", "prompt",
                                                 "--output-dir", str(tmp_path / "seal")]))
    assert "no column 'prompt'" in message(exit_info) and "--caption-column" in message(exit_info)
    # Offline (the library's own switch, as HF_HUB_OFFLINE=1 sets it): a hub name is one line, nothing downloaded.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        quest.read_hub_dataset(quest.parse_args(["--dataset-name", "someone/palettes", "--output-dir",
                                                 str(tmp_path / "seal")]))
    assert "--dataset-name someone/palettes" in message(exit_info) and "connect to the internet" in message(exit_info)


# ---------------------------------------------------------------- failures leave nothing behind
def test_missing_or_empty_dataset_dir_fails_cleanly_without_output(quest, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--dataset-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "seal")])
    assert "datasetDir" in message(exit_info) and "nowhere" in message(exit_info)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures here")
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--dataset-dir", str(tmp_path / "notes"), "--output-dir", str(tmp_path / "seal")])
    assert "no images" in message(exit_info) and "notes" in message(exit_info)
    assert not (tmp_path / "seal").exists()


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_output_dir_fails_before_any_work(quest, palette, tmp_path, where):
    (tmp_path / "a-file").write_text("x")
    output = tmp_path / "a-file" / "seal" if where == "under-a-file" else Path("/proc/seal")
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--dataset-dir", str(palette), "--output-dir", str(output), "--model-id", "never-loaded"])
    expected = "under the file" if where == "under-a-file" else "not writable"
    assert "--output-dir" in message(exit_info) and expected in message(exit_info)


def test_unloadable_model_folder_fails_cleanly_naming_it(quest, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        quest.load_components(str(tmp_path))  # a folder without the pipeline's subfolders
    assert "could not load" in message(exit_info) and str(tmp_path) in message(exit_info)


@pytest.mark.parametrize("width", [-5, "abc"])
def test_a_unet_config_diffusers_cannot_build_is_one_line(quest, tiny_sd, tmp_path, width):
    """cross_attention_dim -5 makes torch raise RuntimeError inside from_pretrained, "abc" a TypeError."""
    model = shutil.copytree(tiny_sd, tmp_path / "model")
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": width}))
    with pytest.raises(SystemExit) as exit_info:
        quest.load_components(str(model))
    assert "could not load" in message(exit_info) and str(model) in message(exit_info)


def test_a_model_whose_parts_do_not_fit_is_one_line_before_any_caching(quest, tiny_sd, palette, tmp_path,
                                                                       one_thread):
    """A UNet that attends to text 64 wide beside a text encoder that gives 32 (as an SDXL folder's 2048 beside
    CLIP-L's 768): refused right after loading, not 79 lines of traceback after caching the latents."""
    from diffusers import UNet2DConditionModel
    model = shutil.copytree(tiny_sd, tmp_path / "mixed-model", ignore=shutil.ignore_patterns("unet"))
    config = UNet2DConditionModel.load_config(Path(tiny_sd) / "unet")
    UNet2DConditionModel.from_config({**config, "cross_attention_dim": 64}).save_pretrained(model / "unet")
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--model-id", str(model), "--dataset-dir", str(palette), "--output-dir", str(tmp_path / "seal"),
                    *map(str, TINY_RUN), "--device", "cpu"])
    for word in (str(model), "do not fit", "64 wide", "gives 32"):
        assert word in message(exit_info)
    assert not (tmp_path / "seal").exists()
    # A VAE scaling factor that is not a positive number would make every latent NaN or 0: said as such, not as a
    # divergence to cure with a lower learning rate.
    shutil.rmtree(model / "unet")
    shutil.copytree(Path(tiny_sd) / "unet", model / "unet")
    config = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": float("nan")}))
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--model-id", str(model), "--dataset-dir", str(palette), "--output-dir", str(tmp_path / "seal"),
                    *map(str, TINY_RUN), "--device", "cpu"])
    assert "scaling_factor is nan" in message(exit_info) and not (tmp_path / "seal").exists()


@pytest.mark.slow
def test_the_result_comes_last_and_a_failed_validation_leaves_no_success(trained, tiny_sd, palette, quest, tmp_path,
                                                                          monkeypatch, capsys, one_thread):
    """Resumed for its last step with new captions (a note says so), then validation fails (out of memory, as on a
    small GPU): one line, no result.json (the earlier run's, which described the replaced LoRA, is gone), no JSON line;
    the LoRA files are complete."""
    out_dir, _, _ = trained("cpu")
    seal = tmp_path / "seal"
    shutil.copytree(out_dir / "checkpoint-3", seal / "checkpoint-3")
    (seal / "result.json").write_text('{"success": true}')  # an earlier run's

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(quest, "render_validation_images", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--model-id", str(tiny_sd), "--dataset-dir", str(palette), "--output-dir", str(seal),
                    *map(str, TINY_RUN[:-2]), "--train-prompt", "new captions", "--resume", "latest",
                    "--validation-prompts", PROMPT, "--device", "cpu"])
    for word in ("validation images could not be rendered", "out of memory", "result.json",
                 "run the same command again with --resume latest"):  # a fresh run would be refused: it has checkpoints
        assert word in message(exit_info)
    out = capsys.readouterr().out
    assert "note: the captions" in out and "resumed from" in out and '"success"' not in out
    assert not (seal / "result.json").exists()
    assert len(lora_weights(seal)) > 0 and (seal / KOHYA_FILE).is_file()


@pytest.mark.slow
def test_a_full_disk_keeps_the_old_lora_and_leaves_no_temp_file(trained, tiny_sd, quest, tmp_path, monkeypatch):
    out_dir, _, _ = trained("cpu")
    shutil.copy(out_dir / "pytorch_lora_weights.safetensors", tmp_path)
    before = (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet.add_adapter(quest.LoraConfig(**quest.lora_shape(quest.parse_args(["--output-dir", str(tmp_path)]))))

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(quest.os, "fsync", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        quest.save_lora(unet, tmp_path, {"ss_output_name": "seal"})
    assert "disk is full" in message(exit_info) and "pytorch_lora_weights.safetensors" in message(exit_info)
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_lora_weights.safetensors"]


@pytest.mark.slow
def test_one_step_to_infinity_stops_naming_the_learning_rate_and_changes_no_earlier_output(trained, tiny_sd,
                                                                                          palette, env, tmp_path):
    """lr 1e30 for one step: the loss (computed before the step) is finite, the weights after it are not usable. An
    earlier good run's files stay byte-identical."""
    out_dir, _, _ = trained("cpu")
    seal = shutil.copytree(out_dir, tmp_path / "seal", ignore=shutil.ignore_patterns("checkpoint-*", "validation*"))
    before = {path: path.read_bytes() for path in seal.rglob("*") if path.is_file()}
    proc = run_script(SCRIPT, "--model-id", tiny_sd, "--dataset-dir", palette, "--output-dir", seal,
                      *TINY_RUN[:-6], "--max-train-steps", 1, "--learning-rate", 1e30, "--train-prompt", PROMPT,
                      "--device", "cpu", cwd=tmp_path, env=env)
    assert_clean_failure(proc, "--learning-rate", "step 1", "nothing was written")
    assert {path: path.read_bytes() for path in seal.rglob("*") if path.is_file()} == before
    assert '"success"' not in proc.stdout


@pytest.mark.slow
# ---------------------------------------------------------------- checkpoints and resume
@pytest.mark.slow
def test_resume_refuses_what_is_not_a_complete_checkpoint(trained, quest, tmp_path):
    out_dir, _, _ = trained("cpu")
    renamed = shutil.copytree(out_dir / "checkpoint-3", tmp_path / "my-backup")
    half = shutil.copytree(out_dir / "checkpoint-3", tmp_path / "checkpoint-7")
    (half / "checkpoint.json").unlink()  # as a checkpoint cut off mid-write by an older version would be
    other_rank = shutil.copytree(out_dir / "checkpoint-3", tmp_path / "checkpoint-3")
    marker = json.loads((other_rank / "checkpoint.json").read_text())
    (other_rank / "checkpoint.json").write_text(json.dumps({**marker, "lora": {**marker["lora"], "r": 8}}))
    for folder, words in [(out_dir, ["final output folder", "checkpoint-N", "--resume latest"]),
                          (renamed, ["not named checkpoint-N"]),
                          (half, ["not a complete checkpoint"]),
                          (other_rank, ["r 8", "--rank 8"]),
                          (tmp_path / "nowhere", ["not a folder"])]:
        with pytest.raises(SystemExit) as exit_info:
            quest.parse_args(["--resume", str(folder)])
        text = message(exit_info)
        assert str(folder) in text
        for word in words:
            assert word in text


@pytest.mark.slow
def test_resume_latest_picks_the_newest_complete_checkpoint(trained, quest, tmp_path):
    out_dir, _, _ = trained("cpu")
    shutil.copytree(out_dir / "checkpoint-3", tmp_path / "checkpoint-3")
    shutil.copytree(out_dir / "checkpoint-4", tmp_path / ".checkpoint-9.tmp")  # a save cut off before its rename
    (tmp_path / "checkpoint-8").mkdir()  # half-written by an older version: no marker, no optimizer state
    shutil.copy(out_dir / "checkpoint-4" / "pytorch_lora_weights.safetensors", tmp_path / "checkpoint-8")
    for name in ("checkpoint-\u00b2", "checkpoint-04"):  # str.isdigit takes '²', int() does not; '04' is no name of ours
        shutil.copytree(out_dir / "checkpoint-4", tmp_path / name)
    assert quest.newest_intact_checkpoint(tmp_path) == (tmp_path / "checkpoint-3", [])
    with pytest.raises(SystemExit) as exit_info:
        quest.parse_args(["--resume", str(tmp_path / "checkpoint-\u00b2")])
    assert "not named checkpoint-N" in message(exit_info)


def test_a_fresh_run_into_another_runs_checkpoints_is_refused(quest, tmp_path):
    """A run that does not continue the output folder's checkpoints refuses it: its own checkpoints would be rotated
    away as older than the earlier run's, and a stop would name the earlier run's checkpoint to resume from."""
    seal, namespace = tmp_path / "seal", quest.argparse.Namespace
    (seal / "checkpoint-159").mkdir(parents=True)
    (tmp_path / "other" / ".checkpoint-2.tmp").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        quest.parse_args(["--output-dir", str(seal)])  # refused before anything loads
    for word in ("checkpoint-159", "earlier run", "--resume latest", "another --output-dir"):
        assert word in message(exit_info)
    with pytest.raises(SystemExit):  # resuming another folder's checkpoint into it would mix the same way
        quest.check_no_other_run(namespace(output_dir=str(seal), resume=str(tmp_path / "other" / "checkpoint-3")))
    for resume in ("latest", str(seal / "checkpoint-159")):  # continuing that run is fine
        quest.check_no_other_run(namespace(output_dir=str(seal), resume=resume))
    (seal / "checkpoint-156").mkdir()  # going back to an earlier one while newer ones remain would mix them too
    with pytest.raises(SystemExit) as exit_info:
        quest.check_no_other_run(namespace(output_dir=str(seal), resume=str(seal / "checkpoint-156")))
    for word in ("newer checkpoints (checkpoint-159)", "delete them", "--resume latest"):
        assert word in message(exit_info)
    quest.parse_args(["--output-dir", str(tmp_path / "other")])  # a temp folder alone is no checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("plant", ["pickle in random_states_0.pkl", "torch.save zip in random_states_0.pkl",
                                   "torch.save zip in optimizer.bin"])
def test_a_checkpoint_holding_pickled_code_is_refused_without_running_it(trained, palette, quest, tmp_path, plant):
    """People pass checkpoint folders around to continue a training: no file in one may run code when read, neither
    in the damage check nor in accelerate's load_state (which reads the same files the same way)."""
    from accelerate.utils.other import load as accelerate_load
    out_dir, _, _ = trained("cpu")
    seal, marker = tmp_path / "seal", tmp_path / "code-ran"
    for name in ("checkpoint-3", "checkpoint-4"):
        shutil.copytree(out_dir / name, seal / name)
    name = plant.split(" in ")[1]
    payload = {"step": 4, "x": CreatesAFile(marker)}
    if plant.startswith("pickle"):
        (seal / "checkpoint-4" / name).write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, seal / "checkpoint-4" / name)
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--resume", "latest", "--output-dir", str(seal), "--dataset-dir", str(palette),
                    "--model-id", "never-loaded", "--device", "cpu"])
    text = message(exit_info)
    for word in (str(seal / "checkpoint-4"), name, "could run code", "--resume latest continues",
                 str(seal / "checkpoint-3")):
        assert word in text
    with pytest.raises(Exception):  # accelerate.load_state's reader refuses it as well
        accelerate_load(seal / "checkpoint-4" / name)
    assert not marker.exists(), "unpickling ran the planted code"
    assert quest.what_was_kept(seal).startswith(f"the newest checkpoint is {seal / 'checkpoint-3'}")


class CreatesAFile:
    """What a hostile checkpoint would hold: unpickling it calls open(path, 'w'), creating the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.slow
def test_resume_from_another_architecture_is_one_line(trained, tiny_sd, quest, tmp_path):
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    out_dir, _, _ = trained("cpu")
    checkpoint = shutil.copytree(out_dir / "checkpoint-3", tmp_path / "checkpoint-3")
    weights = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    first = sorted(key for key in weights if key.endswith("lora.down.weight"))[0]
    weights[first] = torch.zeros(16, weights[first].shape[1] * 2)  # a wider layer: another model's LoRA
    save_file(weights, checkpoint / "pytorch_lora_weights.safetensors")
    args = quest.parse_args(["--resume", str(checkpoint), "--output-dir", str(tmp_path / "seal")])
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet.add_adapter(quest.LoraConfig(**quest.lora_shape(args)))
    with pytest.raises(SystemExit) as exit_info:  # refused before anything is loaded into the UNet or optimizer
        quest.resume(checkpoint, args, Accelerator(cpu=True), unet, optimizer=None)
    assert "another model" in message(exit_info) and "--model-id" in message(exit_info)


@pytest.mark.slow
def test_sigterm_like_ctrl_c_names_the_checkpoint_to_resume_from(tiny_sd, palette, env, tmp_path):
    """SIGTERM (what `timeout` or a scheduler sends) mid-training; Ctrl-C takes the same path (exit_interrupted), and
    both are sent for real while the libraries load (below)."""
    sig, code = signal.SIGTERM, 143
    out_dir = tmp_path / "seal"
    proc = interrupt_script(SCRIPT, "--model-id", tiny_sd, "--dataset-dir", palette, "--output-dir", out_dir,
                            *TINY_RUN[:6], "--max-train-steps", 100_000, "--checkpointing-steps", 2, "--device", "cpu",
                            ready="saved ", cwd=tmp_path, env=env, sig=sig)
    assert proc.returncode == code, proc.stderr
    line = assert_clean_failure(proc, "interrupted (Ctrl-C)" if sig == signal.SIGINT else "stopped by SIGTERM",
                                "--resume latest")
    named = Path(line.split("newest checkpoint is ")[1].split(":")[0])
    assert named.parent == out_dir and named.name.startswith("checkpoint-")
    assert (named / "checkpoint.json").is_file() and (named / "optimizer.bin").is_file()
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")], "a half-written checkpoint was left"
    assert not (out_dir / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_libraries_load_is_one_line(tmp_path, sig):
    proc = stop_while_starting(SCRIPT, "--help", cwd=tmp_path, sig=sig)
    assert proc.returncode == 128 + sig
    assert_clean_failure(proc, "interrupted while starting")


def test_config_from_a_fifo_or_a_device_is_refused_without_reading(quest, tmp_path):
    fifo = tmp_path / "settings.json"
    os.mkfifo(fifo)  # a read would block forever: nobody writes to it
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            quest.parse_args(["--config", str(path)])
        assert str(path) in message(exit_info) and "not a regular file" in message(exit_info)


@pytest.mark.slow
@pytest.mark.parametrize("damage, words", [
    (lambda folder: (folder / "checkpoint.json").write_text('{"step": 4, "lora": 16}'), ["'lora'"]),
    (lambda folder: (folder / "checkpoint.json").write_text('{"step": 4'), ["checkpoint.json", "does not load"]),
    (lambda folder: truncate(folder / "pytorch_lora_weights.safetensors"), ["pytorch_lora_weights", "does not load"]),
    (lambda folder: truncate(folder / "optimizer.bin"), ["optimizer.bin", "does not load"]),
    (lambda folder: truncate(folder / "random_states_0.pkl"), ["random_states_0.pkl", "does not load"]),
    (lambda folder: (folder / "loss_log.csv").write_text("step,loss\n1,x\n"), ["loss_log.csv"]),
    # A FIFO would block the read forever: every file is checked to be a regular file before it is opened.
    (lambda folder: ((folder / "optimizer.bin").unlink(), os.mkfifo(folder / "optimizer.bin")),
     ["optimizer.bin", "not a regular file"]),
    (lambda folder: ((folder / "loss_log.csv").unlink(), os.mkfifo(folder / "loss_log.csv")),
     ["loss_log.csv", "not a regular file"]),
    (lambda folder: (folder / "checkpoint.json").write_text("[" * 100_000 + "]" * 100_000),
     ["checkpoint.json", "nested too deeply"]),
    # Loadable, but no RNG states accelerate could set (it would skip them without a word).
    (lambda folder: torch.save({"step": 4, "random_state": (3, (1, 2), None)}, folder / "random_states_0.pkl"),
     ["random_states_0.pkl", "random-number states"]),
])
def test_a_damaged_newest_checkpoint_is_named_with_the_intact_one_to_use(trained, quest, tmp_path, damage, words):
    out_dir, _, _ = trained("cpu")
    for name in ("checkpoint-3", "checkpoint-4"):
        shutil.copytree(out_dir / name, tmp_path / name)
    damage(tmp_path / "checkpoint-4")
    with pytest.raises(SystemExit) as exit_info:
        quest.resume_checkpoint(quest.parse_args(["--resume", "latest", "--output-dir", str(tmp_path)]))
    text = message(exit_info)
    for word in ["newest checkpoint", str(tmp_path / "checkpoint-4"), "delete it", "--resume latest continues",
                 str(tmp_path / "checkpoint-3"), *words]:
        assert word in text
    # A stopped run names the intact one too, and never trips over the damaged one.
    assert quest.what_was_kept(tmp_path) == f"the newest checkpoint is {tmp_path / 'checkpoint-3'}: delete the " \
                                            "damaged checkpoint-4 and run the same command with --resume latest " \
                                            "to continue"
    with pytest.raises(SystemExit) as exit_info:
        quest.parse_args(["--resume", str(tmp_path / "checkpoint-4")])
    assert "is damaged" in message(exit_info)
    # The way it names works: without the damaged one, --resume latest picks the intact one.
    shutil.rmtree(tmp_path / "checkpoint-4")
    assert quest.resume_checkpoint(quest.parse_args(["--resume", "latest", "--output-dir", str(tmp_path)])) == \
        tmp_path / "checkpoint-3"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
