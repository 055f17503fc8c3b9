"""Helpers shared by tests/ and bench/: real MNIST subsets, running a quest script as a user would, reading
its result, and a tiny random Stable Diffusion v1.x pipeline (no hub needed). No pytest in here.

    sys.path.insert(0, str(REPO)); from tools.kit import ...
"""
import errno
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MNIST = REPO / "assets" / "mnist-5k" / "MNIST" / "raw"

# A proxy on a closed local port makes every download fail at once, as on a machine
# that cannot reach the MNIST mirrors (and keeps tests from ever touching the network).
OFFLINE_ENV = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _read_idx(path):
    raw = path.read_bytes()
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return dims, raw[4 + 4 * ndim:]


def _write_idx(path, dims, payload):
    code = 0x08  # unsigned byte, as in MNIST
    path.write_bytes(struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload)


def write_mnist_subset(root, n_train, n_test):
    """Write the first n_train/n_test shipped digits as <root>/MNIST/raw (torchvision's layout)."""
    raw_dir = Path(root) / "MNIST" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        dims, pixels = _read_idx(SHIPPED_MNIST / f"{split}-images-idx3-ubyte")
        _write_idx(raw_dir / f"{split}-images-idx3-ubyte", (n, *dims[1:]), pixels[: n * dims[1] * dims[2]])
        _, labels = _read_idx(SHIPPED_MNIST / f"{split}-labels-idx1-ubyte")
        _write_idx(raw_dir / f"{split}-labels-idx1-ubyte", (n,), labels[:n])
    return Path(root)


def import_script(script):
    """A quest script imported as a module, for in-process checks of its parts."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args, cwd, env=None, timeout=600):
    """Run `python <script> args...` as a user would; returns the CompletedProcess with str output. The bytes
    are decoded without newline translation, so progress bars keep their carriage returns (terminal_lines)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE_ENV, **(env or {})}
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, timeout=timeout)
    proc.stdout, proc.stderr = (stream.decode(errors="replace") for stream in (proc.stdout, proc.stderr))
    return proc


def interrupt_script(script, *args, ready, cwd, env=None, timeout=120, sig=signal.SIGINT):
    """Run the script as a user would, wait for a stdout line that starts with `ready`, press Ctrl-C (a real
    SIGINT; sig=signal.SIGTERM sends what `timeout` or a scheduler sends) and return the CompletedProcess, str
    output with carriage returns kept. The child gets the default SIGINT handler: a job started in the
    background (`cmd &`, CI under nohup) hands SIGINT down ignored, and Python then never raises
    KeyboardInterrupt. stderr goes to a file, so progress bars never block on a pipe."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE_ENV, **(env or {})}
    command = [sys.executable, str(REPO / script), *map(str, args)]
    with tempfile.TemporaryFile() as stderr_file:
        process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=stderr_file,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            seen = []
            for line in process.stdout:
                seen.append(line)
                if line.decode(errors="replace").startswith(ready):
                    break
            process.send_signal(sig)
            rest, _ = process.communicate(timeout=timeout)
        finally:
            process.kill()  # only if it is still running after a failed wait
        stderr_file.seek(0)
        stderr = stderr_file.read().decode(errors="replace")
    stdout = (b"".join(seen) + rest).decode(errors="replace")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def stop_while_starting(script, *args, cwd, sig=signal.SIGINT, after_s=0.4):
    """Run the script and send `sig` after_s seconds in, while it is still importing torch (which takes seconds);
    returns the CompletedProcess with str output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE_ENV}
    process = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=full_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after_s)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout.decode(errors="replace"),
                                       stderr.decode(errors="replace"))


def result_json(proc):
    """The script's final JSON line (its OutputResult)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


def terminal_lines(text):
    """What a terminal shows of a stream: progress bars redraw their line with carriage returns, so each line
    is what follows its last \\r; blank lines dropped."""
    shown = (line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return [line for line in shown if line.strip()]


def assert_clean_failure(proc, *words):
    """Non-zero exit, no traceback, and exactly one stderr line (as a terminal shows it) that names the problem."""
    lines = terminal_lines(proc.stderr)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one clear line on stderr, got:\n{proc.stderr}"
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


class FullDiskFile:
    """Stands in for a script's `open` (monkeypatch.setattr(script, "open", FullDiskFile, raising=False)): the real
    file, but the disk fills up halfway through the first write, as ENOSPC does."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self.file = open(path, mode, *args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)


# ---------------------------------------------------------------- a tiny random SD v1.x pipeline
# diffusers/transformers are imported here, not at the top: the MNIST tests need neither.
def _sd():
    import diffusers
    import transformers
    return diffusers, transformers


def tiny_tokenizer():
    """A CLIP tokenizer over single letters. transformers 5's CLIPTokenizer is tokenizers-backed: it takes vocab= and
    merges= (tuples of tokens in the vocab) directly; vocab_file=/merges_file= would be silently ignored."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    vocab["re</w>"] = len(vocab)
    return _sd()[1].CLIPTokenizer(vocab=vocab, merges=[("r", "e</w>")], model_max_length=77)


def save_pipeline(path, text_encoder, vae, unet):
    """An SD v1.x folder as from_pretrained expects it; the scheduler is SD 1.4's (PNDM, steps_offset=1)."""
    diffusers = _sd()[0]
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def build_tiny_pipeline(path):
    import torch
    diffusers, transformers = _sd()
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    unet = diffusers.UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8)
    return save_pipeline(path, text_encoder, vae, unet)


def write_palette(path, count=4, size=(48, 40)):
    """Random-colour images; odd sizes and an RGBA one, as users' folders have (the script crops and converts)."""
    import numpy as np
    from PIL import Image
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        mode = "RGBA" if index == 0 else "RGB"
        pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(path / f"palette_{index}.png")
    return path


def write_captioned_images(path, captions, size=(40, 40), metadata=False):
    """Noisy one-colour images, one per {name: (rgb, caption)}: each caption written kohya's way (name.txt beside
    name.png), or with metadata=True as datasets' imagefolder metadata.jsonl ({"file_name", "text"} per line)."""
    import numpy as np
    from PIL import Image
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for name, (colour, caption) in captions.items():
        pixels = np.clip(np.array(colour)[None, None] + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(path / f"{name}.png")
        if metadata:
            lines.append(json.dumps({"file_name": f"{name}.png", "text": caption}))
        else:
            (path / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    if metadata:
        (path / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _ldm_unet_prefixes(config):
    """{diffusers prefix: LDM prefix} for the blocks of a UNet2DConditionModel config: the inverse of diffusers'
    convert_ldm_unet_checkpoint, for any number of blocks and layers (scripts/convert_diffusers_to_original_stable_
    diffusion.py in diffusers' repo hard-codes SD v1's 4 blocks of 2 layers)."""
    layers, count = config["layers_per_block"], len(config["down_block_types"])
    prefixes = {"mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.0.": "middle_block.0.",
                "mid_block.resnets.1.": "middle_block.2."}
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(layers):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.0."
            if "CrossAttn" in kind:
                prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.1."
        if i < count - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
    for i, kind in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(layers + 1) * i + j}.0."
            if "CrossAttn" in kind:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(layers + 1) * i + j}.1."
        if i < count - 1:
            prefixes[f"up_blocks.{i}.upsamplers.0."] = \
                f"output_blocks.{(layers + 1) * i + layers}.{2 if 'CrossAttn' in kind else 1}."
    return prefixes


_LDM_UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                 "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
_LDM_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
                    "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.", "conv_shortcut.": "skip_connection."}
_LDM_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _replace_prefix(key, prefixes):
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _ldm_unet_key(key, prefixes):
    top = _replace_prefix(key, _LDM_UNET_TOP)
    if top != key:
        return top
    for old, new in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            return new + (_replace_prefix(rest, _LDM_UNET_RESNET) if ".resnets." in old else rest)
    raise KeyError(f"no LDM name for UNet weight {key}")


def _ldm_vae_key(key, config):
    """A diffusers AutoencoderKL weight's LDM name (the inverse of convert_ldm_vae_checkpoint)."""
    count = len(config["down_block_types"])
    part, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    if not part:  # quant_conv, post_quant_conv
        return key
    prefixes = {"conv_norm_out.": "norm_out.", "mid_block.attentions.0.": "mid.attn_1.",
                "mid_block.resnets.0.": "mid.block_1.", "mid_block.resnets.1.": "mid.block_2."}
    for i in range(count):
        prefixes[f"down_blocks.{i}.downsamplers.0."] = f"down.{i}.downsample."
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"up.{count - 1 - i}.upsample."
        for j in range(config["layers_per_block"] + 1):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"down.{i}.block.{j}."
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"up.{count - 1 - i}.block.{j}."
    renamed = _replace_prefix(rest, prefixes)
    if rest.startswith("mid_block.attentions."):
        renamed = "mid.attn_1." + _replace_prefix(rest[len("mid_block.attentions.0."):], _LDM_VAE_ATTENTION)
    elif ".resnets." in rest:
        renamed = renamed.replace(".conv_shortcut.", ".nin_shortcut.")
    return f"{part}.{renamed}"


def write_single_file(folder, path):
    """The diffusers-format SD v1.x pipeline in `folder` as ONE safetensors file in the original (LDM) key layout, as
    A1111, ComfyUI and model sites ship it: model.diffusion_model.* (UNet), first_stage_model.* (VAE, attention
    projections as 1x1 convolutions), cond_stage_model.transformer.text_model.* (CLIP text encoder, with its
    position_ids buffer like the released files). Test-only: the inverse of diffusers' convert_ldm_* key maps."""
    import torch
    from safetensors.torch import load_file, save_file
    folder = Path(folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    prefixes, tensors = _ldm_unet_prefixes(unet_config), {}
    for key, tensor in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        tensors["model.diffusion_model." + _ldm_unet_key(key, prefixes)] = tensor
    for key, tensor in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        if ".mid_block.attentions.0.to_" in key and key.endswith(".weight"):
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # LDM's attention projections are 1x1 convolutions
        tensors["first_stage_model." + _ldm_vae_key(key, vae_config)] = tensor
    text_encoder = load_file(folder / "text_encoder" / "model.safetensors")
    for key, tensor in text_encoder.items():
        tensors["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = tensor
    positions = text_encoder["embeddings.position_embedding.weight"].shape[0]
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(path))
    return Path(path)
