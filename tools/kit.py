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
