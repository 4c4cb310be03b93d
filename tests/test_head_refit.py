"""``calibrate`` also refits the linear head after the last Ghost module: the layers after it are what correct
the Ghost modules' remaining error, and nothing comes after the head. Checked on a constructed fit with a known
answer, on which layers count as the head, and on a trained model's held-out outputs."""

import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import ghostify
from ghostify.cli import main
from ghostify.init.calibrate import fit_linear, heads


def test_fit_linear_recovers_a_known_map_from_a_wrong_start():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 24, generator=generator)
    weight, bias = torch.randn(5, 24, generator=generator), torch.randn(5, generator=generator)
    linear = nn.Linear(24, 5)  # a different map: the fit must move it to the one that made y
    loss = fit_linear(linear, x, F.linear(x, weight, bias), generator)
    assert loss < 1e-3
    assert torch.allclose(linear.weight, weight, atol=0.05) and torch.allclose(linear.bias, bias, atol=0.05)


class Shared(nn.Module):
    """A linear layer between the convs, one run twice after them, and a two-layer head."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.inner, self.twice = nn.Linear(16, 16), nn.Linear(16, 16)
        self.hidden, self.out = nn.Linear(16, 32), nn.Linear(32, 4)
        if tie:  # another module holds out's weight: refitting it would change that one too
            self.spare = nn.Linear(32, 4)
            self.spare.weight = self.out.weight

    def forward(self, x):
        x = self.conv1(x)
        x = x * torch.sigmoid(self.inner(x.mean((2, 3))))[:, :, None, None]  # squeeze-and-excite style
        x = self.conv2(x).mean((2, 3))
        x = self.twice(self.twice(x))
        return self.out(torch.relu(self.hidden(x)))


def test_the_head_is_what_runs_once_after_the_last_ghost_module():
    model = ghostify.convert(Shared(), s=2, init="random", example_inputs=torch.randn(1, 3, 8, 8))
    assert heads(model, ["conv1", "conv2"], (torch.randn(1, 3, 8, 8),)) == ["hidden", "out"]
    assert heads(model, ["conv1"], (torch.randn(1, 3, 8, 8),)) == ["inner", "hidden", "out"]
    assert heads(model, [], (torch.randn(1, 3, 8, 8),)) == []
    tied = ghostify.convert(Shared(tie=True), s=2, init="random", example_inputs=torch.randn(1, 3, 8, 8))
    assert heads(tied, ["conv1", "conv2"], (torch.randn(1, 3, 8, 8),)) == ["hidden"]


def test_calibrate_refits_the_head_and_it_brings_held_out_outputs_closer(digits_model, calibrated_error):
    errors = {}
    for refit in (True, False):
        ghost, errors[refit] = calibrated_error(digits_model[1][:256], refit_head=refit)
        assert ("head" in ghost.ghostify_result.notes) == refit
        assert "14" in ghost.ghostify_result.notes.get("head", "14")  # the Linear classifier
    # on images it was not fitted on, the refitted head brings the logits clearly closer to the original's
    assert errors[True] < 0.8 * errors[False], errors


def test_cli_keeps_the_head_on_request_and_refuses_it_without_calibration(tmp_path, calibrated_notes):
    assert "fc" in calibrated_notes()["head"] and "head" not in calibrated_notes("--keep-head")
    result = CliRunner().invoke(main, ["convert", "resnet18", "--keep-head", "-o", str(tmp_path / "c.pt")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--keep-head is only used with --init calibrate or reconstruct, got --init copy" in result.stderr
    assert not (tmp_path / "c.pt").exists()
