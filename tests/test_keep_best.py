"""``finetune`` gives back the weights that measured best, the start's included: a run that takes the student
away from the teacher returns (and writes) what it was given; ``keep_best=False`` / ``--keep-last`` the last."""

import copy

import pytest
import torch
from click.testing import CliRunner

import ghostify
from ghostify.cli import main


def _agreement(a, b, x):
    with torch.no_grad():
        return (a.eval()(x).argmax(1) == b(x).argmax(1)).float().mean().item()


@pytest.fixture(scope="module")
def calibrated(digits_model):
    """The digits CNN calibrated at s=2: a student that starts in near-full agreement with its teacher."""
    teacher, x = digits_model
    return ghostify.convert(teacher, s=2, init="calibrate", calibration_data=x[:256], example_inputs=x[:1]), teacher, x


def _harmful(start, teacher, x, **options):
    """Two epochs at a step size that ruins the student."""
    return ghostify.finetune(copy.deepcopy(start), teacher, x[:256], epochs=2, lr=5.0, **options)


def test_a_run_that_only_takes_the_student_away_gives_back_the_start(calibrated):
    start, teacher, x = calibrated
    tuned = _harmful(start, teacher, x)
    history = tuned.ghostify_finetune
    assert history.kept == 0 and [row.epoch for row in history.epochs] == [0, 1, 2]
    assert history.epochs[0].agreement > 0.95 and max(row.agreement for row in history.epochs[1:]) < 0.9
    for name, value in start.state_dict().items():  # the start's weights, exactly
        torch.testing.assert_close(tuned.state_dict()[name], value, rtol=0, atol=0, msg=name)
    last = _harmful(start, teacher, x, keep_best=False)
    assert last.ghostify_finetune.kept == 2
    assert _agreement(last, teacher, x[-300:]) < 0.9 < _agreement(tuned, teacher, x[-300:])


def test_the_file_holds_the_kept_weights_also_after_resume(calibrated, tmp_path):
    start, teacher, x = calibrated
    out = str(tmp_path / "tuned.pt")
    _harmful(start, teacher, x, output=out)
    written = ghostify.load(out, model=copy.deepcopy(teacher))
    resumed = _harmful(start, teacher, x, output=out, resume=True)  # nothing left to run: the kept weights come back
    assert resumed.ghostify_finetune.kept == 0
    for name, value in start.state_dict().items():
        torch.testing.assert_close(written.state_dict()[name], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)
    last = _harmful(start, teacher, x, output=out, resume=True, keep_best=False)  # asked for the last epoch
    trained = torch.load(out + ".state.pt", weights_only=True)["student"]
    assert last.ghostify_finetune.kept == 2
    for name, value in last.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, equal_nan=True, msg=name)  # ruined: NaN


def test_cli_says_which_epoch_it_kept(tmp_path):
    torch.manual_seed(0)
    ghost, data = tmp_path / "ghost.pt", tmp_path / "data.pt"
    torch.save(torch.randn(16, 3, 16, 16), data)
    made = CliRunner().invoke(main, ["convert", "resnet18", "--input-size", "3", "16", "16", "-o", str(ghost)])
    assert made.exit_code == 0, made.stderr
    args = ["finetune", str(ghost), "--teacher", "resnet18", "--data", str(data), "--batch-size", "8"]
    for flags, name in (([], "a.pt"), (["--keep-last"], "b.pt")):
        done = CliRunner().invoke(main, [*args, "--lr", "50", *flags, "-o", str(tmp_path / name)])
        assert done.exit_code == 0, done.stderr
        kept = torch.load(str(tmp_path / name) + ".state.pt", weights_only=True)["kept"]
        assert kept == 1 if flags else kept in (0, 1)
        said = "(the start: no epoch measured better" if kept == 0 else "(epoch 1;"
        assert "start agreement with the teacher" in done.stderr and said in done.stderr, done.stderr
