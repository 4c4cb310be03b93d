"""``ghostify.finetune``: distillation from the original brings the converted model back to it, with or without
labels; checkpoints resume; the teacher is never changed; two CPU processes under torchrun train one model."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from click.testing import CliRunner

import ghostify
from ghostify.cli import main


@pytest.fixture(scope="module")
def converted(digits_model):
    model, x = digits_model
    return ghostify.convert(model, s=4, example_inputs=x[:1], align=1), model, x  # align=1: a true s = 4 start


def _agreement(a, b, x):
    with torch.no_grad():
        return (a(x).argmax(1) == b(x).argmax(1)).float().mean().item()


def test_distillation_without_labels_brings_predictions_back(converted):
    ghost, teacher, x = converted
    train, held_out = x[:1200], x[-300:]
    before = _agreement(ghost, teacher, held_out)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = ghostify.finetune(copy.deepcopy(ghost), teacher, train, epochs=3)
    after = _agreement(student.eval(), teacher, held_out)
    assert after > max(0.9, before + 0.2), (before, after)
    assert [row.epoch for row in student.ghostify_finetune.epochs] == [0, 1, 2, 3]  # 0: the start
    assert student.ghostify_finetune.epochs[-1].top1 is None  # no labels, no top-1
    assert student.ghostify_finetune.kept == 3  # each epoch agreed more: the last is kept
    assert not teacher.training
    assert all(p.requires_grad for p in teacher.parameters())  # frozen by no_grad, not by changing the model
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state[name], msg=name)


def test_labels_are_mixed_in_and_measured(converted, digits_model):
    from sklearn.datasets import load_digits

    ghost, teacher, x = converted
    y = torch.tensor(load_digits().target)
    student = ghostify.finetune(copy.deepcopy(ghost), teacher, (x[:1200], y[:1200]),
                                val_data=(x[-300:], y[-300:]), epochs=2)
    last = student.ghostify_finetune.epochs[-1]
    with torch.no_grad():
        expected = (student.eval()(x[-300:]).argmax(1) == y[-300:]).float().mean().item()
    assert last.top1 == pytest.approx(expected, abs=1e-6) and last.top1 > 0.6


class _Interrupted(torch.utils.data.Dataset):
    """Inputs that stop the run (as Ctrl-C does) after ``after`` reads."""

    def __init__(self, x, after):
        self.x, self.after, self.reads = x, after, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.after:
            raise KeyboardInterrupt
        return self.x[index]


def test_an_interrupted_run_resumes_where_its_last_epoch_ended(converted, tmp_path):
    ghost, teacher, x = converted
    out = str(tmp_path / "tuned.pt")
    with pytest.raises(KeyboardInterrupt):  # the start's measurement reads 256, epoch 1 256 + 256, epoch 2 stops
        ghostify.finetune(copy.deepcopy(ghost), teacher, _Interrupted(x[:256], 900), epochs=2, output=out)
    whole = ghostify.finetune(copy.deepcopy(ghost), teacher, x[:256], epochs=2)
    after_one = ghostify.load(out, model=teacher)
    assert not torch.equal(next(after_one.parameters()), next(ghost.parameters()))  # epoch 1 was written
    resumed = ghostify.finetune(copy.deepcopy(ghost), teacher, x[:256], epochs=2, output=out, resume=True)
    assert [row.epoch for row in resumed.ghostify_finetune.epochs] == [0, 1, 2]
    assert [row.agreement for row in resumed.ghostify_finetune.epochs] == \
        [row.agreement for row in whole.ghostify_finetune.epochs]
    for (name, a), (_, b) in zip(resumed.state_dict().items(), whole.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)  # the same as the run that was not interrupted
    for (name, a), (_, b) in zip(ghostify.load(out, model=teacher).state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_ema_is_returned(converted):
    ghost, teacher, x = converted
    student = copy.deepcopy(ghost)
    averaged = ghostify.finetune(student, teacher, x[:256], epochs=1, ema_decay=0.9)
    assert averaged is not student
    differs = [not torch.equal(a, b) for a, b in zip(averaged.parameters(), student.parameters())]
    assert any(differs)


def test_bad_settings_are_refused(converted):
    ghost, teacher, x = converted
    with pytest.raises(ValueError, match="epochs"):
        ghostify.finetune(ghost, teacher, x[:8], epochs=0)
    with pytest.raises(ValueError, match="resume needs output"):
        ghostify.finetune(ghost, teacher, x[:8], resume=True)
    with pytest.raises(TypeError, match="data must be"):
        ghostify.finetune(ghost, teacher, "images/")


def test_a_wrong_teacher_or_nothing_to_resume_is_refused_before_training(converted, tmp_path):
    ghost, teacher, x = converted
    before = copy.deepcopy(ghost.state_dict())
    other = copy.deepcopy(teacher)
    other[-1] = torch.nn.Linear(32, 3)  # another task's head
    with pytest.raises(ValueError, match=r"teacher's outputs \(\(1, 3\) for one sample\) are not shaped like the "
                                         r"student's \(\(1, 10\)\)"):
        ghostify.finetune(ghost, other, x[:8])
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        ghostify.finetune(ghost, teacher, x[:8], output=str(tmp_path / "tuned.pt"), resume=True)
    assert not any(tmp_path.iterdir())
    for name, value in ghost.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)


def test_cli_under_torchrun_with_two_processes(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "teacher.pth")
    torch.save(torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)), tmp_path / "data.pt")
    ghost, out = tmp_path / "ghost.pt", tmp_path / "tuned.pt"
    made = CliRunner().invoke(main, ["convert", "resnet18", "--weights", str(tmp_path / "teacher.pth"),
                                     "--input-size", "3", "16", "16", "-o", str(ghost)])
    assert made.exit_code == 0, made.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ghostify", "finetune", str(ghost), "--teacher", "resnet18", "--teacher-weights",
                           str(tmp_path / "teacher.pth"), "--data", str(tmp_path / "data.pt"), "--epochs", "2",
                           "--batch-size", "8", "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len([line for line in lines if line.startswith("epoch 2/2") and "[0/" in line]) == 1, lines  # rank 0
    assert len([line for line in lines if line.startswith("wrote ")]) == 1, lines
    state = torch.load(str(out) + ".state.pt", weights_only=True)
    assert state["epoch"] == 2
    kept = state["best"]  # the weights that measured best, which the file holds
    for name, value in ghostify.load(str(out)).state_dict().items():  # rebuilt from its recorded source
        torch.testing.assert_close(value, kept[name], msg=name)


@pytest.mark.parametrize("args, text", [
    (["resnet18", "--teacher", "resnet18", "--data", "{data}"], "is not a ghostify file"),
    (["{ghost}", "--teacher", "resnet18", "--data", "{missing}"], "no such data file or folder"),
    (["{ghost}", "--teacher", "resnet18", "--data", "{data}", "--label-weight", "2"], "label-weight"),
])
def test_cli_finetune_errors_are_one_line(tmp_path, args, text):
    torch.save(torch.randn(4, 3, 16, 16), tmp_path / "data.pt")
    ghost = tmp_path / "ghost.pt"
    CliRunner().invoke(main, ["convert", "resnet18", "--input-size", "3", "16", "16", "--init", "random", "-o",
                              str(ghost)])
    paths = {"data": tmp_path / "data.pt", "ghost": ghost, "missing": tmp_path / "none.pt"}
    result = CliRunner().invoke(main, ["finetune", *[a.format(**paths) for a in args], "-o", str(tmp_path / "o.pt")])
    assert result.exit_code != 0 and text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.pt").exists()


def test_cli_finetune_a_file_converted_from_a_python_object_with_arch(tmp_path):
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18()
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    torch.save(torch.randn(8, 3, 16, 16), tmp_path / "data.pt")
    ghostify.save(ghostify.convert(teacher, example_inputs=torch.randn(1, 3, 16, 16)), str(tmp_path / "g.pt"))
    args = ["finetune", str(tmp_path / "g.pt"), "--teacher", "resnet18", "--teacher-weights",
            str(tmp_path / "teacher.pth"), "--data", str(tmp_path / "data.pt"), "--batch-size", "4",
            "-o", str(tmp_path / "t.pt")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "converted from a Python object" in refused.stderr
    done = CliRunner().invoke(main, [*args, "--arch", "resnet18"])
    assert done.exit_code == 0, done.stderr
    tuned = ghostify.load(str(tmp_path / "t.pt"), model=torchvision.models.resnet18())
    assert not torch.equal(tuned.fc.weight, teacher.fc.weight)  # trained, and written as a ghostify file


def test_a_teacher_in_training_mode_is_used_in_eval_mode_and_given_back_unchanged(converted):
    ghost, model, x = converted
    teacher = copy.deepcopy(model).train()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    ghostify.finetune(copy.deepcopy(ghost), teacher, x[:128], epochs=1)
    assert all(module.training for module in teacher.modules())
    assert all(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # eval mode while distilling: no batch-norm updates
        torch.testing.assert_close(value, state[name], msg=name)


def test_the_default_learning_rate_follows_the_start(converted):
    """A student fitted on data starts close to the teacher and gets the smaller default step; an explicit lr
    wins; the lr used is recorded."""
    ghost, teacher, x = converted
    calibrated = ghostify.convert(teacher, s=4, init="calibrate", calibration_data=x[:64], example_inputs=x[:1])
    runs = {"copy": (ghost, {}), "calibrate": (calibrated, {}), "explicit": (calibrated, {"lr": 0.05})}
    used = {name: ghostify.finetune(copy.deepcopy(student), teacher, x[:64], **options).ghostify_finetune.lr
            for name, (student, options) in runs.items()}
    assert used == {"copy": 0.01, "calibrate": 0.001, "explicit": 0.05}
