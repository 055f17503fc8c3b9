"""Quest 13.2 - knowledge distillation: a big teacher whispers to a small student.

Act 1  The models: TeacherModel (two conv blocks, two fully connected layers) and StudentModel (one conv
       layer, one fully connected layer), 13x fewer parameters.
Act 2  The data: MNIST (or --dataset fashion-mnist), ToTensor + Normalize, shuffled batches of 64; each student
       batch is shifted and cut-mixed afresh every epoch (--augment cutmix), the same draws for every student.
Act 3  The teacher learns from the labels (Adam, peak lr 0.01 after a short warm-up, cosine decay), or is
       loaded from an earlier run's teacher.pt (--teacher PATH: train it once, distil many students).
Act 4  The frozen teacher teaches a student for 10 epochs (--method; defaults chosen by measurement), answering
       on the student's own view of each batch: a patient and consistent teacher (Beyer et al. 2022,
       https://arxiv.org/abs/2106.05237).
         kd      Hinton et al.'s soft targets: alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE, T 2,
                 alpha 0.5 (the default)
         hint    alpha * MSE(regressor(student conv maps), teacher conv maps) + (1 - alpha) * CE (FitNets), alpha 0.75
         cosine  alpha * (1 - cosine similarity of the flattened conv features) + (1 - alpha) * CE, alpha 0.25
       and a baseline student (same architecture, initial weights, batches, augmentations, optimizer and
       schedule) learns from the labels alone. --compare trains every method from the same start, as PyTorch's KD
       tutorial compares them. --spec is the spec's run: 1 epoch, no augmentation, kd at T 5 and alpha 0.5.
Act 5  Prove it: test accuracy of each model, gain over the baseline, sizes, CPU speed, then one JSON line.

    python quest_13_2.py --data-dir assets/mnist-5k                        # the 5,000 real digits in the repo
    python quest_13_2.py --teacher-epochs 5 --save-dir runs/t5             # full MNIST (downloaded to ./data)
    python quest_13_2.py --teacher runs/t5/teacher.pt                      # reuse it: ~2 min on 2 cores (bf16 CPU)

The figures in docs/quest_13_2.md were measured on the 4,000 + 1,000 shipped digits, fp32, on a 2-core x86 CPU
with native bf16 (AVX512-BF16).
"""
import argparse
import copy
import errno
import io
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional


def raise_interrupt(signum, frame):
    """SIGTERM (`timeout`, a scheduler, a closing terminal) stops a run the way Ctrl-C does: see exit_interrupted."""
    raise KeyboardInterrupt(signum)


signal.signal(signal.SIGTERM, raise_interrupt)
try:  # Ctrl-C or SIGTERM while the libraries load ends in one line too
    if hasattr(signal, "pthread_sigmask"):  # held until the imports end: one landing inside numpy's C import breaks it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision
    from tqdm import tqdm
    if hasattr(signal, "pthread_sigmask"):  # a signal held meanwhile is raised here, inside this guard
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
except KeyboardInterrupt as stop:
    print("error: interrupted while starting; nothing was done", file=sys.stderr)
    sys.exit(128 + (stop.args[0] if stop.args else signal.SIGINT))

# ---- settings ------------------------------------------------------------------------------------------------

# The spec's Normalize((0.1307,), (0.3081,)) for MNIST; Fashion-MNIST's own mean and std of its training pixels.
NORMALIZE = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
METHODS = ("kd", "cosine", "hint")
# Chosen by bench/bench_distill.py over 4 seeds in three regimes (docs/quest_13_2.md, "Measurements"): soft targets
# on cut-mixed views that the teacher answers itself gained +0.90 to +1.30 points on average, on every seed, more
# than with any other augmentation or none; with the teacher answering on the clean images they lost. T 2 / alpha
# 0.5 was level with the best T and alpha tried and the steadiest. 10 student epochs keep the two students under
# 2 minutes on 60,000 images and 2 CPU cores (bf16 CPU); a 1-epoch teacher has nothing to teach them.
DEFAULT_METHOD, DEFAULT_TEMPERATURE = "kd", 2.0
DEFAULT_ALPHA = {"kd": 0.5, "cosine": 0.25, "hint": 0.75}  # the weight of the teacher's term, per method
AUGMENTS, DEFAULT_AUGMENT = ("none", "shift", "mixup", "cutmix"), "cutmix"
DEFAULT_TEACHER_EPOCHS, DEFAULT_EPOCHS = 5, 10
# --spec: the spec's run, every value as the spec gives it (its batch size 64 and lr 0.01 are the defaults)
SPEC_RUN = {"teacher_epochs": 1, "epochs": 1, "augment": "none", "method": "kd", "temperature": 5.0, "alpha": 0.5,
            "lr_schedule": "constant", "warmup_steps": 0}
TEACHER_KIND, STUDENT_KIND = "quest_13_2 teacher", "quest_13_2 student"  # what a saved file says it holds
LATENCY_BATCH, LATENCY_REPEATS = 64, 10  # CPU speed: median over repeats of one batch of test digits
SHIFT_PIXELS = 2  # --augment: each image moves by up to this many pixels in x and in y
LOG_EVERY = 20  # steps between loss read-backs for the progress bar (each one waits for the GPU)
# Upper bounds of the counts, generous for real use and within a laptop's memory and patience: a teacher step holds
# about 0.4 MB per image (FP32, CPU), so 8,192 images take ~3 GB; 10,000 epochs of full MNIST are days on a CPU.
MAX_BATCH_SIZE, MAX_EPOCHS, MAX_WARMUP_STEPS = 8192, 10_000, 1_000_000


def parse_args(argv=None):
    parser = OneLineParser(description="Knowledge distillation on MNIST: a big teacher trains a small student.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=utf8_path, default="./data",
                        help="dataset root (holds MNIST/raw or FashionMNIST/raw); downloaded there if missing")
    parser.add_argument("--dataset", default="mnist", choices=sorted(NORMALIZE), help="which digits (or clothes)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                        help="where to train; auto = CUDA, then Apple MPS, then CPU")
    parser.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0,
                        help="seed for weights, batch order and augmentation draws, 0 to 2^32-1")
    parser.add_argument("--teacher", type=lambda text: Path(utf8_path(text)), default=None,
                        help="a teacher.pt written by an earlier --save-dir: skip teacher training and distil from it")
    parser.add_argument("--teacher-epochs", type=number(int, 1, MAX_EPOCHS), default=DEFAULT_TEACHER_EPOCHS,
                        help="epochs of teacher training (the spec's is 1: a teacher that has seen each image once has "
                             "little to teach a 10-epoch student)")
    parser.add_argument("--epochs", type=number(int, 1, MAX_EPOCHS), default=DEFAULT_EPOCHS,
                        help="epochs of each student (distilled and baseline; the spec's is 1): distillation pays "
                             "with a patient student")
    parser.add_argument("--batch-size", type=number(int, 1, MAX_BATCH_SIZE), default=64,
                        help=f"batch size for every model (at most {MAX_BATCH_SIZE:,}: about 3 GB of activations)")
    parser.add_argument("--lr", type=number(float, 0, 1e30, low_open=True), default=0.01,
                        help="Adam (peak) learning rate for every model (at most 1e30: Adam steps in float32)")
    parser.add_argument("--warmup-steps", type=number(int, 0, MAX_WARMUP_STEPS), default=30,
                        help="steps over which the learning rate ramps up to --lr (0: none)")
    parser.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                        help="after warm-up: cosine decay to 0 over the run, or constant (--lr-schedule constant "
                             "--warmup-steps 0 is the spec's plain Adam, which can diverge)")
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                        help="what the student learns from the teacher: soft targets (kd, the spec's), its hidden "
                             "features (cosine) or its conv feature maps through a regressor (hint)")
    parser.add_argument("--temperature", type=number(float, 0.1, 100), default=DEFAULT_TEMPERATURE,
                        help="softmax temperature T of the soft targets (kd; the spec's is 5)")
    parser.add_argument("--alpha", type=number(float, 0, 1), default=None,
                        help="weight of the teacher's term; 1 - alpha goes to cross-entropy on the labels. None: "
                             f"each method's own, {', '.join(f'{m} {a}' for m, a in DEFAULT_ALPHA.items())} (the "
                             "spec's loss is --method kd --temperature 5 --alpha 0.5)")
    parser.add_argument("--augment", default=DEFAULT_AUGMENT, choices=AUGMENTS,
                        help=f"what each student (and the baseline) sees, drawn afresh each epoch: the images as they "
                             f"are (none), moved by up to {SHIFT_PIXELS} px (shift), shifted and blended in pairs "
                             "(mixup) or shifted with a box of another image pasted in (cutmix); the teacher "
                             "answers on the same view (the spec's is none)")
    parser.add_argument("--compare", action="store_true",
                        help="train every --method and the baseline from the same initial weights, batches and "
                             "augmentations; one table")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline student (faster, no gain figure)")
    parser.add_argument("--save-dir", type=lambda text: Path(utf8_path(text)), default=None,
                        help="save teacher.pt and student.pt here (reuse the teacher with --teacher); nothing is "
                             "written without it")
    parser.add_argument("--spec", action="store_true",
                        help="the spec's run: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SPEC_RUN.items())
                             + " (flags given beside it still win)")
    if parser.parse_known_args(argv)[0].spec:  # the spec's values become the defaults; flags typed beside it win
        parser.set_defaults(**SPEC_RUN)
    return parser.parse_args(argv)


def check_args(args):
    """Everything that can be refused before data or models are loaded (numbers are checked by their argparse types)."""
    if args.compare and args.no_baseline:
        fail("--compare measures every method against the baseline; drop --no-baseline")
    try:  # a name the file system cannot take (too long, a loop of links) would end in a traceback in the reader
        os.stat(args.data_dir)
    except FileNotFoundError:
        pass  # downloaded there
    except OSError as err:
        fail(f"--data-dir {str(args.data_dir)[:60]}... cannot be used ({err.strerror or err}); pass a shorter path")
    if args.save_dir is not None:
        check_output_dir(args.save_dir, "--save-dir")


# ---- Act 1: the models ---------------------------------------------------------------------------------------

class TeacherModel(nn.Module):
    """Two conv blocks (conv -> ReLU -> max-pool) and two fully connected layers: 421,642 parameters."""

    ARCHITECTURE = "conv32-conv64-fc128-fc10"  # saved in teacher.pt: a file for another network is refused

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
    """One conv layer (with ReLU) and one fully connected layer: 31,530 parameters.

    The max-pool has no weights; it keeps the fully connected layer (most of the parameters) 4x smaller.
    """

    ARCHITECTURE = "conv16-fc10"

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # -> 16x14x14
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 14 * 14, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def hint_regressor():
    """--method hint: maps the student's 16x14x14 conv maps onto the teacher's 64x7x7 (FitNets, Romero et al. 2015,
    https://arxiv.org/abs/1412.6550; a conv regressor as in PyTorch's KD tutorial). Trained with the student and
    thrown away after: the student keeps its architecture."""
    return nn.Conv2d(16, 64, 3, stride=2, padding=1)


# ---- Act 2: the data -----------------------------------------------------------------------------------------

def load_split(args, train, device):
    """One split as a normalised (N, 1, 28, 28) float tensor on the device, plus its labels. The spec's ToTensor()
    + Normalize(mean, std), done once for the whole split instead of per image (tested equal)."""
    pixels, labels = load_mnist(args.dataset, args.data_dir, train)
    mean, std = NORMALIZE[args.dataset]
    images = (pixels.to(device).unsqueeze(1).float().div(255) - mean) / std
    return images, labels.to(device)


class View(NamedTuple):
    """One batch as a model sees it in training: the (shifted, mixed) images and what they are."""
    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor  # which training images (before augmentation): where a fixed teacher output is looked up
    partner_labels: Optional[torch.Tensor] = None  # mixup/cutmix: the label of the image mixed into each one
    own_share: Optional[torch.Tensor] = None  # mixup/cutmix: how much of each image is its own (the rest: the partner)


def draw_augmentation(batch_sizes, augment, draws, device):
    """One epoch of make_view's random numbers: per batch, a (rows, batch size) tensor holding each image's shift
    in y and x, then its own share (mixup, cutmix), then a box centre (cutmix); None for --augment none. Drawn batch
    by batch from the CPU generator `draws` (the same numbers on every device, and for every student of a run) and
    copied to the device once an epoch, not at every step. Each epoch draws afresh: a student passing over the
    data many times never sees the same view twice."""
    if augment == "none":
        return [None] * len(batch_sizes)
    per_batch = []
    for n in batch_sizes:
        rows = [torch.randint(0, 2 * SHIFT_PIXELS + 1, (2, n), generator=draws).float()]
        if augment != "shift":
            rows.append(torch.rand(1, n, generator=draws))
        if augment == "cutmix":
            rows.append(torch.rand(2, n, generator=draws))
        per_batch.append(torch.cat(rows))
    return torch.cat(per_batch, dim=1).to(device).split(list(batch_sizes), dim=1)


def make_view(images, labels, index, augment, randoms, background):
    """--augment: the batch as the student sees it, from this batch's draw_augmentation numbers, so every student
    of a run (and the teacher looking at them) sees the same shifts and mixes."""
    if augment == "none":
        return View(images, labels, index)
    n, _, height, width = images.shape
    offsets = randoms[:2].long()
    padded = F.pad(images, (SHIFT_PIXELS,) * 4, value=background)  # a blank border, then a 28x28 window of it
    rows = (offsets[0, :, None] + torch.arange(height, device=images.device))[:, :, None]
    cols = (offsets[1, :, None] + torch.arange(width, device=images.device))[:, None, :]
    images = padded[torch.arange(n, device=images.device)[:, None, None], 0, rows, cols].unsqueeze(1)
    if augment == "shift":
        return View(images, labels, index)
    # Each image is mixed with the batch's image at the mirrored position; its own share is uniform in [0, 1]
    # (mixup's Beta(1, 1), as in Beyer et al.'s function matching).
    share = randoms[2]
    partner, partner_labels = images.flip(0), labels.flip(0)
    if augment == "mixup":  # Zhang et al. 2017, https://arxiv.org/abs/1710.09412
        weight = share.view(n, 1, 1, 1)
        return View(weight * images + (1 - weight) * partner, labels, index, partner_labels, share)
    # cutmix (Yun et al. 2019, https://arxiv.org/abs/1905.04899): a box of the partner, (1 - share) of the area,
    # centred anywhere; the box is clipped at the edges, and the shares are what is actually pasted.
    size = torch.tensor([[height], [width]], dtype=torch.float32, device=images.device)
    centres = randoms[3:5] * size
    half = (1 - share).sqrt() * size / 2  # a box of the image's proportions, (1 - share) of its area
    low, high = (centres - half).round().clamp(min=0), torch.minimum((centres + half).round(), size)
    ys, xs = torch.arange(height, device=images.device), torch.arange(width, device=images.device)
    inside = (((ys >= low[0, :, None]) & (ys < high[0, :, None]))[:, :, None]
              & ((xs >= low[1, :, None]) & (xs < high[1, :, None]))[:, None, :]).unsqueeze(1)
    share = 1 - (high - low).clamp(min=0).prod(0) / (height * width)
    return View(torch.where(inside, partner, images), labels, index, partner_labels, share)


def label_loss(logits, view):
    """Cross-entropy on the view's labels: a mixed image's loss is split between its two labels by their shares."""
    if view.own_share is None:
        return F.cross_entropy(logits, view.labels)
    return (view.own_share * F.cross_entropy(logits, view.labels, reduction="none")
            + (1 - view.own_share) * F.cross_entropy(logits, view.partner_labels, reduction="none")).mean()


# ---- Acts 3 and 4: training ----------------------------------------------------------------------------------

def fit(model, images, labels, loss_of_view, epochs, args, name, augment="none", extra_params=()):
    """Adam over shuffled batches, each turned into a View by `augment`; loss_of_view(model, view) says what to
    learn. Returns the last epoch's mean loss; a loss or weights that stop being finite end the run in one line
    (nothing is written)."""
    params = [*model.parameters(), *extra_params]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    # Adam's first steps move every weight by about lr whatever its gradient. At the spec's lr 0.01 that throws
    # the teacher's 3136->128 layer so far that, for some seeds, every ReLU dies (10% accuracy); a short warm-up
    # to the same lr avoids it, and the cosine decay lets the weights settle instead of bouncing at lr 0.01.
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    final = 0.0 if args.lr_schedule == "cosine" else 1.0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, epochs * steps_per_epoch, args.warmup_steps, final))
    # Every model sees the same batches in the same order, and the same shifts and mixes of them: a fair comparison.
    order, draws = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 2)
    mean, std = NORMALIZE[args.dataset]
    background = -mean / std  # a blank pixel after Normalize: what a shift brings in at the edge
    # No autocast: nets this small are bound by kernel launches, not arithmetic; bf16 would only round the targets.
    model.train()
    for epoch in range(1, epochs + 1):
        batches = torch.randperm(len(images), generator=order).to(images.device).split(args.batch_size)
        randoms = draw_augmentation([len(idx) for idx in batches], augment, draws, images.device)
        total = torch.zeros((), device=images.device)
        bar = tqdm(batches, desc=f"{name} epoch {epoch}/{epochs}", leave=False, disable=None)  # no bars when not a terminal
        for step, (idx, batch_randoms) in enumerate(zip(bar, randoms), 1):
            loss = loss_of_view(model, make_view(images[idx], labels[idx], idx, augment, batch_randoms, background))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach()
            if step % LOG_EVERY == 0 or step == len(batches):
                running = total.item() / step
                if not math.isfinite(running):
                    diverged(name, f"loss {running} at epoch {epoch}, step {step}", args)
                bar.set_postfix(loss=f"{running:.4f}")
        epoch_loss = total.item() / len(batches)
        print(f"{name:<18} epoch {epoch}/{epochs}  loss {epoch_loss:.4f}", flush=True)
    # The last step can blow the weights up after a finite loss, or leave huge finite weights that overflow.
    if not all_finite(params) or not all_finite([predict(model, images[:args.batch_size])]):
        diverged(name, "its weights or outputs are not finite after the last step", args)
    return epoch_loss


def diverged(name, what, args):
    fail(f"{name} training diverged ({what}); nothing was written; lower --lr (now {args.lr:g}, e.g. --lr {args.lr / 10:g})")


def train_teacher(teacher, train_x, train_y, args):
    """Act 3: the teacher learns from the labels alone, on the images as they are."""
    return fit(teacher, train_x, train_y, lambda model, view: F.cross_entropy(model(view.images), view.labels),
               args.teacher_epochs, args, "teacher")


def kd_loss(student_logits, teacher_logits, view, temperature, alpha):
    """alpha * T^2 * KL(student || teacher at temperature T) + (1 - alpha) * CE(student, labels) (Hinton et al. 2015,
    https://arxiv.org/abs/1503.02531). "batchmean" divides the KL sum by the batch size, as its definition wants
    (the default "mean" also divides by the 10 classes); T^2 keeps the soft gradients as large as the hard ones."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean")
    return alpha * temperature ** 2 * soft + (1 - alpha) * label_loss(student_logits, view)


def alpha_of(method, args):
    """The weight of the teacher's term for `method`: --alpha, or the method's measured default."""
    return None if method is None else DEFAULT_ALPHA[method] if args.alpha is None else args.alpha


def train_student(method, student, train_x, train_y, teacher, args):
    """Act 4: one student from the frozen teacher by `method`, or the baseline on the labels alone (method None).
    The teacher answers on the student's own view of each batch (the same shifts and mixes): a consistent
    teacher. Returns (last epoch's mean loss, seconds)."""
    start = time.perf_counter()
    name, extra_params, alpha = method or "baseline", (), alpha_of(method, args)
    if method is None:
        def loss_of_view(model, view):
            return label_loss(model(view.images), view)
    elif method == "kd":
        # Without augmentation the frozen teacher's logits never change: computed once for the set.
        fixed_logits = predict(teacher, train_x) if args.augment == "none" else None

        def loss_of_view(model, view):
            if fixed_logits is None:
                with torch.no_grad():
                    teacher_logits = teacher(view.images)
            else:
                teacher_logits = fixed_logits[view.index]
            return kd_loss(model(view.images), teacher_logits, view, args.temperature, alpha)
    else:  # cosine, hint: the teacher's features (3,136 per image) are computed per batch, not stored for the set
        regressor = hint_regressor().to(train_x.device) if method == "hint" else None
        extra_params = () if regressor is None else tuple(regressor.parameters())

        def loss_of_view(model, view):
            with torch.no_grad():
                teacher_maps = teacher.features(view.images)
            student_maps = model.features(view.images)
            if regressor is None:  # CosineEmbeddingLoss with target 1, as in the tutorial
                term = (1 - F.cosine_similarity(student_maps.flatten(1), teacher_maps.flatten(1))).mean()
            else:
                term = F.mse_loss(regressor(student_maps), teacher_maps)
            return alpha * term + (1 - alpha) * label_loss(model.classifier(student_maps), view)
    final_loss = fit(student, train_x, train_y, loss_of_view, args.epochs, args, f"student ({name})", args.augment,
                     extra_params)
    return final_loss, time.perf_counter() - start


# ---- Act 5: evaluation and artifacts ------------------------------------------------------------------------

@torch.no_grad()
def predict(model, images, chunk=1000):
    model.eval()
    return torch.cat([model(part) for part in images.split(chunk)])


def accuracy(model, images, labels):
    return (predict(model, images).argmax(dim=1) == labels).sum().item() / len(labels)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def size_kb(model):
    return len(torch_bytes(model.state_dict())) / 1024


@torch.inference_mode()
def cpu_latency_ms(model, batch):
    """Median wall time of one forward pass over `batch` on the CPU, after a warm-up pass."""
    model = copy.deepcopy(model).cpu().eval()
    model(batch)
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def model_record(kind, model, args, test_accuracy, **extra):
    """What teacher.pt / student.pt hold: the weights (CPU) and what they are, so --teacher can check a file."""
    return {"kind": kind, "architecture": model.ARCHITECTURE, "dataset": args.dataset, "test_accuracy": test_accuracy,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}


def save_models(save_dir, records):
    """Each file through write_atomically: a full disk leaves the earlier teacher.pt/student.pt whole."""
    try:  # checked before any work; created only now, at the first write
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"could not create --save-dir {save_dir} ({err.strerror or err}); pass a folder you can write to")
    for name, record in records.items():
        write_atomically(save_dir / f"{name}.pt", torch_bytes(record))


def load_teacher(path, dataset):
    """--teacher: a teacher.pt from an earlier --save-dir, checked for what it is before it is trusted."""
    fix = "pass a teacher.pt written by quest_13_2.py --save-dir, or drop --teacher to train one"
    if not os.path.isfile(path):  # also refuses folders, FIFOs and devices (reading a FIFO would wait forever)
        fail(f"--teacher {str(path)[:200]} is not a file; {fix}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, pickled code: torch raises many kinds
        fail(f"--teacher {path} cannot be read as a torch file ({type(err).__name__}); {fix}")
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind != TEACHER_KIND:
        what = "a student.pt" if kind == STUDENT_KIND else "not a teacher saved by this script"
        fail(f"--teacher {path} is {what}; {fix}")
    if record.get("architecture") != TeacherModel.ARCHITECTURE:
        fail(f"--teacher {path} holds a {record.get('architecture')!r:.60} network, not this script's "
             f"{TeacherModel.ARCHITECTURE!r}; {fix}")
    if record.get("dataset") not in NORMALIZE:  # only a dataset this script knows is named back as a flag
        fail(f"--teacher {path} is damaged (its dataset is {record.get('dataset')!r:.60}); {fix}")
    if record.get("dataset") != dataset:
        fail(f"--teacher {path} was trained on {record.get('dataset')!r}, not {dataset!r}; pass "
             f"--dataset {record.get('dataset')} or a teacher trained on {dataset}")
    epochs, saved_accuracy = record.get("teacher_epochs"), record.get("test_accuracy")
    if (type(epochs) is not int or epochs < 1 or type(saved_accuracy) is not float or not 0 <= saved_accuracy <= 1
            or not isinstance(record.get("state_dict"), dict)):
        fail(f"--teacher {path} is damaged (its teacher_epochs, test_accuracy or weights are missing or wrong); {fix}")
    teacher = TeacherModel()
    try:
        teacher.load_state_dict(record["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as err:
        fail(f"--teacher {path} is damaged (its weights do not fit the teacher: {str(err).splitlines()[0][:120]}); {fix}")
    if not all_finite(teacher.state_dict().values()):
        fail(f"--teacher {path} holds weights that are not finite (a diverged run); {fix}")
    return teacher, epochs, saved_accuracy


def main(argv=None):
    args = parse_args(argv)
    check_args(args)  # the folders, before any data or model is loaded
    loaded = None if args.teacher is None else load_teacher(args.teacher, args.dataset)
    device = pick_device(args.device)

    # Act 1: the models; the student first, so its initial weights are the same whether the teacher is trained
    # or loaded.
    torch.manual_seed(args.seed)
    initial_student = StudentModel().to(device)
    teacher = TeacherModel().to(device) if loaded is None else loaded[0].to(device)

    # Act 2: the data, normalised once, on the device.
    train_x, train_y = load_split(args, train=True, device=device)
    test_x, test_y = load_split(args, train=False, device=device)
    print(f"data: {args.dataset}, {len(train_x)} train / {len(test_x)} test images on {device}; "
          f"{math.ceil(len(train_x) / args.batch_size)} steps of {args.batch_size} per epoch")

    # Act 3: the teacher.
    if loaded is None:
        train_teacher(teacher, train_x, train_y, args)
        teacher_epochs, source = args.teacher_epochs, "trained"
    else:
        teacher_epochs, source = loaded[1], f"loaded from {args.teacher}, not retrained"
    teacher.eval().requires_grad_(False)  # frozen: no dropout or batch norm to switch, no gradients
    teacher_acc = accuracy(teacher, test_x, test_y)
    print(f"teacher ({teacher_epochs} epoch{'s' * (teacher_epochs != 1)}, {source}): test accuracy {teacher_acc:.2%}"
          + ("" if loaded is None else f" ({loaded[2]:.2%} on the test set of the run that saved it)"))
    if teacher_acc < 0.5:
        print(f"warning: the teacher only reached {teacher_acc:.1%}; it has little to teach "
              "(try a lower --lr, a longer --warmup-steps or more --teacher-epochs)", file=sys.stderr)

    # Act 4: the students, each from the same initial weights, batches and augmentations; the baseline last.
    methods = list(METHODS) if args.compare else [args.method]
    print(f"students: {args.epochs} epoch{'s' * (args.epochs != 1)} each, augmentation {args.augment}"
          + ("" if args.augment == "none" else " (drawn afresh each epoch; the teacher answers on the student's view)"))
    students = {}  # name -> (model, final loss, seconds, test accuracy)
    for method in methods + ([] if args.no_baseline else [None]):
        torch.manual_seed(args.seed + 1)  # the hint regressor's initial weights, the same in every run
        student = copy.deepcopy(initial_student)
        final_loss, seconds = train_student(method, student, train_x, train_y, teacher, args)
        students[method or "baseline"] = (student, final_loss, seconds, accuracy(student, test_x, test_y))

    # Act 5: the table, the sizes and speeds, the files, the JSON line.
    baseline_acc = students["baseline"][3] if "baseline" in students else None
    student, final_loss, _, student_acc = students[args.method]
    print(f"\n{'model':<18} {'test acc':>8} {'gain':>7} {'seconds':>7}")
    print(f"{'teacher':<18} {teacher_acc:>8.2%} {'':>7} {'':>7}")
    for name, (_, _, seconds, acc) in students.items():
        gain = "" if baseline_acc is None or name == "baseline" else f"{100 * (acc - baseline_acc):+.2f}"
        print(f"{'student, ' + name:<18} {acc:>8.2%} {gain:>7} {seconds:>7.1f}")
    latency_batch = test_x[:LATENCY_BATCH].cpu()
    teacher_ms, student_ms = cpu_latency_ms(teacher, latency_batch), cpu_latency_ms(student, latency_batch)
    teacher_params, student_params = param_count(teacher), param_count(student)
    teacher_kb, student_kb = size_kb(teacher), size_kb(student)  # each serialises the weights: once, here
    print(f"teacher {teacher_params:,} parameters, {teacher_kb:.1f} KB, {teacher_ms:.2f} ms per batch of "
          f"{len(latency_batch)} on CPU; student {student_params:,}, {student_kb:.1f} KB, {student_ms:.2f} ms "
          f"({teacher_ms / student_ms:.1f}x faster)")
    gain = None if baseline_acc is None else student_acc - baseline_acc
    message = (f"Distillation done: the student ({args.method}), {teacher_params / student_params:.0f}x smaller "
               f"than the teacher, reached {student_acc:.2%} test accuracy (teacher {teacher_acc:.2%})")
    message += "." if gain is None else f", {100 * gain:+.2f} points over the same student trained on labels alone."
    print(message)

    if args.save_dir is not None:
        records = {} if loaded is not None else {  # a loaded teacher is already on disk
            "teacher": model_record(TEACHER_KIND, teacher, args, teacher_acc, teacher_epochs=args.teacher_epochs,
                                    config={"seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
                                            "warmup_steps": args.warmup_steps, "lr_schedule": args.lr_schedule})}
        records["student"] = model_record(STUDENT_KIND, student, args, student_acc, method=args.method,
                                          config={"seed": args.seed, "epochs": args.epochs, "augment": args.augment,
                                                  "temperature": args.temperature,
                                                  "alpha": alpha_of(args.method, args),
                                                  "teacher": str(args.teacher or "trained")})
        save_models(args.save_dir, records)
        print(f"saved {' and '.join(f'{name}.pt' for name in records)} to {args.save_dir}")
    else:
        print("nothing written (pass --save-dir DIR to keep teacher.pt and student.pt)")

    result = {
        "status": "success", "message": message, "finalLoss": round(final_loss, 6),
        "teacherAccuracy": teacher_acc, "studentAccuracy": student_acc, "baselineAccuracy": baseline_acc,
        "distillationGain": None if gain is None else round(gain, 6), "method": args.method,
        "methods": {name: {"accuracy": acc, "gain": None if baseline_acc is None else round(acc - baseline_acc, 6),
                           "seconds": round(seconds, 2)} for name, (_, _, seconds, acc) in students.items()},
        "teacherParams": teacher_params, "studentParams": student_params,
        "teacherSizeKB": round(teacher_kb, 1), "studentSizeKB": round(student_kb, 1),
        "studentSpeedup": round(teacher_ms / student_ms, 2), "temperature": args.temperature,
        "alpha": alpha_of(args.method, args),
        "teacherEpochs": teacher_epochs, "teacherLoaded": loaded is not None, "epochs": args.epochs,
        "augment": args.augment,
        "dataset": args.dataset, "device": str(device), "saveDir": None if args.save_dir is None else str(args.save_dir),
    }
    print(json.dumps(result, allow_nan=False))
    return result


# ---- plumbing: one voice (docs/contributing.md, verbatim) -----------------------------------------------------
def fail(message):
    """End the run the way every fault ends here: one line on stderr, exit 1, no traceback."""
    raise SystemExit(f"error: {message}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends like every other fault: one line on stderr, no usage dump."""

    def error(self, message):
        fail(f"{message}; run with --help to see the flags")


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """argparse type: a finite int or float (`kind`) from low to high; an open end leaves the bound itself out.
    number(int, 1): a whole number >= 1; number(float, 0, low_open=True): above 0; number(float, 0, 1): in [0, 1]."""
    what = "a whole number" if kind is int else "a finite number"
    if low is not None and high is not None:
        what += f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        what += f" {'above' if low_open else '>='} {low}"
    elif high is not None:
        what += f" {'below' if high_open else '<='} {high}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not (math.isfinite(value) and (low is None or value > low or value == low and not low_open)
                and (high is None or value < high or value == high and not high_open)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


def utf8_path(text):
    """argparse type of a path flag: text that is valid UTF-8. A name in another encoding (a Latin-1 byte typed in
    the shell) arrives as a lone surrogate, which print and the JSON line cannot write: refused before any work."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{ascii(text)[:80]} is not valid UTF-8; rename it or pass a UTF-8 path") \
            from None
    return text


def pick_device(name):
    """--device auto: CUDA, then Apple's MPS, then the CPU; a device asked for by name must be there."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(kind for kind, present in available.items() if present)
    elif not available[name]:
        fail(f"--device {name} was requested but is not available here; use --device auto or --device cpu")
    return torch.device(name)


def check_output_dir(path, flag):
    """Before any work: `path` must be a folder we can write in, or one we can create. Probes with a real temp
    file (os.access says yes to root even on a read-only folder) and creates nothing."""
    path = Path(path)
    try:
        existing = next(folder for folder in (path, *path.parents) if folder.exists())
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except OSError as err:  # a name or path longer than the file system takes, a loop of links
        fail(f"{flag} {str(path)[:60]}... cannot be used ({err.strerror or err}); pass a shorter path")
    if any(len(os.fsencode(part)) > name_max - 20 for part in path.relative_to(existing).parts):
        fail(f"{flag}: a folder name in {str(path)[:60]}... is longer than the file system takes "
             f"({name_max} bytes, less room for temp names); pass a shorter path")
    if not existing.is_dir():
        where = "a file" if existing == path else f"under the file {existing}"
        fail(f"{flag} {path} is {where}, not a folder; pass a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        fail(f"{flag} {path} is not writable ({existing}: {err.strerror or err}); pass a folder you can write to")


def write_atomically(path, data):
    """bytes -> path through a temp file in the same folder and os.replace: a final name never holds half a
    file, and a failed write removes its temp file and ends in one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        fail(f"could not write {path} ({reason}); free some space or pass another output folder")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def torch_bytes(obj):
    """torch.save into memory: the disk is then written by write_atomically alone (a full disk is an OSError
    there, not a half-written zip or a C++ abort)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def all_finite(tensors):
    """Whether every floating-point tensor holds only finite numbers: asked before anything is saved, because a
    loss computed before the last optimizer step can be finite while the weights after it are not."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors if tensor.is_floating_point())


def exit_interrupted(stop, what_was_kept):
    """End a run that Ctrl-C or SIGTERM stopped: one line saying what was kept and how to continue; exit 130 for
    Ctrl-C, 143 for SIGTERM (128 + the signal, as a shell reports it)."""
    signum = stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT
    cause = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    print(f"error: {cause}; {what_was_kept}", file=sys.stderr)
    sys.exit(128 + signum)


def exit_closed_pipe():
    """stdout closed by the program reading it (`| head -1`): end in one line, not a traceback, with exit 141, as a
    shell reports a process that SIGPIPE ended. Whatever is still printed, Python's flush at exit included, goes to
    /dev/null. Files already written are whole: every one is written atomically."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print("error: the program reading the output closed it (e.g. `| head`); the run stopped there, and the files "
          "it wrote are complete", file=sys.stderr)
    sys.exit(128 + getattr(signal, "SIGPIPE", 13))


def read_idx(path, ndim):
    """One raw MNIST file as a uint8 tensor: a big-endian header (magic 0x0800 + ndim, then one 4-byte size per
    dimension) and exactly that many bytes. Anything else is called corrupt, by name, before the body is read (a
    huge file under that name never fills the memory)."""
    header, fix = 4 * (ndim + 1), "delete it to download it again, or pass another --data-dir"
    try:
        with open(path, "rb") as file:
            head, size = file.read(header), os.fstat(file.fileno()).st_size
            if len(head) < header or int.from_bytes(head[:4], "big") != 0x800 + ndim:
                fail(f"{path} is corrupt (no MNIST IDX header with {ndim} dimension(s)); {fix}")
            dims = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
            if size != header + math.prod(dims):
                fail(f"{path} is corrupt (its header promises {header + math.prod(dims)} bytes, it holds {size}: "
                     f"truncated or padded); {fix}")
            body = bytearray(file.read())
    except OSError as err:
        fail(f"could not read {path} ({err.strerror or err}); check the file or pass another --data-dir")
    if math.prod(dims) == 0:
        return torch.zeros(dims, dtype=torch.uint8)
    return torch.frombuffer(body, dtype=torch.uint8).view(*dims)


def load_mnist(name, data_dir, train):
    """One split of MNIST or Fashion-MNIST as uint8 images (N, 28, 28) and int64 labels on the CPU, read from
    torchvision's raw layout <data_dir>/<MNIST|FashionMNIST>/raw and downloaded there when missing. A split that
    cannot be had, or is corrupt or empty, ends in one line naming the file."""
    dataset_class = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    raw, split = Path(data_dir) / dataset_class.__name__ / "raw", "train" if train else "t10k"
    image_file, label_file = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
    for path in (image_file, label_file):  # a folder, FIFO or device under a file's name: a download would hang on it
        if os.path.exists(path) and not os.path.isfile(path):
            fail(f"{path} is not a regular file (a folder, FIFO or device); remove it, or pass another --data-dir")
    if not (os.path.isfile(image_file) and os.path.isfile(label_file)):  # False, not an error, for too long a name
        try:  # torchvision fetches the four raw files into <data_dir>/<class>/raw
            dataset_class(root=data_dir, train=train, download=True)
        except Exception as err:  # URLError is an OSError; a failed or bad download surfaces as other errors too
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            fail(f"{name} is not in {raw} and could not be downloaded ({lines[-1] if lines else type(err).__name__}); "
                 f"pass --data-dir pointing at a folder that holds {dataset_class.__name__}/raw "
                 "(e.g. --data-dir assets/mnist-5k for MNIST)")
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
    fix = "delete it to download it again, or pass another --data-dir"
    if images.shape[1:] != (28, 28):
        fail(f"{image_file} is corrupt (images of {images.shape[1]}x{images.shape[2]} pixels, not 28x28); {fix}")
    if len(images) == 0:
        fail(f"{image_file} holds no images; pass --data-dir pointing at a complete {dataset_class.__name__}/raw")
    if len(labels) != len(images) or labels.max() > 9:
        what = f"{len(labels)} labels for {len(images)} images" if len(labels) != len(images) else "a label above 9"
        fail(f"{label_file} is corrupt ({what}); {fix}")
    return images, labels.long()


def warmup_cosine(step, total_steps, warmup_steps, final=0.1):
    """The lr multiplier at `step`: a linear warm-up over warmup_steps, then a cosine decay that reaches `final`
    (a share of the peak) at total_steps, nanoGPT's shape."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:
        exit_interrupted(stop, "nothing was written (models are saved only at the end, so files already in --save-dir "
                               "are untouched); run the command again")
    except BrokenPipeError:  # stdout closed early by the program reading it
        exit_closed_pipe()
