"""Quest 13.2 - knowledge distillation: a big teacher whispers to a small student.

Act 1  MNIST, ToTensor + Normalize(0.1307, 0.3081), shuffled batches of 64.
Act 2  TeacherModel (two conv blocks, two fully connected layers) and StudentModel (one conv layer,
       one fully connected layer), ~13x fewer parameters.
Act 3  Train the teacher: Adam lr 0.01 (reached after a short warm-up, then cosine-decayed), cross-entropy, one epoch.
Act 4  Freeze the teacher and distil: the student learns from the teacher's softened outputs,
       loss = alpha * T^2 * KL(log_softmax(student/T) || softmax(teacher/T)) + (1 - alpha) * CE(student, labels).
Act 5  Prove it: test accuracy of the teacher, the distilled student and a baseline student (same
       architecture, initial weights, batches and optimizer, plain cross-entropy), sizes, CPU speed,
       then one JSON line (the spec's OutputResult plus these figures).

    python quest_13_2.py --data-dir assets/mnist-5k     # the 5,000 real digits shipped with the repo
    python quest_13_2.py                                # downloads the full MNIST to ./data
"""
import argparse
import copy
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path
from urllib.error import URLError

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# alpha weighs the teacher's soft targets against the true labels; the spec names it but gives no value.
# 0.5, equal weight, measured over 5 seeds on the 4,000 shipped digits (bench/bench_distill.py): with the
# spec's one-epoch teacher (~95%) alpha 0.9 cost the student 0.6 points against 0.5, because with few
# hard labels in the mix it copies the teacher's mistakes; with a stronger teacher (5 teacher epochs,
# 20 student epochs) 0.5 and 0.9 tie (+0.58 vs +0.66 points over the baseline, seed std 0.2).
DEFAULT_ALPHA = 0.5
LATENCY_BATCH, LATENCY_REPEATS = 64, 10  # CPU speed: median over repeats of one batch of test digits
LOG_EVERY = 20  # steps between loss read-backs for the progress bar (each one waits for the GPU)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Knowledge distillation on MNIST: a big teacher trains a small student.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="./data", help="MNIST root (holds MNIST/raw); downloaded there if missing")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to train")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batch order")
    parser.add_argument("--teacher-epochs", type=int, default=1, help="epochs of teacher training")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of student training (distilled and baseline)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size for every model")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate for every model")
    parser.add_argument("--warmup-steps", type=int, default=30, help="steps over which the learning rate ramps up to --lr")
    parser.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                        help="after warm-up: cosine decay to 0 over the run, or constant (--lr-schedule constant "
                             "--warmup-steps 0 is the spec's plain Adam, which can diverge)")
    parser.add_argument("--temperature", type=float, default=5.0, help="softmax temperature T of the soft targets")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help="weight of the distillation term; 1 - alpha goes to cross-entropy on the labels")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline student (faster, no gain figure)")
    parser.add_argument("--save-dir", type=Path, default=None,
                        help="save teacher.pt and student.pt (CPU state_dicts) here; nothing is written without it")
    return parser.parse_args(argv)


def check_args(args):
    for flag in ("teacher_epochs", "epochs", "batch_size"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)}); pass a whole number >= 1")
    if args.warmup_steps < 0:
        sys.exit(f"error: --warmup-steps must not be negative (got {args.warmup_steps}); pass 0 to switch warm-up off")
    for flag in ("lr", "temperature"):
        if not getattr(args, flag) > 0:
            sys.exit(f"error: --{flag} must be positive (got {getattr(args, flag)}); pass e.g. the default")
    if not 0 <= args.alpha <= 1:
        sys.exit(f"error: --alpha must be between 0 and 1 (got {args.alpha}); it is the share of the distillation term")
    if args.save_dir is not None and args.save_dir.exists() and not args.save_dir.is_dir():
        sys.exit(f"error: --save-dir {args.save_dir} is a file, not a folder; pass a folder path")


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda was requested but CUDA is not available here; use --device cpu or auto")
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


# --- Act 2: the models ------------------------------------------------------------------------------

class TeacherModel(nn.Module):
    """Two conv blocks (conv -> ReLU -> max-pool) and two fully connected layers: ~420k parameters."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 28x28 -> 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14x14 -> 7x7
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class StudentModel(nn.Module):
    """One conv layer (with ReLU) and one fully connected layer: ~32k parameters.

    The max-pool has no weights; it keeps the fully connected layer (most of the parameters) 4x smaller.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # -> 16x14x14
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 14 * 14, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


# --- Act 1: the data --------------------------------------------------------------------------------

def load_mnist(data_dir, train, device):
    """One MNIST split as a (N, 1, 28, 28) float tensor on the device, plus its labels."""
    try:
        dataset = torchvision.datasets.MNIST(root=data_dir, train=train, download=True)
    except (RuntimeError, OSError, URLError) as err:  # no network, mirrors down, unwritable folder
        reason = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
        sys.exit(f"error: MNIST is not in {Path(data_dir) / 'MNIST' / 'raw'} and could not be downloaded ({reason[0].strip()}); "
                 "pass --data-dir pointing at a folder that holds MNIST/raw (e.g. --data-dir assets/mnist-5k)")
    # The spec's ToTensor() + Normalize((0.1307,), (0.3081,)), done once for the whole split instead of per image.
    images = (dataset.data.unsqueeze(1).float().div(255) - MNIST_MEAN) / MNIST_STD
    return images.to(device), dataset.targets.to(device)


# --- Acts 3 and 4: training -------------------------------------------------------------------------

def distillation_loss(student_logits, teacher_logits, labels, temperature, alpha):
    """alpha * T^2 * KL(student || teacher at temperature T) + (1 - alpha) * CE(student, labels).

    "batchmean" divides the KL sum by the batch size, as its definition wants; the default "mean" also
    divides by the 10 classes. T^2 keeps the soft-target gradients as large as the hard ones (Hinton et al.).
    """
    soft = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student_logits / temperature, dim=1),
                                               F.softmax(teacher_logits / temperature, dim=1))
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard


def fit(model, images, loss_of_batch, epochs, args, name):
    """Adam over shuffled index batches; loss_of_batch(logits, idx) says what to learn. Returns the last epoch's mean loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Adam's first steps move every weight by about lr whatever its gradient (its second-moment estimate
    # has seen one batch). At the spec's lr 0.01 that throws the teacher's 3136->128 layer so far that the
    # loss jumps from 2.3 to 7-15 on step 2 and, for some seeds, every ReLU dies (10% accuracy). A short
    # linear warm-up to the same lr 0.01 avoids it; the cosine decay afterwards lets the weights settle
    # instead of bouncing at lr 0.01 (teacher after 5 epochs on 4,000 digits: 97.3% instead of 95.6%).
    total_steps = epochs * math.ceil(len(images) / args.batch_size)

    def lr_factor(step):
        warmup = min(1.0, (step + 1) / max(args.warmup_steps, 1))
        return warmup * (0.5 * (1 + math.cos(math.pi * step / total_steps)) if args.lr_schedule == "cosine" else 1.0)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = torch.Generator().manual_seed(args.seed)  # every model sees the same batches: a fair comparison
    # No bf16 autocast on CUDA: nets this small are bound by kernel launches, not arithmetic, so it would
    # buy little speed for rounding the soft targets.
    model.train()
    for epoch in range(1, epochs + 1):
        batches = torch.randperm(len(images), generator=order).to(images.device).split(args.batch_size)
        total = torch.zeros((), device=images.device)
        bar = tqdm(batches, desc=f"{name} epoch {epoch}/{epochs}", leave=False)
        for step, idx in enumerate(bar, 1):
            loss = loss_of_batch(model(images[idx]), idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach()
            if step % LOG_EVERY == 0 or step == len(batches):
                bar.set_postfix(loss=f"{total.item() / step:.4f}")
        epoch_loss = total.item() / len(batches)
        if not math.isfinite(epoch_loss):
            sys.exit(f"error: {name} training diverged (loss {epoch_loss}); lower --lr (e.g. --lr 0.001)")
        print(f"{name:<18} epoch {epoch}/{epochs}  loss {epoch_loss:.4f}")
    model.zero_grad(set_to_none=True)
    return epoch_loss


def labels_only(train_y):
    """Plain cross-entropy on the true labels: the teacher's loss, and the baseline student's."""
    return lambda logits, idx: F.cross_entropy(logits, train_y[idx])


def train_teacher(teacher, train_x, train_y, args):
    """Act 3: the teacher learns from the labels alone."""
    return fit(teacher, train_x, labels_only(train_y), args.teacher_epochs, args, "teacher")


def train_student(student, train_x, train_y, teacher_logits, args):
    """Act 4: distil from the teacher's logits for train_x; with teacher_logits=None, the baseline on labels alone."""
    if teacher_logits is None:
        return fit(student, train_x, labels_only(train_y), args.epochs, args, "baseline student")
    return fit(student, train_x,
               lambda logits, idx: distillation_loss(logits, teacher_logits[idx], train_y[idx], args.temperature, args.alpha),
               args.epochs, args, "distilled student")


@torch.no_grad()
def predict(model, images, chunk=1000):
    model.eval()
    return torch.cat([model(part) for part in images.split(chunk)])


def accuracy(model, images, labels):
    return (predict(model, images).argmax(dim=1) == labels).sum().item() / len(labels)


# --- Act 5: the report ------------------------------------------------------------------------------

def param_count(model):
    return sum(p.numel() for p in model.parameters())


def size_kb(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1024


@torch.inference_mode()
def cpu_latency_ms(cpu_model, batch):
    """Median wall time of one forward pass over `batch` on the CPU, after a warm-up pass."""
    cpu_model.eval()
    cpu_model(batch)
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        cpu_model(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def save_models(save_dir, cpu_models):
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        for name, model in cpu_models.items():
            torch.save(model.state_dict(), save_dir / f"{name}.pt")
    except OSError as err:
        sys.exit(f"error: could not write the models to {save_dir} ({err.strerror or err}); pass a writable --save-dir")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)

    train_x, train_y = load_mnist(args.data_dir, train=True, device=device)
    test_x, test_y = load_mnist(args.data_dir, train=False, device=device)
    print(f"data: {len(train_x)} train / {len(test_x)} test digits on {device}")

    teacher = TeacherModel().to(device)
    student = StudentModel().to(device)
    baseline = copy.deepcopy(student)  # same initial weights as the distilled student

    train_teacher(teacher, train_x, train_y, args)
    teacher_acc = accuracy(teacher, test_x, test_y)
    print(f"teacher test accuracy {teacher_acc:.2%}")
    if teacher_acc < 0.5:
        print(f"warning: the teacher only reached {teacher_acc:.1%}; it has little to teach "
              "(try a lower --lr, a longer --warmup-steps or more --teacher-epochs)", file=sys.stderr)

    # Act 4: frozen teacher. It has no dropout or augmentation, so its soft targets for the training set
    # never change: compute them once in eval mode instead of running the teacher at every step.
    teacher.eval().requires_grad_(False)
    teacher_before = copy.deepcopy(teacher.state_dict())
    teacher_logits = predict(teacher, train_x)
    final_loss = train_student(student, train_x, train_y, teacher_logits, args)
    teacher_unchanged = (all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
                         and all(p.grad is None for p in teacher.parameters()))
    student_acc = accuracy(student, test_x, test_y)
    baseline_acc = None
    if not args.no_baseline:
        train_student(baseline, train_x, train_y, None, args)
        baseline_acc = accuracy(baseline, test_x, test_y)
    gain = None if baseline_acc is None else student_acc - baseline_acc

    # Act 5: how much smaller and faster is the student, and did it learn?
    cpu_models = {"teacher": copy.deepcopy(teacher).cpu(), "student": copy.deepcopy(student).cpu()}
    latency_batch = test_x[:LATENCY_BATCH].cpu()
    latency = {name: cpu_latency_ms(model, latency_batch) for name, model in cpu_models.items()}
    rows = [("teacher", teacher, teacher_acc), ("distilled student", student, student_acc)]
    rows += [] if baseline_acc is None else [("baseline student", baseline, baseline_acc)]
    print(f"\n{'model':<18} {'test acc':>8} {'params':>9} {'size KB':>8}")
    for name, model, acc in rows:
        print(f"{name:<18} {acc:>8.2%} {param_count(model):>9,} {size_kb(model):>8.1f}")
    speedup = latency["teacher"] / latency["student"]
    print(f"CPU latency, batch of {len(latency_batch)}: teacher {latency['teacher']:.2f} ms, "
          f"student {latency['student']:.2f} ms ({speedup:.1f}x faster)")
    print(f"final loss (distilled student, last epoch): {final_loss:.4f}")
    message = (f"Distillation done: the student, {param_count(teacher) / param_count(student):.0f}x smaller than the teacher, "
               f"reached {student_acc:.2%} test accuracy (teacher {teacher_acc:.2%})")
    message += "." if gain is None else f", {100 * gain:+.2f} points over the same student trained on labels alone."
    print(message)
    if args.save_dir is not None:
        save_models(args.save_dir, cpu_models)
        print(f"saved teacher.pt and student.pt to {args.save_dir}")
    else:
        print("nothing written (pass --save-dir DIR to keep teacher.pt and student.pt)")

    result = {
        "status": "success", "message": message, "finalLoss": round(final_loss, 6),
        "teacherAccuracy": teacher_acc, "studentAccuracy": student_acc, "baselineAccuracy": baseline_acc,
        "distillationGain": None if gain is None else round(gain, 6),
        "teacherParams": param_count(teacher), "studentParams": param_count(student),
        "teacherSizeKB": round(size_kb(teacher), 1), "studentSizeKB": round(size_kb(student), 1),
        "studentSpeedup": round(speedup, 2), "temperature": args.temperature, "alpha": args.alpha,
        "teacherEpochs": args.teacher_epochs, "epochs": args.epochs, "device": str(device),
        "teacherUnchanged": teacher_unchanged, "saveDir": None if args.save_dir is None else str(args.save_dir),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
