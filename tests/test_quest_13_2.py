"""quest_13_2.py (knowledge distillation): run it as a user would, on a few hundred real digits."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (DEVICES, assert_clean_failure, import_script, result_json, run_script,
                      write_mnist_subset)
from tools.kit import FullDiskFile, interrupt_script

SCRIPT = "quest_13_2.py"
TINY = ("--batch-size", "128")  # 512 train digits: 4 steps per epoch keeps each run to seconds


@pytest.fixture(scope="module")
def quest():
    """The script as a module, for the checks that need its functions rather than its output."""
    return import_script(SCRIPT)


@pytest.fixture(scope="module")
def cpu_run(mnist_root, tmp_path_factory):
    """One tiny CPU run with --save-dir, shared by the tests that read its output."""
    cwd = tmp_path_factory.mktemp("distill-cpu")
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--device", "cpu", "--save-dir", cwd / "models", *TINY, cwd=cwd)
    return proc, cwd


def check_result(result, device, alpha):
    assert result["status"] == "success" and result["message"]
    assert math.isfinite(result["finalLoss"]) and result["finalLoss"] > 0
    for key in ("teacherAccuracy", "studentAccuracy", "baselineAccuracy"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert result["distillationGain"] == pytest.approx(result["studentAccuracy"] - result["baselineAccuracy"], abs=1e-6)
    assert result["teacherParams"] > 10 * result["studentParams"] > 0
    assert result["teacherSizeKB"] > result["studentSizeKB"] > 0
    assert result["studentSpeedup"] > 0
    assert (result["temperature"], result["alpha"]) == (5.0, alpha)
    assert result["device"].startswith(device)
    # The frozen teacher: weights bit-identical before/after distillation and not one .grad on it.
    assert result["teacherUnchanged"] is True


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_run_reports_all_three_models(device, mnist_root, tmp_path, cpu_run, quest):
    proc, cwd = cpu_run if device == "cpu" else (run_script(SCRIPT, "--data-dir", mnist_root, "--device", device, *TINY,
                                                            cwd=tmp_path), tmp_path)
    check_result(result_json(proc), device, quest.DEFAULT_ALPHA)
    assert "final loss" in proc.stdout and "baseline student" in proc.stdout


def test_save_dir_holds_loadable_models_and_nothing_else_is_written(cpu_run, quest):
    proc, cwd = cpu_run
    assert sorted(p.name for p in cwd.iterdir()) == ["models"]  # no ./data, no stray files in the working dir
    assert sorted(p.name for p in (cwd / "models").iterdir()) == ["student.pt", "teacher.pt"]
    for name, cls in (("teacher", quest.TeacherModel), ("student", quest.StudentModel)):
        cls().load_state_dict(torch.load(cwd / "models" / f"{name}.pt", weights_only=True))
    assert str(cwd / "models") in proc.stdout


def test_same_seed_same_result_and_no_baseline_leaves_the_distilled_run_alone(mnist_root, tmp_path, cpu_run):
    full = result_json(cpu_run[0])
    skipped = result_json(run_script(SCRIPT, "--data-dir", mnist_root, "--device", "cpu", "--no-baseline", *TINY, cwd=tmp_path))
    assert skipped["baselineAccuracy"] is None and skipped["distillationGain"] is None
    # Same seed, same device: the same teacher, the same distilled student, to the last digit.
    for key in ("teacherAccuracy", "studentAccuracy", "finalLoss", "teacherUnchanged"):
        assert skipped[key] == full[key], key
    assert list(tmp_path.iterdir()) == []  # without --save-dir nothing is written


def test_vectorised_preprocessing_equals_the_spec_transforms(quest, mnist_root):
    import torchvision
    from torchvision import transforms

    spec_transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = torchvision.datasets.MNIST(root=mnist_root, train=True, download=False, transform=spec_transform)
    images, labels = quest.load_mnist(mnist_root, train=True, device=torch.device("cpu"))
    assert images.shape == (512, 1, 28, 28)
    for i in (0, 1, 255, 511):
        image, label = dataset[i]
        torch.testing.assert_close(images[i], image)
        assert labels[i].item() == label


def test_distillation_loss_uses_batchmean_kl_and_alpha(quest):
    torch.manual_seed(0)
    student, teacher, labels, T = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,)), 5.0
    p = F.softmax(teacher / T, dim=1)
    kl_per_example = (p * (p.log() - F.log_softmax(student / T, dim=1))).sum(dim=1)
    expected_soft = T * T * kl_per_example.mean()  # batchmean: sum over classes, mean over the batch
    torch.testing.assert_close(quest.distillation_loss(student, teacher, labels, T, alpha=1.0), expected_soft)
    torch.testing.assert_close(quest.distillation_loss(student, teacher, labels, T, alpha=0.0), F.cross_entropy(student, labels))
    assert quest.distillation_loss(teacher, teacher, labels, T, alpha=1.0).abs() < 1e-5  # nothing left to learn
    # --distil-on correct: where the teacher's top class is wrong, that example learns from its label alone
    half_right = torch.where(torch.arange(8) < 4, teacher.argmax(1), (teacher.argmax(1) + 1) % 10)
    ce = F.cross_entropy(student, half_right, reduction="none")
    expected = torch.cat([0.3 * T * T * kl_per_example[:4] + 0.7 * ce[:4], ce[4:]]).mean()
    torch.testing.assert_close(quest.distillation_loss(student, teacher, half_right, T, 0.3, only_correct=True), expected)
    labels_right = teacher.argmax(1)  # a teacher that is right everywhere: the plain loss
    torch.testing.assert_close(quest.distillation_loss(student, teacher, labels_right, T, 0.3, only_correct=True),
                               quest.distillation_loss(student, teacher, labels_right, T, 0.3))


def test_frozen_teacher_gets_no_gradient_even_when_run_inside_the_step(quest):
    teacher, student = quest.TeacherModel(), quest.StudentModel()
    teacher.eval().requires_grad_(False)  # what main() does before distilling
    images, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    quest.distillation_loss(student(images), teacher(images), labels, 5.0, 0.9).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_cuda_requested_without_cuda_fails_cleanly(mnist_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_clean_failure(run_script(SCRIPT, "--data-dir", mnist_root, "--device", "cuda", cwd=tmp_path), "cuda", "--device cpu")


def test_unreachable_download_fails_cleanly_without_writing_models(tmp_path):
    proc = run_script(SCRIPT, "--data-dir", tmp_path / "empty", "--device", "cpu", "--save-dir", tmp_path / "models", cwd=tmp_path)
    assert_clean_failure(proc, "MNIST", "could not be downloaded", "--data-dir")
    assert not (tmp_path / "models").exists()  # checked before the data, created only at the first write


@pytest.mark.parametrize("flags, words", [
    (("--alpha", "1.5"), ("--alpha", "[0, 1]")),
    (("--alpha", "nan"), ("--alpha", "nan")),
    (("--temperature", "0"), ("--temperature", "above 0")),
    (("--temperature", "inf"), ("--temperature", "finite")),  # issue 9: was blamed on --lr
    (("--lr", "nan"), ("--lr", "finite")),
    (("--lr", "-0.01"), ("--lr", "above 0")),
    (("--teacher-epochs", "0"), ("--teacher-epochs", ">= 1")),
    (("--steps-per-epoch", "1.5"), ("--steps-per-epoch", "whole number")),
    (("--warmup-steps", "-1"), ("--warmup-steps", "0 switches it off")),
    (("--teacher-ema", "1"), ("--teacher-ema", "[0, 1)")),
    (("--device", "tpu"), ("--device", "invalid choice")),
])
def test_bad_settings_are_refused_in_one_line_before_any_work(flags, words, quest):
    # In-process: the parser is the script's own OneLineParser, so this is the exit a user sees.
    with pytest.raises(SystemExit) as exit_info:
        quest.parse_args(list(flags))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "usage" not in message
    for word in words:
        assert word in message, message


def test_one_bad_flag_is_one_stderr_line_and_no_usage_dump(tmp_path):
    assert_clean_failure(run_script(SCRIPT, "--temperature", "inf", cwd=tmp_path), "--temperature", "finite")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, words", [("under-a-file", ("under the file", "not a folder")),
                                          ("proc", ("not writable",))])
def test_unwritable_save_dir_is_refused_before_the_data_is_touched(where, words, tmp_path):
    (tmp_path / "a-file").write_text("x")
    save_dir = tmp_path / "a-file" / "models" if where == "under-a-file" else "/proc/quest-13-2-models"
    # --data-dir is empty: had the data come first, the line would be about the download
    proc = run_script(SCRIPT, "--data-dir", tmp_path / "no-data", "--device", "cpu", "--save-dir", save_dir, cwd=tmp_path)
    assert_clean_failure(proc, "--save-dir", *words)
    assert not (tmp_path / "no-data").exists()


def test_save_dir_that_is_a_file_is_refused(tmp_path, quest):
    (tmp_path / "models").write_text("x")
    with pytest.raises(SystemExit, match="--save-dir .* is a file, not a folder"):
        quest.main(["--data-dir", str(tmp_path / "no-data"), "--save-dir", str(tmp_path / "models")])


def corrupt(raw, kind):
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if kind == "wrong-magic":  # e.g. a gzip file saved without its .gz
        images.write_bytes(b"\x1f\x8b\x08\x00" + images.read_bytes()[4:])
        return images
    if kind == "truncated-images":
        images.write_bytes(images.read_bytes()[:5000])
        return images
    if kind == "empty-labels":
        labels.write_bytes(b"")
        return labels
    if kind == "too-few-labels":  # a valid IDX file, but 100 labels for 512 images
        data = labels.read_bytes()
        labels.write_bytes(data[:4] + (100).to_bytes(4, "big") + data[8:108])
        return labels
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["wrong-magic", "truncated-images", "empty-labels", "too-few-labels"])
def test_corrupt_mnist_file_is_called_corrupt_by_name(kind, tmp_path, quest):
    root = write_mnist_subset(tmp_path / "data", 512, 256)
    bad = corrupt(root / "MNIST" / "raw", kind)
    with pytest.raises(SystemExit) as exit_info:
        quest.load_mnist(root, train=True, device=torch.device("cpu"))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert str(bad) in message and "corrupt" in message and "--data-dir" in message


def test_corrupt_mnist_file_ends_the_script_in_one_line(tmp_path):
    root = write_mnist_subset(tmp_path / "data", 512, 256)
    bad = corrupt(root / "MNIST" / "raw", "wrong-magic")
    proc = run_script(SCRIPT, "--data-dir", root, "--device", "cpu", "--save-dir", tmp_path / "models", cwd=tmp_path)
    assert_clean_failure(proc, "corrupt", bad.name)
    assert not (tmp_path / "models").exists()


def test_divergence_stops_naming_lr_and_keeps_earlier_models(mnist_root, tmp_path, cpu_run):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("teacher.pt", "student.pt"):  # a good earlier run's files
        models.joinpath(name).write_bytes((cpu_run[1] / "models" / name).read_bytes())
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    proc = run_script(SCRIPT, "--data-dir", mnist_root, "--device", "cpu", "--lr", "1e30", "--save-dir", models, *TINY,
                      cwd=tmp_path)
    assert_clean_failure(proc, "diverged", "--lr")
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    assert "{" not in proc.stdout  # no JSON line (and so no NaN in one)


def test_ctrl_c_ends_in_one_line_with_exit_130_and_keeps_earlier_models(mnist_root, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    models.joinpath("teacher.pt").write_bytes(b"an earlier teacher")
    proc = interrupt_script(SCRIPT, "--data-dir", mnist_root, "--device", "cpu", "--teacher-epochs", "500",
                            "--save-dir", models, *TINY, ready="teacher ", cwd=tmp_path)  # its first epoch line
    assert proc.returncode == 130, proc.stderr
    assert_clean_failure(proc, "interrupted")
    assert sorted(p.name for p in models.iterdir()) == ["teacher.pt"]
    assert models.joinpath("teacher.pt").read_bytes() == b"an earlier teacher"


def test_full_disk_leaves_the_earlier_teacher_whole_and_no_temp_file(mnist_root, tmp_path, quest, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    models.joinpath("teacher.pt").write_bytes(b"an earlier teacher")

    monkeypatch.setattr(quest, "open", FullDiskFile, raising=False)  # the script's own writes only
    with pytest.raises(SystemExit) as exit_info:
        quest.main(["--data-dir", str(mnist_root), "--device", "cpu", "--no-baseline", "--save-dir", str(models), *TINY])
    message = str(exit_info.value.code)
    assert "disk is full" in message and "teacher.pt" in message and "\n" not in message
    assert sorted(p.name for p in models.iterdir()) == ["teacher.pt"]  # no temp file, no student.pt
    assert models.joinpath("teacher.pt").read_bytes() == b"an earlier teacher"


def test_every_lever_runs_and_the_baseline_sees_the_same_views(mnist_root, tmp_path, quest):
    # Steps-per-epoch stream, augmented views with the teacher run in the step, EMA teacher, logits matching, ramp.
    result = result_json(run_script(SCRIPT, "--data-dir", mnist_root, "--device", "cpu", "--steps-per-epoch", "6",
                                    "--augment", "all", "--teacher-targets", "consistent", "--teacher-ema", "0.9",
                                    "--match", "logits", "--alpha-schedule", "ramp", "--distil-on", "correct", *TINY, cwd=tmp_path))
    assert result["stepsPerEpoch"] == 6 and result["teacherUnchanged"] is True
    assert (result["augment"], result["match"], result["teacherEma"]) == ("all", "logits", 0.9)
    for key in ("teacherAccuracy", "studentAccuracy", "baselineAccuracy"):
        assert 0.0 <= result[key] <= 1.0
    # Views: the same seed gives the same views (what makes the baseline comparison fair), a new draw differs,
    # and the border that comes in from outside the image is black, as MNIST's background.
    images, _ = quest.load_mnist(mnist_root, train=True, device=torch.device("cpu"))
    batch = images[:16]
    first = quest.random_views(batch, torch.Generator().manual_seed(3))
    again = quest.random_views(batch, torch.Generator().manual_seed(3))
    other = quest.random_views(batch, torch.Generator().manual_seed(4))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    black = -quest.MNIST_MEAN / quest.MNIST_STD
    assert first[:, :, 0, 0].sub(black).abs().max() < 1e-4 and first.min() > black - 1e-4


def test_spec_epoch_is_one_pass_and_steps_per_epoch_streams_full_batches(quest):
    args = quest.parse_args(["--batch-size", "64"])
    assert quest.steps_per_epoch(4000, args) == 63  # the spec: 62 full batches and one of 32
    args = quest.parse_args(["--steps-per-epoch", "938"])
    assert quest.steps_per_epoch(4000, args) == 938
