"""Bench for quest_7_2.py: training steps/s with and without the latent cache, and peak VRAM on CUDA.

CPU part (always): the tests' tiny random pipeline at 64 px, batch 1.
GPU part (only when CUDA is present): a random pipeline with SD v1.x's real configs (860M-parameter UNet,
the 4-block VAE, a CLIP ViT-L-sized text encoder) at 256 px, batch 1, fp16, with and without
--gradient-checkpointing. Random weights are fine for speed and memory.

Every figure comes from fresh processes that run quest_7_2.main() for N1 and N2 optimizer steps (on CPU each
twice, keeping the faster), timing its training loop (quest_7_2.train) apart: steps/s = (N2 - N1) /
(loop2 - loop1), so warm-up steps cancel out; "prep s" is the rest of the N1 run (loading, latent caching,
saving). Peak VRAM is torch.cuda.max_memory_allocated over the whole N2 run. On CPU the table also gives steps
per CPU-second of the process (time.process_time): with one torch thread it matches steps/s on an idle machine
and drifts less than wall time when other jobs share the cores (not zero: they share caches too).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lora.py
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.kit import build_tiny_pipeline, save_pipeline, write_palette  # noqa: E402

CPU_STEPS = (20, 120)
GPU_STEPS = (10, 110)
CPU_REPEATS = 2  # the faster of two runs: other jobs on a shared CPU only ever slow a run down


def worker(quest_args):
    """Run quest_7_2.main(quest_args) in this fresh process; print its wall time, the training loop's share and
    the peak VRAM as the last line."""
    spec = importlib.util.spec_from_file_location("quest_7_2", REPO / "quest_7_2.py")
    quest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quest)
    train, timing = quest.train, {}

    def timed_train(*args):
        start, cpu_start = time.perf_counter(), time.process_time()
        stats = train(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timing.update(loop=time.perf_counter() - start, loopCpu=time.process_time() - cpu_start)
        return stats

    quest.train = timed_train  # main() looks train up in the module when it calls it
    start = time.perf_counter()
    quest.main(quest_args)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps({"seconds": time.perf_counter() - start, "loopSeconds": timing["loop"],
                      "loopCpuSeconds": timing["loopCpu"], "peakVramGiB": peak}))


def measure(model, palette, work, device, resolution, steps, extra):
    runs = []
    for n in steps:
        quest_args = ["--model-id", model, "--dataset-dir", palette, "--output-dir", work / f"out-{n}",
                      "--device", device, "--resolution", resolution, "--train-batch-size", 1,
                      "--gradient-accumulation-steps", 1, "--max-train-steps", n, *extra]
        repeats = []
        for _ in range(CPU_REPEATS if device == "cpu" else 1):
            proc = subprocess.run([sys.executable, __file__, "--worker", *map(str, quest_args)], capture_output=True,
                                  text=True, env={**os.environ, "HF_HOME": str(work / "hf-home")})
            if proc.returncode != 0:
                sys.exit(f"error: the bench run {quest_args} failed:\n{proc.stderr[-2000:]}")
            repeats.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        runs.append(min(repeats, key=lambda run: run["loopSeconds"]))
    (n1, n2), (first, second) = steps, runs
    steps_per_cpu_second = (n2 - n1) / (second["loopCpuSeconds"] - first["loopCpuSeconds"])
    return {"steps/s": (n2 - n1) / (second["loopSeconds"] - first["loopSeconds"]),
            "steps/CPU-s": steps_per_cpu_second if device == "cpu" else None,
            "prep s": first["seconds"] - first["loopSeconds"], "peak VRAM GiB": second["peakVramGiB"]}


def build_sd1_sized_pipeline(path):
    """SD v1.x's component configs with random weights (the tokenizer is the tests' tiny one: ids only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    return save_pipeline(path, text_encoder, vae, unet)


def table(rows):
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = build_tiny_pipeline(work / "tiny")
        tiny_palette = write_palette(work / "palette-64", count=8, size=(72, 64))
        for cache in ("--cache-latents", "--no-cache-latents"):
            figures = measure(tiny, tiny_palette, work / f"cpu{cache}", "cpu", 64, CPU_STEPS, [cache])
            rows.append({"device": f"cpu, {torch.get_num_threads()} torch thread(s)", "model": "tiny", "px": 64,
                         "latent cache": cache == "--cache-latents", "grad ckpt": False, **figures})
        if torch.cuda.is_available():
            sd1 = build_sd1_sized_pipeline(work / "sd1")
            sd1_palette = write_palette(work / "palette-256", count=8, size=(320, 288))
            for checkpointing in ([], ["--gradient-checkpointing"]):
                for cache in ("--cache-latents", "--no-cache-latents"):
                    figures = measure(sd1, sd1_palette, work / f"gpu{cache}{len(checkpointing)}", "cuda", 256,
                                      GPU_STEPS, [cache, *checkpointing])
                    rows.append({"device": torch.cuda.get_device_name(), "model": "SD1.x-sized", "px": 256,
                                 "latent cache": cache == "--cache-latents", "grad ckpt": bool(checkpointing),
                                 **figures})
        else:
            print("no CUDA here: GPU part (SD1.x-sized UNet, 256 px, fp16, peak VRAM) skipped")
    print(table(rows))
    for device, model in {(row["device"], row["model"]) for row in rows}:
        same = [row for row in rows if (row["device"], row["model"]) == (device, model) and not row["grad ckpt"]]
        for rate in ("steps/s", "steps/CPU-s"):
            cached, live = (next(r[rate] for r in same if r["latent cache"] is flag) for flag in (True, False))
            if cached is not None:
                print(f"latent cache speed-up in {rate}, {model} on {device}: x{cached / live:.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
