"""quest_13_2.py (knowledge distillation): its parts in-process, and the script run as a user would, on real digits."""
import copy
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (OFFLINE_ENV, REPO, assert_clean_failure, import_script, result_json, run_script,
                      write_mnist_subset)
from tools.kit import FullDiskFile, interrupt_script, stop_while_starting

SCRIPT = "quest_13_2.py"
# 512 train digits in batches of 32 (16 steps an epoch), a short warm-up: each run takes seconds and still learns.
TINY = ("--device", "cpu", "--batch-size", "32", "--warmup-steps", "4", "--teacher-epochs", "2", "--epochs", "4")
TEACHER_EPOCH_LINE = re.compile(r"^teacher +epoch \d", re.M)  # what a run that trains its teacher prints


@pytest.fixture(scope="module")
def quest():
    """The script as a module, for the checks that need its functions rather than its output."""
    return import_script(SCRIPT)


def one_line_error(call, *args, **kwargs):
    """The text of the one-line error a call ends with (a SystemExit whose text starts with "error:")."""
    with pytest.raises(SystemExit) as exit_info:
        call(*args, **kwargs)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


# ---- settings: refused in one line before any work (in-process) ------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (("--alpha", "1.5"), ("--alpha", "[0, 1]")),
    (("--alpha", "nan"), ("--alpha", "nan")),
    (("--temperature", "0"), ("--temperature", "[0.1, 100]")),
    (("--temperature", "inf"), ("--temperature", "inf")),
    (("--lr", "nan"), ("--lr", "finite")),
    (("--lr", "-0.01"), ("--lr", "(0, 1e+30]")),
    (("--lr", "1e31"), ("--lr", "(0, 1e+30]")),  # Adam cannot take it (float32)
    (("--teacher-epochs", "0"), ("--teacher-epochs", "[1, 10000]")),
    (("--teacher-epochs", "10001"), ("--teacher-epochs", "[1, 10000]")),
    (("--epochs", "1.5"), ("--epochs", "whole number")),
    (("--epochs", "1000000000"), ("--epochs", "[1, 10000]")),
    (("--batch-size", "8193"), ("--batch-size", "[1, 8192]")),
    (("--warmup-steps", "-1"), ("--warmup-steps", "[0, 1000000]")),
    (("--warmup-steps", "1000001"), ("--warmup-steps", "[0, 1000000]")),
    (("--save-dir", "caf\udce9"), ("--save-dir", "'caf\\udce9' is not valid UTF-8")),  # a Latin-1 byte from the shell
    (("--teacher", "caf\udce9.pt"), ("--teacher", "not valid UTF-8")),
    (("--seed", "-1"), ("--seed", "[0, 4294967295]")),
    (("--seed", str(2**32)), ("--seed", "[0, 4294967295]")),
    (("--device", "tpu"), ("--device", "invalid choice")),
    (("--method", "fitnets"), ("--method", "invalid choice")),
    (("--dataset", "cifar10"), ("--dataset", "invalid choice")),
])
def test_bad_settings_are_refused_in_one_line(flags, words, quest):
    message = one_line_error(quest.parse_args, list(flags))
    assert "usage" not in message
    for word in words:
        assert word in message, message


def test_the_seed_takes_the_whole_range_its_help_names(quest, capsys):
    assert quest.parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1
    with pytest.raises(SystemExit):
        quest.parse_args(["--help"])
    assert "0 to 2^32-1" in " ".join(capsys.readouterr().out.split())


def test_compare_needs_the_baseline(quest):
    assert "--no-baseline" in one_line_error(quest.check_args, quest.parse_args(["--compare", "--no-baseline"]))


@pytest.mark.parametrize("where, words", [("under-a-file", ("under the file", "not a folder")),
                                          ("a-file", ("is a file",)),
                                          ("proc", ("not writable",)),
                                          ("long-name", ("pass a shorter path",)),
                                          ("long-name-inside", ("longer than the file system takes",))])
def test_unusable_save_dir_is_refused_before_the_data_is_touched(where, words, tmp_path, quest):
    (tmp_path / "a-file").write_text("x")
    save_dir = {"under-a-file": tmp_path / "a-file" / "models", "a-file": tmp_path / "a-file",
                "proc": "/proc/quest-13-2-models", "long-name": tmp_path / ("m" * 300),
                "long-name-inside": tmp_path / "runs" / ("m" * 250)}[where]
    message = one_line_error(quest.main, ["--data-dir", str(tmp_path / "no-data"), "--save-dir", str(save_dir)])
    assert "--save-dir" in message and all(word in message for word in words), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no data fetched, no folder created


def test_a_data_dir_name_too_long_for_the_file_system_is_refused(tmp_path, quest):
    message = one_line_error(quest.main, ["--data-dir", str(tmp_path / ("d" * 300)), "--device", "cpu"])
    assert "--data-dir" in message and "shorter path" in message, message


def test_a_device_that_is_not_there_is_refused(quest):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert "--device cpu" in one_line_error(quest.pick_device, "cuda")


# ---- the losses (in-process) ----------------------------------------------------------------------------------

def test_kd_loss_is_batchmean_kl_times_t_squared_plus_cross_entropy(quest):
    torch.manual_seed(0)
    student, teacher, labels, T = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,)), 5.0
    p = F.softmax(teacher / T, dim=1)
    kl_per_example = (p * (p.log() - F.log_softmax(student / T, dim=1))).sum(dim=1)
    soft = T * T * kl_per_example.mean()  # batchmean: summed over classes, averaged over the batch
    hard = F.cross_entropy(student, labels)
    view = quest.View(torch.zeros(8, 1, 28, 28), labels, torch.arange(8))  # a batch as fit() hands it over
    torch.testing.assert_close(quest.kd_loss(student, teacher, view, T, alpha=1.0), soft)
    torch.testing.assert_close(quest.kd_loss(student, teacher, view, T, alpha=0.0), hard)
    torch.testing.assert_close(quest.kd_loss(student, teacher, view, T, alpha=0.3), 0.3 * soft + 0.7 * hard)
    assert quest.kd_loss(teacher, teacher, view, T, alpha=1.0).abs() < 1e-5  # nothing left to learn


def test_hint_regressor_maps_student_maps_onto_the_teachers(quest):
    images = torch.randn(2, 1, 28, 28)
    student_maps = quest.StudentModel().features(images)
    assert quest.hint_regressor()(student_maps).shape == quest.TeacherModel().features(images).shape == (2, 64, 7, 7)
    # cosine: the flattened features have the same length (3,136), so no pooling is needed
    assert student_maps.flatten(1).shape == quest.TeacherModel().features(images).flatten(1).shape


# ---- the views: augmentation, and the same batches for every student (in-process) -----------------------------

def views_of(quest, augment, draws=None, n=16):
    """make_view on n constant images (image i is all i + 1, the blank border 0), drawing from `draws` (default: a
    generator seeded 0)."""
    images = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    labels = torch.arange(n) % 10
    draws = torch.Generator().manual_seed(0) if draws is None else draws
    randoms = quest.draw_augmentation([n], augment, draws, "cpu")[0]
    return quest.make_view(images, labels, torch.arange(n), augment, randoms, 0.0)


def test_a_shift_moves_each_image_by_at_most_two_pixels_and_brings_in_blank(quest):
    view = views_of(quest, "shift")
    for i, image in enumerate(view.images[:, 0]):
        inside = image == i + 1
        rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
        assert ((image == 0) | inside).all()  # its own pixels and blank, nothing else
        assert len(rows) >= 28 - quest.SHIFT_PIXELS and len(cols) >= 28 - quest.SHIFT_PIXELS
        assert inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one window, moved, not scrambled
    assert (view.images == 0).any()  # some image did move
    torch.testing.assert_close(views_of(quest, "shift").images, view.images)  # the same seed, the same shifts
    draws = torch.Generator().manual_seed(0)
    first, second = views_of(quest, "shift", draws), views_of(quest, "shift", draws)  # the next epoch's draw
    torch.testing.assert_close(first.images, view.images)
    assert not torch.equal(second.images, first.images)  # a fresh draw, not the same view again


def test_mixup_and_cutmix_split_the_labels_in_the_shares_they_mixed(quest, monkeypatch):
    monkeypatch.setattr(quest, "SHIFT_PIXELS", 0)  # no shift: every pixel is exactly its image's or its partner's
    n = 16
    own, partner = torch.arange(1, n + 1).float().view(n, 1, 1), torch.arange(n, 0, -1).float().view(n, 1, 1)
    mixup = views_of(quest, "mixup", n=n)
    share = mixup.own_share.view(n, 1, 1)
    torch.testing.assert_close(mixup.images[:, 0], (share * own + (1 - share) * partner).expand(n, 28, 28))
    cutmix = views_of(quest, "cutmix", n=n)
    pasted = cutmix.images[:, 0] == partner
    assert ((cutmix.images[:, 0] == own) | pasted).all()
    torch.testing.assert_close(cutmix.own_share, 1 - pasted.float().mean((1, 2)))  # the share is the area kept
    for box in pasted:  # what is pasted is one box
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if len(rows):
            assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert 0.2 < cutmix.own_share[:n // 2].mean() < 0.8 and 0.2 < mixup.own_share.mean() < 0.8
    # The labels' cross-entropy is split in the same shares: a soft target of the two labels.
    logits = torch.randn(n, 10)
    for view in (mixup, cutmix):
        target = (view.own_share[:, None] * F.one_hot(view.labels, 10)
                  + (1 - view.own_share[:, None]) * F.one_hot(view.partner_labels, 10))
        torch.testing.assert_close(quest.label_loss(logits, view), F.cross_entropy(logits, target))


@pytest.mark.parametrize("augment", ["mixup", "cutmix", "none"])
def test_the_baseline_and_the_students_see_the_same_batches_and_the_teacher_sees_the_students_view(augment, quest,
                                                                                                    mnist_root):
    args = quest.parse_args(["--data-dir", str(mnist_root), "--device", "cpu", "--batch-size", "64", "--epochs", "2",
                             "--augment", augment, "--warmup-steps", "2"])
    train_x, train_y = quest.load_split(args, train=True, device=torch.device("cpu"))
    torch.manual_seed(0)
    initial, teacher = quest.StudentModel(), quest.TeacherModel().eval().requires_grad_(False)
    seen = {}

    def record(name):
        return lambda module, inputs: seen.setdefault(name, []).append(inputs[0].clone())
    for method in (None, "kd", "hint"):
        student = copy.deepcopy(initial)
        hooks = [student.features.register_forward_pre_hook(record(f"student {method}")),
                 teacher.features.register_forward_pre_hook(record(f"teacher {method}"))]
        quest.train_student(method, student, train_x, train_y, teacher, args)
        for hook in hooks:
            hook.remove()
    steps = 2 * len(train_x) // 64
    baseline = seen["student None"][:steps]  # then the divergence check's forward pass on clean images
    assert len(baseline) == steps and "teacher None" not in seen  # the baseline never asks the teacher
    for method in ("kd", "hint"):
        student_views = seen[f"student {method}"][:steps]
        assert len(student_views) == steps
        assert all(torch.equal(a, b) for a, b in zip(student_views, baseline))  # same batches, same augmentations
        teacher_views = seen[f"teacher {method}"]
        if method == "kd" and augment == "none":  # its logits, fixed, computed once for the whole set
            assert len(teacher_views) == 1 and torch.equal(teacher_views[0], train_x)
        else:  # the teacher answers on exactly the student's view of each batch
            assert len(teacher_views) == steps and all(torch.equal(a, b) for a, b in zip(teacher_views, student_views))


def test_spec_gives_the_specs_run_and_flags_beside_it_win(quest):
    spec = quest.parse_args(["--spec"])
    assert {key: getattr(spec, key) for key in quest.SPEC_RUN} == quest.SPEC_RUN
    assert quest.parse_args(["--spec", "--epochs", "3"]).epochs == 3
    default = quest.parse_args([])
    assert (default.epochs, default.augment, default.method) == (quest.DEFAULT_EPOCHS, quest.DEFAULT_AUGMENT,
                                                                 quest.DEFAULT_METHOD)


# ---- the data (in-process) ------------------------------------------------------------------------------------

def write_fashion_layout(root):
    """A small folder in torchvision's FashionMNIST/raw layout (the IDX files are the format; the shipped digits
    stand in for the clothes)."""
    write_mnist_subset(root / "src", 64, 32)
    (root / "FashionMNIST").mkdir(parents=True)
    os.replace(root / "src" / "MNIST" / "raw", root / "FashionMNIST" / "raw")
    return root


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_preprocessing_equals_the_spec_transforms(dataset, quest, mnist_root, tmp_path):
    import torchvision
    from torchvision import transforms

    root = mnist_root if dataset == "mnist" else write_fashion_layout(tmp_path)
    mean, std = quest.NORMALIZE[dataset]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    dataset_class = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[dataset]
    reference = dataset_class(root=root, train=True, download=False, transform=transform)
    images, labels = quest.load_split(quest.parse_args(["--data-dir", str(root), "--dataset", dataset]), True,
                                      torch.device("cpu"))
    assert images.shape == (len(reference), 1, 28, 28) and labels.dtype == torch.int64
    for i in (0, 1, len(reference) - 1):
        image, label = reference[i]
        torch.testing.assert_close(images[i], image)
        assert labels[i].item() == label


def corrupt(raw, kind):
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if kind == "wrong-magic":  # e.g. a gzip file saved without its .gz
        images.write_bytes(b"\x1f\x8b\x08\x00" + images.read_bytes()[4:])
        return images, "corrupt"
    if kind == "truncated-images":
        images.write_bytes(images.read_bytes()[:5000])
        return images, "truncated"
    if kind == "too-few-labels":  # a valid IDX file, but 100 labels for 512 images
        data = labels.read_bytes()
        labels.write_bytes(data[:4] + (100).to_bytes(4, "big") + data[8:108])
        return labels, "100 labels for 512 images"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["wrong-magic", "truncated-images", "too-few-labels"])
def test_corrupt_mnist_file_is_named_in_one_line(kind, tmp_path, quest):
    root = write_mnist_subset(tmp_path / "data", 512, 256)
    bad, words = corrupt(root / "MNIST" / "raw", kind)
    message = one_line_error(quest.load_split, quest.parse_args(["--data-dir", str(root)]), True, torch.device("cpu"))
    assert str(bad) in message and words in message and "--data-dir" in message, message


def test_unreachable_download_is_one_line_and_writes_no_models(tmp_path, quest, monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # a closed port: every download fails at once
    message = one_line_error(quest.main, ["--data-dir", str(tmp_path / "empty"), "--device", "cpu",
                                          "--save-dir", str(tmp_path / "models")])
    assert "could not be downloaded" in message and "--data-dir" in message
    assert not (tmp_path / "models").exists()  # checked before the data, created only at the first write


# ---- --teacher: a file is checked before it is trusted (in-process) -------------------------------------------

def saved_teacher(quest, dataset="mnist"):
    """What --save-dir writes as teacher.pt, for an untrained teacher (the checks do not look at accuracy)."""
    args = quest.parse_args(["--dataset", dataset])
    return quest.model_record(quest.TEACHER_KIND, quest.TeacherModel(), args, 0.5, teacher_epochs=1, config={})


def damage(quest, kind, path):
    record = saved_teacher(quest)
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait forever
        return "not a file"
    if kind == "folder":
        path.mkdir()
        return "not a file"
    if kind == "missing":
        return "not a file"
    if kind == "garbage":
        path.write_bytes(b"not a torch file")
        return "cannot be read"
    if kind == "truncated":
        path.write_bytes(quest.torch_bytes(record)[:3000])
        return "cannot be read"
    if kind == "plain-state-dict":
        record = quest.TeacherModel().state_dict()
        message = "not a teacher saved by this script"
    elif kind == "student":
        record = quest.model_record(quest.STUDENT_KIND, quest.StudentModel(), quest.parse_args([]), 0.5)
        message = "a student.pt"
    elif kind == "other-dataset":
        record = saved_teacher(quest, "fashion-mnist")
        message = "--dataset fashion-mnist"
    elif kind == "other-architecture":
        record["architecture"] = "resnet18"
        message = "resnet18"
    elif kind == "dataset-two-lines":  # named back in the message: it must not break the one line
        record["dataset"] = "mnist\nsecond line"
        message = "damaged (its dataset is 'mnist\\nsecond line')"
    elif kind == "epochs-a-string":
        record["teacher_epochs"] = "5"
        message = "damaged"
    elif kind == "wrong-shapes":
        record["state_dict"] = quest.StudentModel().state_dict()
        message = "do not fit"
    elif kind == "nan-weights":
        record["state_dict"]["classifier.3.bias"][0] = float("nan")
        message = "not finite"
    path.write_bytes(quest.torch_bytes(record))
    return message


@pytest.mark.parametrize("kind", ["fifo", "folder", "missing", "garbage", "truncated", "plain-state-dict", "student",
                                  "other-dataset", "dataset-two-lines", "other-architecture", "epochs-a-string",
                                  "wrong-shapes",
                                  "nan-weights"])
def test_a_bad_teacher_file_is_refused_in_one_line(kind, tmp_path, quest):
    path = tmp_path / "teacher.pt"
    words = damage(quest, kind, path)
    message = one_line_error(quest.load_teacher, path, "mnist")
    assert "--teacher" in message and words in message, message


class RunsCode:
    """Unpickled with full pickle, this object runs os.mkdir(marker): a stand-in for any command a file could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_teacher_whose_pickle_would_run_code_is_refused_and_runs_nothing(tmp_path, quest):
    record, marker = saved_teacher(quest), tmp_path / "code-ran"
    record["config"] = RunsCode(marker)
    (tmp_path / "teacher.pt").write_bytes(quest.torch_bytes(record))
    message = one_line_error(quest.load_teacher, tmp_path / "teacher.pt", "mnist")
    assert "--teacher" in message and "cannot be read" in message and not marker.exists(), message
    torch.load(tmp_path / "teacher.pt", weights_only=False)  # the payload is real: full unpickling runs it
    assert marker.exists()


def test_a_saved_teacher_loads_back_bit_for_bit(tmp_path, quest):
    record = saved_teacher(quest)
    (tmp_path / "teacher.pt").write_bytes(quest.torch_bytes(record))
    teacher, epochs, saved_accuracy = quest.load_teacher(tmp_path / "teacher.pt", "mnist")
    assert (epochs, saved_accuracy) == (1, 0.5)
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, record["state_dict"][name]), name


# ---- the script, run as a user would ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(mnist_root, tmp_path_factory):
    """One tiny run with --save-dir, shared by the tests that read its output."""
    cwd = tmp_path_factory.mktemp("distill")
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--save-dir", cwd / "models", *TINY, cwd=cwd)
    return result_json(proc), proc, cwd


@pytest.mark.slow
def test_teacher_and_students_learn_and_the_files_are_saved(trained, quest):
    result, proc, cwd = trained
    # Learning: 512 digits, 32 steps: chance is 10%, every model must be far above it.
    assert result["teacherAccuracy"] > 0.8 and result["studentAccuracy"] > 0.7 and result["baselineAccuracy"] > 0.7, result
    assert result["distillationGain"] == pytest.approx(result["studentAccuracy"] - result["baselineAccuracy"], abs=1e-6)
    # The teacher taught: on these 256 test digits the default student beats the baseline by 17 (both CPU kinds);
    # 5 is a margin for other CPUs' rounding, not a figure to tune.
    assert result["distillationGain"] > 5 / 256, result
    assert (result["epochs"], result["augment"]) == (4, quest.DEFAULT_AUGMENT)
    assert result["teacherParams"] == 421_642 and result["studentParams"] == 31_530
    method = quest.DEFAULT_METHOD
    assert (result["method"], result["temperature"], result["alpha"]) == (method, quest.DEFAULT_TEMPERATURE,
                                                                          quest.DEFAULT_ALPHA[method])
    assert sorted(p.name for p in cwd.iterdir()) == ["models"]  # no ./data, no stray files
    assert sorted(p.name for p in (cwd / "models").iterdir()) == ["student.pt", "teacher.pt"]
    student = torch.load(cwd / "models" / "student.pt", weights_only=True)
    assert (student["kind"], student["method"], student["dataset"]) == (quest.STUDENT_KIND, method, "mnist")
    quest.StudentModel().load_state_dict(student["state_dict"])
    assert str(cwd / "models") in proc.stdout and TEACHER_EPOCH_LINE.search(proc.stdout)


@pytest.mark.slow
def test_a_reused_teacher_is_not_retrained_and_compare_trains_every_method(trained, mnist_root, tmp_path):
    first, _, cwd = trained
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--teacher", cwd / "models" / "teacher.pt", "--compare",
                      "--save-dir", tmp_path / "students", *TINY, cwd=tmp_path)
    result = result_json(proc)
    assert not TEACHER_EPOCH_LINE.search(proc.stdout) and "not retrained" in proc.stdout
    assert result["teacherLoaded"] is True and result["teacherEpochs"] == 2
    assert result["teacherAccuracy"] == first["teacherAccuracy"]  # exactly the saved teacher
    # The same seed: the default method's student and the baseline are the first run's, to the last digit.
    assert (result["studentAccuracy"], result["baselineAccuracy"]) == (first["studentAccuracy"], first["baselineAccuracy"])
    assert list(result["methods"]) == ["kd", "cosine", "hint", "baseline"]
    for name, row in result["methods"].items():
        assert row["gain"] == pytest.approx(row["accuracy"] - result["baselineAccuracy"], abs=1e-6)
        assert row["accuracy"] > 0.7, (name, row)  # every method's student learned
        assert f"student, {name}" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "students").iterdir()) == ["student.pt"]  # the teacher is already saved


@pytest.mark.slow
def test_a_teacher_of_another_dataset_ends_the_script_in_one_line(trained, tmp_path):
    _, _, cwd = trained
    fashion = write_fashion_layout(tmp_path / "fashion")
    proc = run_script(SCRIPT, "--data-dir", fashion, "--dataset", "fashion-mnist", "--teacher",
                      cwd / "models" / "teacher.pt", "--device", "cpu", cwd=tmp_path)
    assert_clean_failure(proc, "--teacher", "'mnist'", "--dataset mnist")


@pytest.mark.slow
def test_weights_blown_up_by_the_last_step_stop_the_run_and_keep_earlier_models(mnist_root, tmp_path, quest):
    models = tmp_path / "models"
    models.mkdir()
    models.joinpath("teacher.pt").write_bytes(b"an earlier teacher")
    # One optimizer step (512 digits, batch 512) at lr 1e30: the loss before it is finite, the model after it is not.
    message = one_line_error(quest.main, ["--data-dir", str(mnist_root), "--device", "cpu", "--batch-size", "512",
                                          "--warmup-steps", "0", "--lr", "1e30", "--teacher-epochs", "1",
                                          "--save-dir", str(models)])
    assert "teacher training diverged" in message and "not finite" in message and "--lr" in message, message
    assert sorted(p.name for p in models.iterdir()) == ["teacher.pt"]
    assert models.joinpath("teacher.pt").read_bytes() == b"an earlier teacher"


@pytest.mark.slow
def test_full_disk_leaves_the_earlier_teacher_whole_and_no_temp_file(mnist_root, tmp_path, quest, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    models.joinpath("teacher.pt").write_bytes(b"an earlier teacher")
    monkeypatch.setattr(quest, "open", FullDiskFile, raising=False)  # the script's own writes only
    message = one_line_error(quest.main, ["--data-dir", str(mnist_root), "--no-baseline", "--save-dir", str(models),
                                          *TINY])
    assert "disk is full" in message and "teacher.pt" in message
    assert '"status"' not in capsys.readouterr().out  # the JSON line comes after every file, so it never came
    assert sorted(p.name for p in models.iterdir()) == ["teacher.pt"]  # no temp file, no student.pt
    assert models.joinpath("teacher.pt").read_bytes() == b"an earlier teacher"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                              (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_ends_in_one_line_and_keeps_earlier_models(sig, code, words, mnist_root, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    models.joinpath("teacher.pt").write_bytes(b"an earlier teacher")
    proc = interrupt_script(SCRIPT, "--data-dir", mnist_root, "--device", "cpu", "--teacher-epochs", "500",
                            "--save-dir", models, ready="teacher ", cwd=tmp_path, sig=sig)  # its first epoch line
    assert proc.returncode == code, proc.stderr
    assert_clean_failure(proc, words, "nothing was written")
    assert sorted(p.name for p in models.iterdir()) == ["teacher.pt"]
    assert models.joinpath("teacher.pt").read_bytes() == b"an earlier teacher"


@pytest.mark.slow
def test_output_closed_by_head_ends_in_one_line_with_sigpipes_code(mnist_root, tmp_path):
    """`quest_13_2.py | head -1`: the next line printed finds the pipe closed. One line and exit 141 (as a shell
    reports SIGPIPE), as in every script (tests/test_one_voice.py checks that each one catches it)."""
    command = [sys.executable, str(REPO / SCRIPT), "--data-dir", str(mnist_root), "--device", "cpu",
               "--teacher-epochs", "500"]  # an epoch line every second or so: one comes after the pipe is closed
    with subprocess.Popen(command, cwd=tmp_path, env={**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout.readline().startswith(b"data: ")  # what head -1 keeps
        process.stdout.close()
        stderr = process.stderr.read().decode()
        process.wait(timeout=120)
    assert process.returncode == 141, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the program reading the output closed it"), stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_while_starting_is_one_line(sig, code, tmp_path):
    proc = stop_while_starting(SCRIPT, "--data-dir", tmp_path, cwd=tmp_path, sig=sig)
    assert proc.returncode == code, proc.stderr
    assert_clean_failure(proc, "while starting")
