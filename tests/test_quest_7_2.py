"""quest_7_2.py (LoRA on an SD v1.x UNet): tiny runs on a tiny random pipeline, offline, and the failure paths.

No hub here: build_tiny_pipeline writes a random SD v1.x-shaped pipeline with save_pretrained, as a user's
local model folder would look. The builders live in tools/kit.py (bench/bench_lora.py uses them too).
"""
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import DEVICES, assert_clean_failure, import_script, result_json, run_script
from tools.kit import build_tiny_pipeline, save_pipeline, tiny_tokenizer, write_palette  # noqa: F401

SCRIPT = "quest_7_2.py"
PROMPT = "a red seal"
# 4 images, 2 per batch, no accumulation: 2 optimizer steps per epoch, so 4 steps = 2 epochs and step 3 is mid-epoch.
# lr 1e-2: at the spec's 1e-4 a few steps move the tiny pipeline's output by less than a grey level.
TINY_RUN = ["--resolution", 32, "--train-batch-size", 2, "--gradient-accumulation-steps", 1, "--max-train-steps", 4,
            "--learning-rate", 1e-2, "--train-prompt", PROMPT]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def palette(tmp_path_factory):
    return write_palette(tmp_path_factory.mktemp("palette") / "images")


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    # datasets caches imagefolder under ~/.cache unless HF_HOME says otherwise; one torch thread keeps the tiny
    # runs quick on a small shared CPU (two threads per process thrash when several processes share two cores).
    return {"HF_HOME": str(tmp_path_factory.mktemp("hf-home")), "OMP_NUM_THREADS": "1"}


def train(tiny_model, palette, out_dir, *extra, env):
    return run_script(SCRIPT, "--model-id", tiny_model, "--dataset-dir", palette, "--output-dir", out_dir,
                      *TINY_RUN, *extra, cwd=out_dir.parent, env=env)


@pytest.fixture(scope="module")
def trained(tiny_model, palette, env, tmp_path_factory):
    """The main tiny run per device, run once and shared: (out_dir, result JSON, process)."""
    runs = {}

    def run(device):
        if device not in runs:
            out_dir = tmp_path_factory.mktemp(f"seal-{device}") / "artist_seal"
            proc = train(tiny_model, palette, out_dir, "--checkpointing-steps", 3, "--validation-prompts", PROMPT,
                         "--validation-steps", 2, "--device", device, env=env)
            runs[device] = out_dir, result_json(proc), proc
        return runs[device]
    return run


@pytest.fixture
def one_thread():
    """In-process inference on one thread, for the same reason as the subprocesses'; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quest():
    """The script as a module, for its argument parsing (fast, no subprocess)."""
    return import_script(SCRIPT)


def lora_weights(out_dir):
    return load_file(out_dir / "pytorch_lora_weights.safetensors")


# ---------------------------------------------------------------- the tiny run
@pytest.mark.parametrize("device", DEVICES)
def test_tiny_run_writes_lora_result_checkpoint_and_validation_image(trained, device):
    out_dir, result, proc = trained(device)
    assert result == json.loads((out_dir / "result.json").read_text())
    assert result["success"] is True and result["outputDir"] == str(out_dir.resolve())
    assert result["epochsCompleted"] == 2 and result["steps"] == 4
    assert 0 < result["finalLoss"] < 10
    assert "epoch 1/2: loss" in proc.stdout and "epoch 2/2: loss" in proc.stdout
    assert str(out_dir) in proc.stdout.splitlines()[-2]  # says where it wrote its files
    weights = lora_weights(out_dir)
    ups = [tensor for key, tensor in weights.items() if ".lora.up." in key]
    assert ups and all(key.startswith("unet.") for key in weights)
    assert any(tensor.abs().max() > 0 for tensor in ups), "LoRA up-projections start at zero: nothing was trained"
    assert (out_dir / "checkpoint-3" / "pytorch_lora_weights.safetensors").is_file()
    assert not list((out_dir / "checkpoint-3").glob("model*")), "a checkpoint holds the LoRA, not the frozen UNet"
    with Image.open(out_dir / "validation_0.png") as image:
        assert image.size == (64, 32)  # without | with the LoRA, 32 px each


def test_lora_reloads_at_trained_strength_and_infers_deterministically(trained, tiny_model, one_thread):
    out_dir, _, _ = trained("cpu")
    with safe_open(out_dir / "pytorch_lora_weights.safetensors", "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 16 and metadata["unet.lora_alpha"] == 32

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
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


def test_resume_mid_epoch_gives_the_uninterrupted_run(trained, tiny_model, palette, env, tmp_path):
    out_dir, _, _ = trained("cpu")
    proc = train(tiny_model, palette, tmp_path / "resumed", "--resume", out_dir / "checkpoint-3", "--device", "cpu",
                 env=env)
    assert result_json(proc)["steps"] == 4
    resumed, uninterrupted = lora_weights(tmp_path / "resumed"), lora_weights(out_dir)
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=1e-6)


def test_same_seed_same_run_with_or_without_cache_and_checkpointing(trained, tiny_model, palette, env, tmp_path):
    """Cached posteriors (both flips) and the live VAE draw the same random numbers, and gradient checkpointing
    recomputes the same activations: a second run with the same seed is the same training run."""
    out_dir, cached_result, _ = trained("cpu")
    proc = train(tiny_model, palette, tmp_path / "live", "--no-cache-latents", "--gradient-checkpointing",
                 "--device", "cpu", env=env)
    live_result = result_json(proc)
    assert live_result["finalLoss"] == pytest.approx(cached_result["finalLoss"], abs=1e-5)
    assert {**live_result, "outputDir": 0, "finalLoss": 0} == {**cached_result, "outputDir": 0, "finalLoss": 0}
    live, cached = lora_weights(tmp_path / "live"), lora_weights(out_dir)
    for key, tensor in cached.items():
        torch.testing.assert_close(live[key], tensor, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- settings
SPEC_DEFAULTS = {"dataset_dir": "../Quest_1/generated_palette", "output_dir": "artist_seal",
                 "model_id": "CompVis/stable-diffusion-v1-4", "resolution": 256, "train_batch_size": 1,
                 "gradient_accumulation_steps": 4, "learning_rate": 1e-4, "num_train_epochs": 100}


def test_defaults_equal_the_spec_and_help_shows_them(quest, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps help at the terminal width, even inside words with '-'
    args = quest.parse_args([])
    assert {key: getattr(args, key) for key in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert args.device == "auto" and args.seed == 0 and args.max_train_steps is None
    with pytest.raises(SystemExit) as exit_info:
        quest.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for shown in ("--config JSON_OR_PATH", "../Quest_1/generated_palette", "CompVis/stable-diffusion-v1-4",
                  "(default: 0.0001)", "--gradient-accumulation-steps", "--checkpointing-steps", "--resume"):
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
    ('{"resolution": 0}', ["--resolution", "positive"]),
    ("[1, 2]", ["JSON object"]),
    ("{not json", ["not valid JSON"]),
    ("missing.json", ["missing.json", "neither"]),
])
def test_bad_config_is_one_clear_line(quest, config, words):
    with pytest.raises(SystemExit) as exit_info:
        quest.parse_args(["--config", config])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    for word in words:
        assert word in message


# ---------------------------------------------------------------- failures leave nothing behind
def test_missing_dataset_dir_fails_cleanly_without_output(tiny_model, env, tmp_path):
    proc = run_script(SCRIPT, "--model-id", tiny_model, "--dataset-dir", tmp_path / "nowhere",
                      "--output-dir", tmp_path / "seal", cwd=tmp_path, env=env)
    assert_clean_failure(proc, "datasetDir", "nowhere")
    assert not (tmp_path / "seal").exists()


def test_dataset_dir_without_images_fails_cleanly_without_output(tiny_model, env, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures here")
    proc = run_script(SCRIPT, "--model-id", tiny_model, "--dataset-dir", tmp_path / "notes",
                      "--output-dir", tmp_path / "seal", cwd=tmp_path, env=env)
    assert_clean_failure(proc, "no images", "notes")
    assert not (tmp_path / "seal").exists()


def test_unloadable_model_id_fails_cleanly_naming_it(palette, env, tmp_path):
    proc = run_script(SCRIPT, "--model-id", "no-such-org/no-such-model", "--dataset-dir", palette,
                      "--output-dir", tmp_path / "seal", cwd=tmp_path, env=env)
    assert_clean_failure(proc, "could not load", "no-such-org/no-such-model")
    assert not (tmp_path / "seal").exists()
