"""quest_13_2.py (knowledge distillation): run it as a user would, on a few hundred real digits."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_clean_failure, import_script, result_json, run_script

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


def check_result(result, device):
    assert result["status"] == "success" and result["message"]
    assert math.isfinite(result["finalLoss"]) and result["finalLoss"] > 0
    for key in ("teacherAccuracy", "studentAccuracy", "baselineAccuracy"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert result["distillationGain"] == pytest.approx(result["studentAccuracy"] - result["baselineAccuracy"], abs=1e-6)
    assert result["teacherParams"] > 10 * result["studentParams"] > 0
    assert result["teacherSizeKB"] > result["studentSizeKB"] > 0
    assert result["studentSpeedup"] > 0
    assert (result["temperature"], result["alpha"]) == (5.0, 0.5)
    assert result["device"].startswith(device)
    # The frozen teacher: weights bit-identical before/after distillation and not one .grad on it.
    assert result["teacherUnchanged"] is True


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_run_reports_all_three_models(device, mnist_root, tmp_path, cpu_run):
    proc, cwd = cpu_run if device == "cpu" else (run_script(SCRIPT, "--data-dir", mnist_root, "--device", device, *TINY,
                                                            cwd=tmp_path), tmp_path)
    check_result(result_json(proc), device)
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
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("flags, words", [
    (("--alpha", "1.5"), ("--alpha", "between 0 and 1")),
    (("--temperature", "0"), ("--temperature", "positive")),
    (("--teacher-epochs", "0"), ("--teacher-epochs", "at least 1")),
    (("--warmup-steps", "-1"), ("--warmup-steps", "negative")),
])
def test_bad_settings_are_refused_before_any_work(flags, words, quest):
    # Checked in-process (the exit path is the same sys.exit as the subprocess failures above).
    with pytest.raises(SystemExit) as exit_info:
        quest.check_args(quest.parse_args(list(flags)))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    for word in words:
        assert word in message
