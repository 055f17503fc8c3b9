"""Bench for quest_13_2.py: which student recipe beats the same student trained on labels alone, and by how much?

Imports the script and drives its own parts (the models, make_view, fit, train_student), so it measures what users
run. Per regime and seed it trains ONE teacher (the reused teacher of the two-step workflow), then each variant's
student, and one baseline student per training setting (epochs, augmentation) from the same initial weights, batches
and augmentations: a gain is distilled - baseline at the same schedule. One JSON line per student goes to --log;
a (regime, seed, variant) already in the log is not trained again; --table prints mean ± std over seeds and the
sign on each seed.

A variant is named METHOD[-T<temperature>][-a<alpha>]/AUGMENT/e<EPOCHS>, e.g. kd-T2-a0.25/shift/e20 or
baseline/mixup/e20. METHOD: baseline, kd, hint, cosine; AUGMENT: one of the script's --augment choices, or
shift-fixed / mixup-fixed / cutmix-fixed: the student sees the augmented view, but the teacher's answer comes from
the images as they are (computed once; for a mix, the teacher's soft targets of the two images mixed in the same
shares): an inconsistent teacher, the paper's "fixed teacher".

Regimes, on the real digits shipped with the repo (4,000 train / 1,000 test):
  all      teacher 5 epochs on all 4,000 digits; the students on the same 4,000. The README's two-step workflow.
  heldout  teacher 5 epochs on digits 0-1,999; the students on digits 2,000-3,999, which the teacher never saw: the
           teacher is wrong on the students' digits as often as on the test set, as on a full-size set.
  teacher1 teacher 1 epoch on all 4,000 digits: what the script's default run trains before its students.
  strong   teacher 30 epochs on all 4,000 digits, with shifts (fit's --augment shift); the students on the same
           digits. A teacher well above what the student can reach (98.6 vs 97.4 %), as on full-size Fashion-MNIST
           (92.1 vs 90.3 %); the plain 5-epoch teacher of "all" is no better than a student trained with shifts.
With --augment, every epoch is a fresh draw of shifts and mixes, so a student passing over the digits many times
does not see the same images again (nor memorise them), as a student passing over 60,000 images does not.

    .venv/bin/python bench/bench_distill.py --regimes all --seeds 0-3 --variants kd-T2-a0.25/shift/e20 --log distill.jsonl
    .venv/bin/python bench/bench_distill.py --table --log distill.jsonl
"""
import argparse
import contextlib
import copy
import io
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import quest_13_2 as quest  # noqa: E402  (the script itself)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# regime -> (teacher epochs, teacher's digits, students' digits, teacher's augmentation)
REGIMES = {"all": (5, slice(None), slice(None), "none"), "heldout": (5, slice(0, 2000), slice(2000, 4000), "none"),
           "strong": (30, slice(None), slice(None), "shift"), "teacher1": (1, slice(None), slice(None), "none")}
VARIANT = re.compile(r"^(?P<method>baseline|kd|hint|cosine)(-T(?P<T>[0-9.]+))?(-a(?P<alpha>[0-9.]+))?"
                     r"/(?P<augment>none|shift|mixup|cutmix|shift-fixed|mixup-fixed|cutmix-fixed)/e(?P<epochs>\d+)$")


def variant_flags(name):
    """The script's flags for a variant name, and whether its teacher is 'fixed' (answers on the clean images)."""
    match = VARIANT.match(name)
    if match is None:
        raise SystemExit(f"unknown variant {name!r}: METHOD[-T<t>][-a<alpha>]/AUGMENT/e<epochs>")
    augment, fixed = match["augment"].removesuffix("-fixed"), match["augment"].endswith("-fixed")
    flags = ["--augment", augment, "--epochs", match["epochs"]]
    if match["method"] != "baseline":
        flags += ["--method", match["method"]]
        flags += ["--temperature", match["T"]] if match["T"] else []
        flags += ["--alpha", match["alpha"]] if match["alpha"] else []
    return match["method"], flags, fixed, f"baseline/{augment}/e{match['epochs']}"


def fixed_teacher_kd(student, x, y, teacher, args):
    """kd whose teacher answers on the images as they are, not on the student's view (an inconsistent teacher)."""
    clean = quest.predict(teacher, x)  # logits of the un-augmented images, computed once
    T, alpha = args.temperature, quest.alpha_of("kd", args)

    def loss_of_view(model, view):
        logits = model(view.images)
        target = F.softmax(clean[view.index] / T, dim=1)
        if view.own_share is not None:  # the partner is the batch's mirrored image, as make_view pairs them
            share = view.own_share[:, None]
            target = share * target + (1 - share) * target.flip(0)
        soft = F.kl_div(F.log_softmax(logits / T, dim=1), target, reduction="batchmean")
        return alpha * T * T * soft + (1 - alpha) * quest.label_loss(logits, view)
    return quest.fit(student, x, y, loss_of_view, args.epochs, args, "student (kd, fixed)", args.augment)


def run_seed(regime, seed, variants, data_dir, log, done):
    teacher_epochs, teacher_part, student_part, teacher_augment = REGIMES[regime]
    common = ["--data-dir", data_dir, "--device", "cpu", "--seed", str(seed), "--teacher-epochs", str(teacher_epochs)]
    args = quest.parse_args(common)
    device = torch.device("cpu")
    train_x, train_y = quest.load_split(args, train=True, device=device)
    test_x, test_y = quest.load_split(args, train=False, device=device)
    torch.manual_seed(seed)
    initial_student, teacher = quest.StudentModel(), quest.TeacherModel()  # the order main() uses
    if teacher_augment == "none":
        quest.train_teacher(teacher, train_x[teacher_part], train_y[teacher_part], args)
    else:  # the script's teacher loop, with the students' augmentation
        quest.fit(teacher, train_x[teacher_part], train_y[teacher_part], lambda model, view: quest.label_loss(model(view.images), view), teacher_epochs,
                  args, "teacher", teacher_augment)
    teacher.eval().requires_grad_(False)
    teacher_acc = quest.accuracy(teacher, test_x, test_y)
    x, y = train_x[student_part], train_y[student_part]
    wanted = []  # each variant after the baseline of its setting
    for variant in variants:
        baseline = variant_flags(variant)[3]
        wanted += [name for name in (baseline, variant) if name not in wanted and (regime, seed, name) not in done]
    for variant in wanted:
        method, flags, fixed, baseline = variant_flags(variant)
        student_args = quest.parse_args(common + flags)
        torch.manual_seed(seed + 1)  # as main(): the hint regressor's initial weights
        student = copy.deepcopy(initial_student)
        start = time.perf_counter()
        if fixed:
            fixed_teacher_kd(student, x, y, teacher, student_args)
        else:
            quest.train_student(None if method == "baseline" else method, student, x, y, teacher, student_args)
        row = {"regime": regime, "seed": seed, "variant": variant, "teacherAccuracy": teacher_acc,
               "studentAccuracy": quest.accuracy(student, test_x, test_y),
               "seconds": round(time.perf_counter() - start, 2)}
        base = row if variant == baseline else done[(regime, seed, baseline)]
        row["gain"] = round(row["studentAccuracy"] - base["studentAccuracy"], 6)
        done[(regime, seed, variant)] = row
        print(json.dumps(row), file=sys.__stdout__, flush=True)
        if log is not None:
            with log.open("a") as file:
                file.write(json.dumps(row) + "\n")


def mean_std(values, scale=100):
    values = [scale * v for v in values]
    return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:4.2f}"


def print_table(done, only=None):
    groups = {}
    for (regime, seed, variant), row in done.items():
        if only is None or variant in only:
            groups.setdefault((regime, variant), {})[seed] = row
    print("test accuracy in % (1,000 shipped test digits), mean ± std over seeds; gain over the baseline of the same "
          "setting in points, and its sign on each seed")
    print(f"{'regime':<8} {'variant':<28} {'seeds':>5} {'teacher':>13} {'student':>13} {'gain':>13} {'signs':<8} {'s':>5}")
    for (regime, variant), by_seed in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1].split("/")[1:],
                                                                              item[0][1])):
        runs = [by_seed[seed] for seed in sorted(by_seed)]
        gains = [r["gain"] for r in runs]
        is_base = variant.startswith("baseline/")
        signs = "" if is_base else "".join("+" if g > 0 else ("0" if g == 0 else "-") for g in gains)
        print(f"{regime:<8} {variant:<28} {len(runs):>5} {mean_std([r['teacherAccuracy'] for r in runs]):>13} "
              f"{mean_std([r['studentAccuracy'] for r in runs]):>13} {'' if is_base else mean_std(gains):>13} "
              f"{signs:<8} {statistics.mean(r['seconds'] for r in runs):>5.1f}")


def seed_list(text):
    """'0,1,5' or '0-3'."""
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(part) for part in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO / "assets" / "mnist-5k"), help="MNIST root (holds MNIST/raw)")
    parser.add_argument("--regimes", default="all", help=f"comma-separated, from: {', '.join(REGIMES)}")
    parser.add_argument("--variants", default="kd-T2-a0.25/none/e1",
                        help="comma-separated METHOD[-T<t>][-a<alpha>]/AUGMENT/e<epochs>")
    parser.add_argument("--seeds", type=seed_list, default=seed_list("0-3"), help="'0-3' or '0,2,5'")
    parser.add_argument("--log", type=Path, default=None, help="append each student as a JSON line here")
    parser.add_argument("--table", action="store_true", help="only print the table of what --log holds")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        variant_flags(name)
    for regime in args.regimes.split(","):
        if regime not in REGIMES:
            parser.error(f"unknown regime {regime}")
    done = {}
    if args.log is not None and args.log.exists():
        for line in args.log.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["regime"], row["seed"], row["variant"])] = row
    if not args.table:
        for regime in args.regimes.split(","):
            for seed in args.seeds:
                if all((regime, seed, v) in done for v in variants):
                    continue
                with contextlib.redirect_stdout(io.StringIO()):  # the script's epoch lines
                    run_seed(regime, seed, variants, args.data_dir, args.log, done)
    print_table(done)


if __name__ == "__main__":
    main()
