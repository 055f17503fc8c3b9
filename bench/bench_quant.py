"""Bench for quest_14_1.py: eager (torch.ao, the spec's flow) vs pt2e (torchao) side by side -- FP32 vs INT8 size,
test accuracy over several seeds and CPU latency, each figure from full runs of the script as a user runs it.

    .venv/bin/python bench/bench_quant.py                                   # shipped digits, seeds 0-3
    .venv/bin/python bench/bench_quant.py --engines fbgemm,x86,qnnpack --uncompiled --threads 1
    .venv/bin/python bench/bench_quant.py --data-dir ./data                 # full MNIST, if you have it

One script run per (row, seed): 100 training batches, 10 calibration batches (the defaults). Sizes are the same
for every seed; accuracy is shown per seed and as the mean; latencies are the median over the seeds' runs and
move with the machine's load; a pt2e row also reports its torch.compile time (not part of its latencies).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS = "ratio >= 3.5x, mean accuracy drop <= 0.3 points, INT8 faster than FP32 at batch 256"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(REPO / "assets" / "mnist-5k"), help="MNIST root for the script")
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds, one script run per row and seed")
    p.add_argument("--flows", default="eager,pt2e", help="comma-separated flows (eager: one row per --engines)")
    p.add_argument("--engines", default="fbgemm", help="comma-separated quantized engines for the eager rows")
    p.add_argument("--uncompiled", action="store_true", help="add a pt2e row run with --no-compile (what "
                   "torch.compile buys)")
    p.add_argument("--device", default="auto", help="where the FP32 model trains (the script's --device)")
    p.add_argument("--latency-seconds", type=float, default=2.0, help="the script's timing budget per model and batch")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (OMP_NUM_THREADS); None: "
                   "torch's default. 1 gives steadier latencies on a CPU shared with other work")
    return p.parse_args()


def rows_to_run(args):
    flows = args.flows.split(",")
    rows = [(f"eager {engine}", ["--flow", "eager", "--engine", engine])
            for engine in args.engines.split(",") if "eager" in flows]
    if "pt2e" in flows:
        rows.append(("pt2e compiled", ["--flow", "pt2e"]))
        if args.uncompiled:
            rows.append(("pt2e uncompiled", ["--flow", "pt2e", "--no-compile"]))
    return rows


def run_quest(args, name, flags, seed):
    cmd = [sys.executable, str(REPO / "quest_14_1.py"), "--data-dir", args.data_dir, "--seed", str(seed),
           "--device", args.device, "--latency-seconds", str(args.latency_seconds), *flags]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    print("$", *([f"OMP_NUM_THREADS={args.threads}"] if args.threads else []), " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: quest_14_1.py failed for {name}, seed {seed}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs):
    """One row from its runs (one per seed)."""
    first = runs[0]
    median = {key: statistics.median(r[key] for r in runs)
              for key in ("latency_ms_fp32_b1", "latency_ms_int8_b1", "latency_ms_fp32_b256", "latency_ms_int8_b256")}
    compile_s = [r["compile_seconds"] for r in runs if r["compile_seconds"] is not None]
    return {"size_fp32_kb": first["size_fp32_kb"], "size_int8_kb": first["size_int8_kb"],
            "compression_ratio": first["compression_ratio"],
            "acc_fp32": statistics.mean(r["acc_fp32"] for r in runs), "acc_int8": statistics.mean(r["acc_int8"] for r in runs),
            "drop_points_per_seed": [round(100 * (r["acc_fp32"] - r["acc_int8"]), 2) for r in runs],
            **median, "compile_seconds_first": compile_s[0] if compile_s else None,
            "compile_seconds_median": statistics.median(compile_s) if compile_s else None}


def main():
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [(name, summarize([run_quest(args, name, flags, seed) for seed in seeds]))
            for name, flags in rows_to_run(args)]
    if not rows:
        sys.exit("error: no rows to run; pass --flows eager,pt2e")
    print(f"\ndata: {args.data_dir}; seeds {args.seeds}; both models timed on CPU with "
          f"{args.threads or 'torch default'} thread(s); latencies: median over the seeds' runs (ms)")
    header = ("row", "FP32 KB", "INT8 KB", "ratio", "acc FP32", "acc INT8", "drop pt (per seed)",
              "b1 FP32", "b1 INT8", "b256 FP32", "b256 INT8", "b256 speedup", "compile s")
    widths = (17, 9, 9, 7, 9, 9, 26, 9, 9, 10, 10, 13, 12)
    print("".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for name, r in rows:
        compile_s = ("-" if r["compile_seconds_first"] is None else
                     f"{r['compile_seconds_first']:.0f}/{r['compile_seconds_median']:.0f}")
        cells = (name, f"{r['size_fp32_kb']:.1f}", f"{r['size_int8_kb']:.1f}", f"{r['compression_ratio']:.2f}x",
                 f"{r['acc_fp32']:.4f}", f"{r['acc_int8']:.4f}", " ".join(f"{d:+.1f}" for d in r["drop_points_per_seed"]),
                 f"{r['latency_ms_fp32_b1']:.3f}", f"{r['latency_ms_int8_b1']:.3f}",
                 f"{r['latency_ms_fp32_b256']:.2f}", f"{r['latency_ms_int8_b256']:.2f}",
                 f"{r['latency_ms_fp32_b256'] / r['latency_ms_int8_b256']:.2f}x", compile_s)
        print("".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    print("compile s: the first run's / the median run's torch.compile time (later runs reuse inductor's cache)")
    print(f"\ngoals: {GOALS}")
    for name, r in rows:
        met = (r["compression_ratio"] >= 3.5, round(100 * (r["acc_fp32"] - r["acc_int8"]), 6) <= 0.3,
               r["latency_ms_int8_b256"] < r["latency_ms_fp32_b256"])
        print(f"{name:>17}: " + ", ".join(f"{goal} {'met' if ok else 'MISSED'}"
                                          for goal, ok in zip(("ratio", "accuracy", "speed"), met)))
    print(json.dumps({name: r for name, r in rows}, allow_nan=False))


if __name__ == "__main__":
    main()
