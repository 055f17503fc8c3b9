"""Bench for quest_13_2.py: does the distilled student beat the same student trained on labels alone?

Runs the script's main() over several seeds for a few settings on the real digits shipped with the repo
(4,000 train / 1,000 test) and prints mean +- std (over seeds) of the test accuracy of the teacher, the
distilled student and the baseline student, and of the gain (distilled - baseline, same seed).

    .venv/bin/python bench/bench_distill.py [--data-dir assets/mnist-5k] [--seeds 5]
"""
import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import quest_13_2  # noqa: E402  (the script itself, so the bench measures exactly what users run)

# name: flags on top of the script's defaults (the spec's: T 5, Adam lr 0.01, 1 teacher + 1 student epoch;
# alpha 0.5; warm-up + cosine). "long": a stronger teacher (5 epochs) and a student trained to convergence.
SETTINGS = {
    "spec": [],
    "spec-alpha0.9": ["--alpha", "0.9"],
    "spec-plain-adam": ["--lr-schedule", "constant", "--warmup-steps", "0"],
    "long": ["--teacher-epochs", "5", "--epochs", "20"],
    "long-alpha0.9": ["--teacher-epochs", "5", "--epochs", "20", "--alpha", "0.9"],
}


def mean_std(values):
    values = [100 * v for v in values]
    return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:4.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO / "assets" / "mnist-5k"), help="MNIST root (holds MNIST/raw)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per setting (0 .. N-1)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--only", choices=list(SETTINGS), help="run one setting only")
    args = parser.parse_args()

    print(f"data: {args.data_dir}, seeds 0..{args.seeds - 1}, device {args.device}; test accuracy in %, mean ± std over seeds")
    print(f"{'setting':<16} {'teacher':>13} {'distilled':>13} {'baseline':>13} {'gain (points)':>13} {'gain>0':>6} {'s/seed':>6}")
    for name, flags in SETTINGS.items():
        if args.only and name != args.only:
            continue
        results, start = [], time.perf_counter()
        for seed in range(args.seeds):
            argv = ["--data-dir", args.data_dir, "--device", args.device, "--seed", str(seed), *flags]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # tqdm bars, tables
                results.append(quest_13_2.main(argv))
        assert all(r["teacherUnchanged"] for r in results), "the teacher changed during distillation"
        gains = [r["distillationGain"] for r in results]
        print(f"{name:<16} {mean_std([r['teacherAccuracy'] for r in results]):>13} "
              f"{mean_std([r['studentAccuracy'] for r in results]):>13} {mean_std([r['baselineAccuracy'] for r in results]):>13} "
              f"{mean_std(gains):>13} {sum(g > 0 for g in gains):>3}/{len(gains):<2} {(time.perf_counter() - start) / args.seeds:>6.0f}",
              flush=True)
        teachers = " ".join(f"{100 * r['teacherAccuracy']:.1f}" for r in results)
        print(f"{'':<16} teacher per seed: {teachers}", flush=True)
    r = results[-1]
    print(f"student {r['studentParams']:,} params vs teacher "
          f"{r['teacherParams']:,} ({r['teacherParams'] / r['studentParams']:.1f}x), {r['studentSizeKB']} KB vs "
          f"{r['teacherSizeKB']} KB, {r['studentSpeedup']}x faster on CPU")


if __name__ == "__main__":
    main()
