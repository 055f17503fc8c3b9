"""Bench for quest_7_2.py on the real architecture: a pipeline with SD v1.x's component configs (the 860M-parameter
UNet, the 4-block VAE, a CLIP ViT-L-sized text encoder) and random weights, built here (no download). Random
weights are fine for speed and memory. 256 px, batch 1, no gradient accumulation.

CPU (when no CUDA, or --cpu): seconds per optimizer step with and without the latent cache, and peak RSS. A full
SD-size step takes seconds on a small CPU, so only a few steps are measured (--cpu-steps, default 6, the first
one is warm-up and not counted).
GPU (CUDA present): steps/s and peak VRAM for fp16 vs bf16 mixed precision, cached vs uncached latents, with and
without --gradient-checkpointing (8 runs, --gpu-steps each, default 40, the first 10 not counted).

Every figure comes from a fresh process that runs quest_7_2.main() as the script would run; the bench only wraps
quest_7_2.training_loss to time-stamp each step (a step ends in a host sync, .item() of its loss, so the interval
between two time stamps is one whole step). "prep s" is everything else in that process: loading the model,
decoding images, caching latents, saving the LoRA. Peak VRAM is torch.cuda.max_memory_allocated during training
(after the text encoder and, when caching, the VAE are freed) and over the whole run; peak RSS is the process's
ru_maxrss.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_lora.py          # CPU, about 2.5 min on 2 cores
    .venv/bin/python bench/bench_lora.py                            # on a CUDA machine: the GPU table
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.kit import save_pipeline, write_palette  # noqa: E402

WARMUP = {"cpu": 1, "cuda": 10}


def worker(quest_args):
    """Run quest_7_2.main(quest_args) in this fresh process; print step time stamps and memory as the last line."""
    import torch
    spec = importlib.util.spec_from_file_location("quest_7_2", REPO / "quest_7_2.py")
    quest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quest)
    stamps, training_loss, train = [], quest.training_loss, quest.train

    def stamped_loss(*args):
        stamps.append(time.perf_counter())
        return training_loss(*args)

    def train_with_peak(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stats = train(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            memory["trainPeakVramGiB"] = torch.cuda.max_memory_allocated() / 2**30
        stamps.append(time.perf_counter())
        return stats

    memory = {"trainPeakVramGiB": None}
    quest.training_loss, quest.train = stamped_loss, train_with_peak  # main() looks both up in the module
    start = time.perf_counter()
    quest.main(quest_args)
    print(json.dumps({"seconds": time.perf_counter() - start, "stamps": stamps, **memory,
                      "peakRssGiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def measure(model, palette, work, device, steps, extra):
    quest_args = ["--model-id", model, "--dataset-dir", palette, "--output-dir", work, "--device", device,
                  "--resolution", 256, "--train-batch-size", 1, "--gradient-accumulation-steps", 1,
                  "--max-train-steps", steps, *extra]
    proc = subprocess.run([sys.executable, __file__, "--worker", *map(str, quest_args)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"error: the bench run {quest_args} failed:\n{proc.stderr[-3000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    stamps = run["stamps"][WARMUP[device]:]  # the last stamp is the end of the training loop
    seconds_per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    loop = run["stamps"][-1] - run["stamps"][0]
    return {"s/step": seconds_per_step, "steps/s": 1 / seconds_per_step, "steps timed": len(stamps) - 1,
            "prep s": run["seconds"] - loop, "peak VRAM train GiB": run["trainPeakVramGiB"],
            "peak RSS GiB": run["peakRssGiB"]}


def build_sd1_sized_pipeline(path):
    """SD v1.x's component configs with random weights (the tokenizer is the tests' tiny one: ids only)."""
    import torch
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
    print(f"SD1.x-sized UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters", flush=True)
    return save_pipeline(path, text_encoder, vae, unet)


def table(rows):
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    import torch
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU table even when CUDA is present")
    parser.add_argument("--cpu-steps", type=int, default=6, help="optimizer steps per CPU run (1 is warm-up)")
    parser.add_argument("--gpu-steps", type=int, default=40, help="optimizer steps per GPU run (10 are warm-up)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sd1 = build_sd1_sized_pipeline(work / "sd1")
        palette = write_palette(work / "palette-256", count=8, size=(320, 288))
        print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
        if device == "cpu":
            name = f"cpu, {torch.get_num_threads()} torch threads"
            for cache in ("--cache-latents", "--no-cache-latents"):
                figures = measure(sd1, palette, work / f"out{cache}", "cpu", args.cpu_steps, [cache])
                rows.append({"device": name, "precision": "fp32", "latent cache": cache == "--cache-latents",
                             "grad ckpt": False, **figures})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        else:
            name = torch.cuda.get_device_name()
            for precision in ("fp16", "bf16"):
                for checkpointing in ([], ["--gradient-checkpointing"]):
                    for cache in ("--cache-latents", "--no-cache-latents"):
                        figures = measure(sd1, palette, work / f"out-{precision}{cache}{len(checkpointing)}", "cuda",
                                          args.gpu_steps, ["--mixed-precision", precision, cache, *checkpointing])
                        rows.append({"device": name, "precision": precision, "latent cache": cache == "--cache-latents",
                                     "grad ckpt": bool(checkpointing), **figures})
                        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nSD1.x-sized UNet (860M, random weights), 256 px, batch 1, torch {torch.__version__}; "
          f"bench wall time {time.perf_counter() - started:.0f} s")
    print(table(rows))
    same = [row for row in rows if not row["grad ckpt"] and row["precision"] == rows[0]["precision"]]
    cached, live = (next(r["s/step"] for r in same if r["latent cache"] is flag) for flag in (True, False))
    print(f"latent cache speed-up ({rows[0]['precision']}, no grad ckpt): x{live / cached:.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
