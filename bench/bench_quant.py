"""Bench for quest_14_1.py: FP32 vs INT8 size, test accuracy and CPU latency, in one run of the script per engine.

    .venv/bin/python bench/bench_quant.py                          # real digits in ../shared/data/mnist-5k
    .venv/bin/python bench/bench_quant.py --engines fbgemm,x86,qnnpack --data-dir ./data   # full MNIST

Each row is one full default run (100 training batches, 10 calibration batches) of the script as a user runs it;
the goals of the issue are checked at the end. Latencies are wall-clock medians and move with the machine's load.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DIGITS = REPO.parent / "shared" / "data" / "mnist-5k"
GOALS = "ratio >= 3.5x, accuracy drop <= 0.3 points, INT8 faster than FP32 at batch 256"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(SHARED_DIGITS if SHARED_DIGITS.is_dir() else REPO / "assets" / "mnist-5k"),
                   help="MNIST root for the script (the shipped digits when ../shared is absent)")
    p.add_argument("--engines", default="fbgemm", help="comma-separated quantized engines, one script run each")
    p.add_argument("--device", default="auto", help="where the FP32 model trains (the script's --device)")
    p.add_argument("--latency-seconds", type=float, default=2.0, help="the script's timing budget per model and batch")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (OMP_NUM_THREADS); None: "
                   "torch's default. 1 gives steadier latencies on a CPU shared with other work")
    return p.parse_args()


def run_quest(args, engine):
    cmd = [sys.executable, str(REPO / "quest_14_1.py"), "--data-dir", args.data_dir, "--engine", engine,
           "--device", args.device, "--latency-seconds", str(args.latency_seconds)]
    threads = args.threads
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    print("$", *([f"OMP_NUM_THREADS={threads}"] if threads else []), " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)  # no bars
    if proc.returncode != 0:
        sys.exit(f"error: quest_14_1.py failed for --engine {engine}:\n{proc.stdout[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    rows = [(engine, run_quest(args, engine)) for engine in args.engines.split(",")]
    print(f"\ndata: {args.data_dir} ({rows[0][1]['test_images']} test digits); FP32 trained on {rows[0][1]['train_device']}, "
          f"both models timed on CPU with {args.threads or 'torch default'} thread(s)")
    header = ("engine", "FP32 KB", "INT8 KB", "ratio", "acc FP32", "acc INT8", "drop pt",
              "b1 FP32 ms", "b1 INT8 ms", "b256 FP32 ms", "b256 INT8 ms", "b256 speedup")
    print("".join(f"{h:>13}" for h in header))
    for engine, r in rows:
        drop = 100 * (r["acc_fp32"] - r["acc_int8"])
        cells = (engine, f"{r['size_fp32_kb']:.1f}", f"{r['size_int8_kb']:.1f}", f"{r['compression_ratio']:.2f}x",
                 f"{r['acc_fp32']:.4f}", f"{r['acc_int8']:.4f}", f"{drop:+.2f}",
                 f"{r['latency_ms_fp32_b1']:.3f}", f"{r['latency_ms_int8_b1']:.3f}",
                 f"{r['latency_ms_fp32_b256']:.2f}", f"{r['latency_ms_int8_b256']:.2f}",
                 f"{r['latency_ms_fp32_b256'] / r['latency_ms_int8_b256']:.2f}x")
        print("".join(f"{c:>13}" for c in cells))
    print(f"\ngoals: {GOALS}")
    for engine, r in rows:
        met = (r["compression_ratio"] >= 3.5, round(100 * (r["acc_fp32"] - r["acc_int8"]), 6) <= 0.3,
               r["latency_ms_int8_b256"] < r["latency_ms_fp32_b256"])
        print(f"{engine:>13}: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}"
                                            for name, ok in zip(("ratio", "accuracy", "speed"), met)))


if __name__ == "__main__":
    main()
