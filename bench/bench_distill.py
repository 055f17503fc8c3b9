"""Bench for quest_13_2.py: which student loss beats the same student trained on labels alone, and by how much?

Imports the script and drives its own parts (the models, fit, train_student), so it measures what users run. Per
regime and seed it trains ONE teacher, then every variant's student and one baseline student from the same initial
weights and batches, and logs one JSON line per student; --table prints mean ± std over seeds and per-seed signs.

Regimes, on the real digits shipped with the repo (4,000 train / 1,000 test):
  spec      teacher 1 epoch and students 1 epoch, all on the 4,000 digits (63 steps each): the spec's budget.
  long      teacher 5 epochs, students 20 epochs, all on the 4,000 digits.
  teacher5  teacher 5 epochs, students 1 epoch, all on the 4,000 digits: the README's two-step workflow (a reused
            5-epoch teacher, 1-epoch students) at this size; the students see each digit once.
  teacher5-b16  the same with students in batches of 16: 250 steps in their one pass instead of 63, nearer
            the 938 steps of one full-size epoch (the teacher keeps batches of 64); teacher5-b8: 500 steps.
  heldout5  teacher 5 epochs on digits 0-1,999; students 1 epoch on digits 2,000-3,999, which the teacher never
            saw: a teacher that is wrong on the digits it distils as often as on the test set, as on a full-size
            set, where one epoch of the student sees every image once (the reused 5-epoch teacher with
            1-epoch students of the README's two-step workflow).
  heldout1  the same with a 1-epoch teacher.
  heldout5x30  the same 5-epoch teacher; students 30 epochs on digits 2,000-3,999 (960 steps, the step count of
            one full-size epoch, 938): students that reach what they can learn, as one full-size epoch lets them.
A regime name with the suffix "-oldlr" runs the lr schedule the script used before (the warm-up factor times a
cosine over the whole run, instead of warmup_cosine's warm-up then cosine over the rest).

    .venv/bin/python bench/bench_distill.py --regimes heldout5 --seeds 0-3 --log distill.jsonl
    .venv/bin/python bench/bench_distill.py --table --log distill.jsonl
"""
import argparse
import contextlib
import copy
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import quest_13_2 as quest  # noqa: E402  (the script itself)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

QUEST_WARMUP_COSINE = quest.warmup_cosine  # the schedule the script uses (the "-oldlr" regimes swap it out)

# Variants: the student's flags on top of the script's settings, spelled out so a later change of a default does
# not change what a row measured. "kd-correct" is not a flag of the script: it is implemented below.
VARIANTS = {
    "kd-T5-a0.5": ["--method", "kd", "--temperature", "5", "--alpha", "0.5"],  # the spec's loss
    "kd-T5-a0.5-correct": ["--method", "kd", "--temperature", "5", "--alpha", "0.5"],  # ... soft term only where the teacher is right
    "kd-T5-a0.25": ["--method", "kd", "--temperature", "5", "--alpha", "0.25"],
    "kd-T2-a0.5": ["--method", "kd", "--temperature", "2", "--alpha", "0.5"],
    "kd-T2-a0.25": ["--method", "kd", "--temperature", "2", "--alpha", "0.25"],  # PyTorch's KD tutorial
    "kd-T2-a0.1": ["--method", "kd", "--temperature", "2", "--alpha", "0.1"],
    "cosine-a0.25": ["--method", "cosine", "--alpha", "0.25"],  # the tutorial's weights
    "hint-a0.1": ["--method", "hint", "--alpha", "0.1"],
    "hint-a0.25": ["--method", "hint", "--alpha", "0.25"],
    "hint-a0.5": ["--method", "hint", "--alpha", "0.5"],
    "hint-a0.75": ["--method", "hint", "--alpha", "0.75"],
    "hint-a0.9": ["--method", "hint", "--alpha", "0.9"],
}
# regime -> (teacher epochs, student epochs, teacher's digits, students' digits[, students' batch size])
REGIMES = {
    "spec": (1, 1, slice(None), slice(None)),
    "long": (5, 20, slice(None), slice(None)),
    "teacher5": (5, 1, slice(None), slice(None)),
    "teacher5-b16": (5, 1, slice(None), slice(None), 16),
    "teacher5-b8": (5, 1, slice(None), slice(None), 8),
    "heldout5": (5, 1, slice(0, 2000), slice(2000, 4000)),
    "heldout1": (1, 1, slice(0, 2000), slice(2000, 4000)),
    "heldout5x30": (5, 30, slice(0, 2000), slice(2000, 4000)),
}


def old_warmup_cosine(step, total_steps, warmup_steps, final=0.1):
    """The schedule quest_13_2 had before it used the shared warmup_cosine (final 0 = cosine, 1 = constant)."""
    warmup = min(1.0, (step + 1) / max(warmup_steps, 1))
    return warmup * (0.5 * (1 + math.cos(math.pi * step / total_steps)) if final == 0 else 1.0)


def kd_correct_student(student, x, y, teacher, args):
    """The script's earlier default (--distil-on correct): the soft term only on digits whose label is the teacher's
    top class; elsewhere the label alone (weight 1)."""
    teacher_logits = quest.predict(teacher, x)
    share = args.alpha * (teacher_logits.argmax(1) == y).float()
    T = args.temperature

    def loss_of_batch(model, idx):
        logits = model(x[idx])
        soft = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(teacher_logits[idx] / T, 1), reduction="none").sum(1)
        hard = F.cross_entropy(logits, y[idx], reduction="none")
        return (share[idx] * T * T * soft + (1 - share[idx]) * hard).mean()
    return quest.fit(student, x, loss_of_batch, args.epochs, args, "student (kd-correct)")


def run_seed(regime, seed, variants, data_dir, log):
    name = regime.removesuffix("-oldlr")
    teacher_epochs, epochs, teacher_part, student_part, *student_batch = REGIMES[name]
    quest.warmup_cosine = old_warmup_cosine if regime.endswith("-oldlr") else QUEST_WARMUP_COSINE
    common = ["--data-dir", data_dir, "--device", "cpu", "--seed", str(seed), "--teacher-epochs", str(teacher_epochs),
              "--epochs", str(epochs)]
    args = quest.parse_args(common)
    device = torch.device("cpu")
    train_x, train_y = quest.load_split(args, train=True, device=device)
    test_x, test_y = quest.load_split(args, train=False, device=device)
    torch.manual_seed(seed)
    initial_student, teacher = quest.StudentModel(), quest.TeacherModel()  # the order main() uses
    quest.train_teacher(teacher, train_x[teacher_part], train_y[teacher_part], args)
    teacher.eval().requires_grad_(False)
    teacher_acc = quest.accuracy(teacher, test_x, test_y)
    x, y = train_x[student_part], train_y[student_part]
    teacher_on_student_digits = quest.accuracy(teacher, x, y)
    rows = []
    for variant in ["baseline", *variants]:
        student_args = quest.parse_args(common + ([] if variant == "baseline" else VARIANTS[variant])
                                        + [f"--batch-size={size}" for size in student_batch])
        torch.manual_seed(seed + 1)  # as main(): the hint regressor's initial weights
        student = copy.deepcopy(initial_student)
        start = time.perf_counter()
        if variant == "kd-T5-a0.5-correct":
            kd_correct_student(student, x, y, teacher, student_args)
        else:
            quest.train_student(None if variant == "baseline" else student_args.method, student, x, y, teacher, student_args)
        rows.append({"regime": regime, "seed": seed, "variant": variant, "teacherAccuracy": teacher_acc,
                     "teacherOnStudentDigits": teacher_on_student_digits,
                     "studentAccuracy": quest.accuracy(student, test_x, test_y),
                     "seconds": round(time.perf_counter() - start, 2)})
    for row in rows:
        row["gain"] = round(row["studentAccuracy"] - rows[0]["studentAccuracy"], 6)
        print(json.dumps(row), file=sys.__stdout__, flush=True)
        if log is not None:
            with log.open("a") as file:
                file.write(json.dumps(row) + "\n")
    return rows


def mean_std(values, scale=100):
    values = [scale * v for v in values]
    return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:4.2f}"


def print_table(rows):
    groups = {}
    for row in rows:  # the last run of a (regime, variant, seed) wins
        groups.setdefault((row["regime"], row["variant"]), {})[row["seed"]] = row
    order = ["baseline", *VARIANTS]
    print("test accuracy in % (1,000 shipped test digits), mean ± std over seeds; gain over the baseline in points")
    print(f"{'regime':<15} {'variant':<20} {'seeds':>5} {'teacher':>13} {'student':>13} {'gain':>13} {'signs':<8} {'s':>5}")
    for (regime, variant), by_seed in sorted(groups.items(), key=lambda item: (item[0][0], order.index(item[0][1]))):
        runs = [by_seed[seed] for seed in sorted(by_seed)]
        gains = [r["gain"] for r in runs]
        signs = "".join("+" if g > 0 else ("0" if g == 0 else "-") for g in gains) if variant != "baseline" else ""
        print(f"{regime:<15} {variant:<20} {len(runs):>5} {mean_std([r['teacherAccuracy'] for r in runs]):>13} "
              f"{mean_std([r['studentAccuracy'] for r in runs]):>13} "
              f"{mean_std(gains) if variant != 'baseline' else '':>13} {signs:<8} "
              f"{statistics.mean(r['seconds'] for r in runs):>5.1f}")


def seed_list(text):
    """'0,1,5' or '0-3'."""
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(part) for part in text.split(",")]



def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO / "assets" / "mnist-5k"), help="MNIST root (holds MNIST/raw)")
    parser.add_argument("--regimes", default="heldout5", help=f"comma-separated, from: {', '.join(REGIMES)} (+ '-oldlr')")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=seed_list, default=seed_list("0-3"), help="'0-3' or '0,2,5'")
    parser.add_argument("--log", type=Path, default=None, help="append each student as a JSON line here")
    parser.add_argument("--table", action="store_true", help="only print the table of what --log holds")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name}")
    for regime in args.regimes.split(","):
        if regime.removesuffix("-oldlr") not in REGIMES:
            parser.error(f"unknown regime {regime}")
    rows = []
    if args.log is not None and args.log.exists():
        rows = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    if not args.table:
        for regime in args.regimes.split(","):
            for seed in args.seeds:
                with contextlib.redirect_stdout(io.StringIO()):  # the script's epoch lines
                    rows += run_seed(regime, seed, variants, args.data_dir, args.log)
    print_table(rows)


if __name__ == "__main__":
    main()
