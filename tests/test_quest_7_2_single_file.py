"""quest_7_2.py on a single-file SD v1.x checkpoint (the original LDM layout of A1111's, ComfyUI's and model sites'
files), offline.

write_single_file (tools/kit.py) writes the tiny random pipeline folder as one such file; diffusers' own
from_single_file reads it back to the folder's weights, so the folder is the reference the file is compared against.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import OFFLINE_ENV, REPO, import_script, message, result_json
from tools.kit import write_single_file

SCRIPT = "quest_7_2.py"
KOHYA_FILE = "lora_kohya_for_a1111_forge_comfyui.safetensors"
PROMPT = "a red seal"
TINY_RUN = ["--resolution", "32", "--train-batch-size", "2", "--gradient-accumulation-steps", "1",
            "--max-train-steps", "2", "--learning-rate", "1e-2", "--train-prompt", PROMPT]


@pytest.fixture(scope="module")
def quest():
    return import_script(SCRIPT)


@pytest.fixture(scope="module")
def single_file(tiny_sd, tmp_path_factory):
    return write_single_file(tiny_sd, tmp_path_factory.mktemp("single") / "my-model-v1.safetensors")


def weights(model):
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def assert_same_weights(found, expected):
    assert found.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(found[key], tensor), key


def write_ckpt(path, state_dict, legacy=False, **extra):
    """A .ckpt shaped like the released SD v1.x ones: PyTorch Lightning's dict with the weights under state_dict, the
    step, and the callback state keyed by pytorch_lightning's ModelCheckpoint class (stood in for here: the pickle names
    the class, and pytorch_lightning is not installed), holding numpy scalars and dtypes as Lightning's did. legacy:
    torch's pre-zip format, with numpy 1.x's module names (numpy.core), as files written in 2022 have them."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    modules = {name: types.ModuleType(name) for name in names}
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[names[-1]].ModelCheckpoint = model_checkpoint
    sys.modules.update(modules)
    try:
        callback_state = {"best_model_path": "", "best_model_score": np.float64(0.118), "dtype": np.dtype("float32"),
                          "scores": np.arange(3, dtype=np.int64)}
        checkpoint = {"state_dict": state_dict, "global_step": 470000, "epoch": 6,
                      "callbacks": {model_checkpoint: callback_state}, **extra}
        if legacy:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer, _use_new_zipfile_serialization=False)
            path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
        else:
            torch.save(checkpoint, path)
    finally:
        for name in names:
            del sys.modules[name]
    return path


# ---------------------------------------------------------------- the file and what loads from it
def test_write_single_file_is_the_ldm_layout_and_diffusers_loads_it_to_the_folders_weights(tiny_sd, single_file):
    with safe_open(single_file, "pt") as file:
        names = set(file.keys())
    for name in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                 "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
                 "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert name in names, name
    assert not any(name.startswith(("unet.", "vae.", "text_encoder.", "down_blocks.")) for name in names)
    folder = StableDiffusionPipeline.from_pretrained(tiny_sd)
    from_file = StableDiffusionPipeline.from_single_file(str(single_file), config=str(tiny_sd))
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(weights(getattr(from_file, part)), weights(getattr(folder, part)))


def test_the_script_loads_the_file_and_a_lightning_ckpt_to_the_folders_model(quest, tiny_sd, single_file, tmp_path):
    """The UNet, VAE and text encoder (and tokenizer, scheduler) the script trains on are the folder's, from the
    .safetensors file and from a .ckpt shaped like the released ones (read without unpickling any code)."""
    reference = quest.load_components(str(tiny_sd))
    ckpt = write_ckpt(tmp_path / "my-model-v1.ckpt", load_file(single_file))
    legacy_ckpt = write_ckpt(tmp_path / "my-model-v1-2022.ckpt", load_file(single_file), legacy=True)
    assert b"numpy.core.multiarray\nscalar" in legacy_ckpt.read_bytes()
    # Files often carry tensors diffusers does not use (an EMA copy, a text projection): they load all the same.
    extras = tmp_path / "my-model-v1-with-extras.safetensors"
    save_file({**load_file(single_file), "model_ema.decay": torch.tensor(0.9999),
               "cond_stage_model.transformer.text_projection.weight": torch.zeros(32, 32)}, extras)
    for path in (single_file, ckpt, legacy_ckpt, extras):
        quest.check_model_file(str(path), str(tiny_sd))
        tokenizer, *models, scheduler = quest.load_components(str(path), str(tiny_sd))
        for found, expected in zip(models, reference[1:4]):
            assert_same_weights(weights(found), weights(expected))
            assert not any(p.requires_grad for p in found.parameters())
        assert tokenizer.get_vocab() == reference[0].get_vocab()
        assert type(scheduler) is type(reference[4]) and dict(scheduler.config) == dict(reference[4].config)
    # Most files on model sites hold fp16 weights: they load as fp32 models (the script picks the training dtype).
    half = tmp_path / "my-model-v1-fp16.safetensors"
    save_file({key: tensor.half() if tensor.is_floating_point() else tensor
               for key, tensor in load_file(single_file).items()}, half)
    quest.check_model_file(str(half), str(tiny_sd))
    for found, expected in zip(quest.load_components(str(half), str(tiny_sd))[1:4], reference[1:4]):
        assert {p.dtype for p in found.parameters()} == {torch.float32}
        assert_same_weights(weights(found), {key: t.half().float() for key, t in weights(expected).items()})


# ---------------------------------------------------------------- training from the file
@pytest.fixture(scope="module")
def runs(quest, tiny_sd, single_file, palette, tmp_path_factory):
    """The same tiny run (same seed) from the folder and from the file, in-process: {'folder'|'file': output dir}. The
    file's run also keeps checkpoints and renders validation images (base model left, LoRA right) during training and
    from the file at the end."""
    folders = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for source, model in (("folder", [str(tiny_sd)]),
                              ("file", [str(single_file), "--model-config", str(tiny_sd),
                                        "--validation-prompts", PROMPT, "--validation-steps", "2",
                                        "--validation-every", "2", "--checkpointing-steps", "1"])):
            folders[source] = tmp_path_factory.mktemp(source) / "seal"
            quest.main(["--model-id", *model, "--dataset-dir", str(palette), "--output-dir", str(folders[source]),
                        *TINY_RUN])
    finally:
        torch.set_num_threads(threads)
    return folders


def test_the_same_seed_trains_the_same_lora_from_the_file_as_from_the_folder(runs):
    for name in ("pytorch_lora_weights.safetensors", KOHYA_FILE):
        from_folder, from_file = load_file(runs["folder"] / name), load_file(runs["file"] / name)
        assert from_file.keys() == from_folder.keys()
        for key, tensor in from_folder.items():
            torch.testing.assert_close(from_file[key], tensor, rtol=0, atol=0)
    ups = [tensor for key, tensor in load_file(runs["file"] / "pytorch_lora_weights.safetensors").items()
           if ".lora.up." in key]
    assert any(tensor.abs().max() > 0 for tensor in ups), "nothing was trained"
    with safe_open(runs["file"] / KOHYA_FILE, "pt") as file:
        assert file.metadata()["ss_sd_model_name"] == "my-model-v1.safetensors"
    assert (runs["file"] / "validation_0.png").is_file() and (runs["file"] / "validation" / "step-2_0.png").is_file()


def test_resume_and_init_lora_work_from_the_file(quest, runs, single_file, tiny_sd, palette, tmp_path, one_thread):
    """--resume from the file run's checkpoint-1 ends at its LoRA; --init-lora with its LoRA and a learning rate too
    small to move anything saves that LoRA again."""
    common = ["--model-id", str(single_file), "--model-config", str(tiny_sd), "--dataset-dir", str(palette),
              *TINY_RUN]
    quest.main([*common, "--output-dir", str(tmp_path / "resumed"), "--resume", str(runs["file"] / "checkpoint-1")])
    quest.main([*common, "--output-dir", str(tmp_path / "continued"), "--init-lora", str(runs["file"]),
                "--max-train-steps", "1", "--learning-rate", "1e-12"])
    finished = load_file(runs["file"] / "pytorch_lora_weights.safetensors")
    for folder, atol in (("resumed", 1e-5), ("continued", 1e-6)):
        found = load_file(tmp_path / folder / "pytorch_lora_weights.safetensors")
        for key, tensor in finished.items():
            torch.testing.assert_close(found[key], tensor, rtol=1e-4 if folder == "resumed" else 0, atol=atol)


def cache_as_default_config(quest, folder, hub):
    """The configs and tokenizer of `folder` in a Hugging Face cache `hub`, as if fetched for diffusers' default SD v1.x
    id (what `hf download <id> --include '*.json' --include '*.txt'` brings, into the cache's layout)."""
    snapshot = hub / f"models--{quest.SD_V1_CONFIG.replace('/', '--')}" / "snapshots" / ("0" * 40)
    for file in folder.rglob("*"):
        if file.is_file() and file.suffix in (".json", ".txt"):
            (snapshot / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / file.relative_to(folder)).write_bytes(file.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return hub


def test_without_model_config_diffusers_default_is_used_and_named(quest, single_file, tiny_sd, tmp_path,
                                                                  monkeypatch, capsys):
    """No --model-config: the configs and tokenizer of diffusers' default for SD v1.x files, from the Hugging Face cache
    (offline here; online they are fetched, without weights), and the run says which."""
    import huggingface_hub.constants
    cache_as_default_config(quest, tiny_sd, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    quest.check_model_file(str(single_file), None)
    _, text_encoder, _, unet, _ = quest.load_components(str(single_file))
    assert f"configs and tokenizer of {quest.SD_V1_CONFIG}, diffusers' default" in capsys.readouterr().out
    reference = quest.load_components(str(tiny_sd))
    assert_same_weights(weights(unet), weights(reference[3]))
    assert_same_weights(weights(text_encoder), weights(reference[1]))
    # --validation-every's pipeline around the training parts: the cached configs (no weights) give the rest.
    pipeline = quest.stable_diffusion_pipeline(str(single_file), None, unet=unet, text_encoder=text_encoder,
                                               vae=reference[2], tokenizer=reference[0])
    assert pipeline.unet is unet and type(pipeline.scheduler).__name__ == "PNDMScheduler"


def test_the_kohya_metadata_names_the_file_with_kohyas_hashes_of_it(runs, single_file):
    """kohya's train_network.py: ss_sd_model_name = the file's name, ss_sd_model_hash = train_util.model_hash (the
    first 8 hex digits of the SHA-256 of the 64 KiB at 1 MiB), ss_new_sd_model_hash = train_util.calculate_sha256 (of
    the whole file). A folder model gets neither hash (kohya would write 'IsADirectory')."""
    data = single_file.read_bytes()
    assert len(data) > 0x110000  # the legacy window lies inside the file
    with safe_open(runs["file"] / KOHYA_FILE, "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_sd_model_name"] == single_file.name
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    with safe_open(runs["folder"] / KOHYA_FILE, "pt") as file:
        assert not {"ss_sd_model_hash", "ss_new_sd_model_hash"} & set(file.metadata())


def test_the_kohya_file_loads_onto_the_single_file_model_to_the_same_images(runs, tiny_sd, single_file, one_thread):
    pipeline = StableDiffusionPipeline.from_single_file(str(single_file), config=str(tiny_sd), safety_checker=None,
                                                        requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    images = {}
    for name in ("pytorch_lora_weights.safetensors", KOHYA_FILE):
        pipeline.load_lora_weights(runs["file"], weight_name=name, adapter_name=name.split(".")[0])
        pipeline.set_adapters(name.split(".")[0])
        images[name] = pipeline(PROMPT, height=32, width=32, num_inference_steps=2, output_type="np",
                                generator=torch.Generator().manual_seed(0)).images
    pipeline.disable_lora()
    base = pipeline(PROMPT, height=32, width=32, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(images[KOHYA_FILE], images["pytorch_lora_weights.safetensors"], atol=1e-6)
    assert np.abs(images[KOHYA_FILE] - base).max() > 1e-3, "the LoRA does not change the images"


# ---------------------------------------------------------------- bad input: one line, exit 1, nothing written
def bad_files(single_file, tmp_path):
    """{case: (path, words its one line must hold)}: files that are not an SD v1.x checkpoint."""
    tensors = load_file(single_file)
    unet = {key: tensor for key, tensor in tensors.items() if key.startswith("model.diffusion_model.")}

    def small():
        return torch.zeros(4, 4)  # a tensor each: safetensors refuses shared ones
    cases = {
        "sdxl": ({**unet, "conditioner.embedders.1.model.ln_final.weight": small()}, ["SDXL"]),
        "sd2": ({**unet, "cond_stage_model.model.token_embedding.weight": small()}, ["SD 2"]),
        "lora": ({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": small(),
                  "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": small()}, ["a LoRA", "--init-lora"]),
        "vae": ({key.removeprefix("first_stage_model."): tensor for key, tensor in tensors.items()
                 if key.startswith("first_stage_model.")}, ["VAE alone"]),
        "unet-only": (unet, ["no VAE", "no CLIP text encoder"]),
    }
    files = {}
    for case, (state, words) in cases.items():
        save_file(state, tmp_path / f"{case}.safetensors")
        files[case] = tmp_path / f"{case}.safetensors", words
    data = single_file.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    files["truncated"] = tmp_path / "truncated.safetensors", ["not a readable safetensors", "truncated"]
    (tmp_path / "notes.safetensors").write_text("a text file, not a model\n")
    files["text"] = tmp_path / "notes.safetensors", ["not a readable safetensors"]
    old_layout = {key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): tensor
                  for key, tensor in tensors.items()}
    save_file(old_layout, tmp_path / "old-layout.safetensors")
    files["old-layout"] = tmp_path / "old-layout.safetensors", ["old key layout", "text_model"]
    (tmp_path / "MY-MODEL.SAFETENSORS").write_bytes(single_file.read_bytes())  # diffusers takes lower case only
    files["upper-case"] = tmp_path / "MY-MODEL.SAFETENSORS", ["lower-case", "rename the file to MY-MODEL.safetensors"]
    (tmp_path / "truncated.ckpt").write_bytes(write_ckpt(tmp_path / "whole.ckpt", unet).read_bytes()[:5000])
    files["truncated-ckpt"] = tmp_path / "truncated.ckpt", ["does not load as a .ckpt"]
    return files


CASES = ["sdxl", "sd2", "lora", "vae", "unet-only", "truncated", "text", "old-layout", "upper-case", "truncated-ckpt"]


@pytest.mark.parametrize("case", CASES)
def test_a_file_that_is_not_an_sd_v1_checkpoint_is_one_line_before_anything_loads(quest, single_file, tiny_sd,
                                                                                   palette, tmp_path, case):
    path, words = bad_files(single_file, tmp_path)[case]
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--model-id", str(path), "--model-config", str(tiny_sd), "--dataset-dir", str(palette),
                    "--output-dir", str(tmp_path / "out")])
    line = message(exit_info)
    assert str(path) in line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "out").exists()


def test_a_ckpt_whose_pickle_would_run_code_is_refused_without_running_it(quest, single_file, tiny_sd, palette,
                                                                         tmp_path):
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = write_ckpt(tmp_path / "model.ckpt", load_file(single_file), ema=RunsCode())
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--model-id", str(path), "--model-config", str(tiny_sd), "--dataset-dir", str(palette),
                    "--output-dir", str(tmp_path / "out")])
    line = message(exit_info)
    assert "would run code" in line and "system" in line and ".safetensors" in line
    assert not marker.exists(), "the pickle ran its code"
    assert not (tmp_path / "out").exists()


def test_model_config_that_does_not_fit_the_file_is_one_line(quest, single_file, tiny_sd, palette, tmp_path):
    """A config folder of another architecture (here: 2 layers per block, not 1), or one that is not a diffusers
    folder, is refused from the file's tensor list; loading then would fail or leave weights unused."""
    other = tmp_path / "other-config"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (other / part).mkdir(parents=True)
        for file in (tiny_sd / part).glob("*.json"):
            (other / part / file.name).write_text(file.read_text())
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    for model_config, words in ((other, ["--model-config", "unet of", "the file holds"]),
                                (tmp_path / "palette-not-a-config", ["not a diffusers-format"])):
        model_config.mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exit_info:
            quest.main(["--model-id", str(single_file), "--model-config", str(model_config), "--dataset-dir",
                        str(palette), "--output-dir", str(tmp_path / "out")])
        for word in words:
            assert word in message(exit_info), message(exit_info)
    with pytest.raises(SystemExit) as exit_info:  # past the check, diffusers' own shape check says it in one line too
        quest.load_components(str(single_file), str(other))
    assert "could not build" in message(exit_info) and "--model-config" in message(exit_info)
    with pytest.raises(SystemExit) as exit_info:  # a folder brings its own configs
        quest.parse_args(["--model-id", str(tiny_sd), "--model-config", str(other), "--output-dir",
                          str(tmp_path / "out")])
    assert "drop --model-config" in message(exit_info)
    assert not (tmp_path / "out").exists()


def test_offline_without_model_config_says_what_to_pass(quest, single_file, palette, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE with an empty Hugging Face cache: diffusers' default configs cannot be had."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--model-id", str(single_file), "--dataset-dir", str(palette), "--output-dir",
                    str(tmp_path / "out")])
    line = message(exit_info)
    assert "pass --model-config DIR" in line and quest.SD_V1_CONFIG in line and "hf download" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_trains_from_the_file_and_says_which_configs_once(quest, single_file, tiny_sd, palette, tmp_path):
    """Two CPU processes on the file, without --model-config (diffusers' default configs from the cache, offline):
    the run names the configs once and writes the LoRA once."""
    hub = cache_as_default_config(quest, tiny_sd, tmp_path / "hub")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / SCRIPT),
               "--model-id", single_file, "--dataset-dir", palette, "--output-dir", tmp_path / "seal",
               "--device", "cpu", *TINY_RUN, "--train-batch-size", "1"]
    proc = subprocess.run([str(part) for part in command], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE_ENV, "OMP_NUM_THREADS": "1",
                               "HF_HUB_CACHE": str(hub)})
    assert result_json(proc)["steps"] == 2
    assert "training on 2 process(es)" in proc.stdout
    assert proc.stdout.count(f"configs and tokenizer of {quest.SD_V1_CONFIG}") == 1
    assert proc.stdout.count("wrote pytorch_lora_weights.safetensors") == 1
    with safe_open(tmp_path / "seal" / KOHYA_FILE, "pt") as file:
        assert file.metadata()["ss_sd_model_name"] == single_file.name
