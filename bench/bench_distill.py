"""Bench for quest_13_2.py: does the distilled student beat the same student trained on labels alone?

Runs the script's main() for a grid of settings x regimes x seeds on the real digits shipped with the repo
(4,000 train / 1,000 test) and prints, per setting and regime, mean +- std over seeds of the test accuracy of
the teacher, the distilled student and the baseline student, of the gain (distilled - baseline, same seed),
and the sign of the gain on each seed.

Two regimes (issue 10), the spec's budget in both: teacher 1 epoch, students 1 epoch, T 5, Adam peak lr 0.01,
batch 64.
  spec   one epoch = one pass over the 4,000 digits = 63 steps (the spec taken literally on this subset);
  full   one epoch = 938 steps (full-size MNIST's 60,000 / 64), about 15 passes over the 4,000 digits: the
         full-size regime emulated by step count (the teacher ends about a point above the baseline there).

Each run appends one JSON line to --log, so a sweep can be split into short jobs (a few seeds each) and the
table printed from everything logged so far:

    .venv/bin/python bench/bench_distill.py --settings spec,kd-consistent --regimes spec,full --seeds 0,1 --log sweep.jsonl
    .venv/bin/python bench/bench_distill.py --table --log sweep.jsonl
    .venv/bin/python bench/bench_distill.py --settings default --regimes long --seeds 0-4      # --teacher-epochs 5 --epochs 20
"""
import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import quest_13_2  # noqa: E402  (the script itself, so the bench measures exactly what users run)

# Settings: flags on top of the script's defaults, spelled out in full so a later change of a default does
# not silently change what a row measured. Every row keeps the spec's fixed values (T 5, Adam peak lr 0.01,
# batch 64, the two architectures, the epochs of the regime) and the baseline student always gets the same
# batches, views and schedule as the distilled one.
PLAIN = ["--alpha-schedule", "constant", "--match", "probs", "--distil-on", "all", "--augment", "none", "--teacher-ema", "0"]
SETTINGS = {
    # the pre-issue-10 default: alpha 0.5, soft targets of the final teacher for the clean images
    "spec": [*PLAIN, "--alpha", "0.5"],
    "alpha0.25": [*PLAIN, "--alpha", "0.25"],           # PyTorch's KD tutorial: 0.25 soft, 0.75 labels
    "alpha0.75": [*PLAIN, "--alpha", "0.75"],
    "alpha0.9": [*PLAIN, "--alpha", "0.9"],
    "ramp0.5": [*PLAIN, "--alpha", "0.5", "--alpha-schedule", "ramp"],  # labels first, teacher later
    "ema": [*PLAIN, "--alpha", "0.5", "--teacher-ema", "0.99"],         # soft targets from the EMA teacher
    "logits": [*PLAIN, "--alpha", "0.5", "--match", "logits"],          # match centred logits (high-T limit)
    # random views for both students (same views); teacher targets once, for the clean images
    "aug-fixed": [*PLAIN, "--alpha", "0.5", "--augment", "students", "--teacher-targets", "fixed"],
    # ... or for the student's own view, computed in the step (Beyer et al. 2022: consistent)
    "aug-consistent": [*PLAIN, "--alpha", "0.5", "--augment", "students", "--teacher-targets", "consistent"],
    "aug-consistent-a0.9": [*PLAIN, "--alpha", "0.9", "--augment", "students", "--teacher-targets", "consistent"],
    "aug-consistent-a0.25": [*PLAIN, "--alpha", "0.25", "--augment", "students", "--teacher-targets", "consistent"],
    "aug-all-consistent": [*PLAIN, "--alpha", "0.5", "--augment", "all", "--teacher-targets", "consistent"],
    # combinations of the two that help on their own: the KD tutorial's alpha and a better teacher
    "alpha0.25-ema": [*PLAIN, "--alpha", "0.25", "--teacher-ema", "0.99"],
    "aug-all-a0.25": [*PLAIN, "--alpha", "0.25", "--augment", "all", "--teacher-targets", "consistent"],
    # the soft term only where the teacher is right (its mistakes are learnt from the labels alone)
    "correct": [*PLAIN, "--alpha", "0.5", "--distil-on", "correct"],
    "correct-aug-all": [*PLAIN, "--alpha", "0.5", "--distil-on", "correct", "--augment", "all"],
    "default": [],  # whatever the script does by default today
}
REGIMES = {
    "spec": [],
    "full": ["--steps-per-epoch", "938"],
    "long": ["--teacher-epochs", "5", "--epochs", "20"],
}


def seed_list(text):
    """'0,1,5' or '0-3'."""
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(part) for part in text.split(",")]


def mean_std(values, scale=100):
    values = [scale * v for v in values]
    return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:4.2f}"


def run(setting, regime, seed, args):
    argv = ["--data-dir", args.data_dir, "--device", args.device, "--seed", str(seed), *SETTINGS[setting], *REGIMES[regime]]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # tables, warnings
        result = quest_13_2.main(argv)
    assert result["teacherUnchanged"], "the teacher changed during distillation"
    return {"setting": setting, "regime": regime, "seed": seed, "seconds": round(time.perf_counter() - start, 1),
            **{key: result[key] for key in ("teacherAccuracy", "studentAccuracy", "baselineAccuracy", "distillationGain")}}


def print_table(rows):
    groups = {}
    for row in rows:  # the last run of a (setting, regime, seed) wins
        groups.setdefault((row["setting"], row["regime"]), {})[row["seed"]] = row
    print("test accuracy in % (1,000 shipped test digits), mean ± std over seeds; gain in points, per-seed signs")
    print(f"{'setting':<22} {'regime':<6} {'seeds':>5} {'teacher':>13} {'distilled':>13} {'baseline':>13} "
          f"{'gain':>13} {'signs':<10} {'s/seed':>6}")
    for (setting, regime), by_seed in sorted(groups.items(), key=lambda item: (item[0][1], list(SETTINGS).index(item[0][0])
                                                                                if item[0][0] in SETTINGS else 99)):
        runs = [by_seed[seed] for seed in sorted(by_seed)]
        gains = [r["distillationGain"] for r in runs]
        signs = "".join("+" if g > 0 else ("0" if g == 0 else "-") for g in gains)
        print(f"{setting:<22} {regime:<6} {len(runs):>5} {mean_std([r['teacherAccuracy'] for r in runs]):>13} "
              f"{mean_std([r['studentAccuracy'] for r in runs]):>13} {mean_std([r['baselineAccuracy'] for r in runs]):>13} "
              f"{mean_std(gains):>13} {signs:<10} {statistics.mean(r['seconds'] for r in runs):>6.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO / "assets" / "mnist-5k"), help="MNIST root (holds MNIST/raw)")
    parser.add_argument("--settings", default="spec,default", help=f"comma-separated, from: {', '.join(SETTINGS)}")
    parser.add_argument("--regimes", default="spec,full", help=f"comma-separated, from: {', '.join(REGIMES)}")
    parser.add_argument("--seeds", type=seed_list, default=seed_list("0-3"), help="'0-3' or '0,2,5'")
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--log", type=Path, default=None, help="append each run as a JSON line here (and read it for the table)")
    parser.add_argument("--table", action="store_true", help="only print the table of what --log holds")
    args = parser.parse_args()
    settings, regimes = args.settings.split(","), args.regimes.split(",")
    for name in settings + regimes:
        if name not in SETTINGS and name not in REGIMES:
            parser.error(f"unknown setting or regime {name}")

    rows = []
    if args.log is not None and args.log.exists():
        rows = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    if not args.table:
        print(f"data: {args.data_dir}, device {args.device}", flush=True)
        for regime in regimes:
            for setting in settings:
                for seed in args.seeds:
                    row = run(setting, regime, seed, args)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.log is not None:
                        with args.log.open("a") as log:
                            log.write(json.dumps(row) + "\n")
        if args.log is None:  # the table of this invocation only
            print_table(rows)
            return
    print_table(rows)


if __name__ == "__main__":
    main()
