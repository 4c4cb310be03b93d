"""``init="reconstruct"``: blocks found from the module tree, each tuned on its output error against the
original's same block; never worse than ``calibrate`` on the block, and kept only if the model's output got
closer on held-out inputs."""

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import ghostify
import ghostify.init as init_package
from ghostify.cli import main
from ghostify.init import blockwise
from ghostify.init.blockwise import find_blocks
from ghostify.init.measure import record


def _converted(name, **kwargs):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **kwargs).eval()
    ghost = ghostify.convert(model, example_inputs=torch.randn(1, 3, 32, 32), init="random")
    return model, ghost, [row.name for row in ghost.ghostify_result.replaced]


def test_blocks_follow_the_module_tree():
    _, ghost, layers = _converted("resnet50")
    blocks = find_blocks(ghost, layers, (torch.randn(1, 3, 32, 32),))
    # a stage holds more than MAX_LAYERS converted convs, a bottleneck (3 or 4) does not
    assert blocks == [f"layer{i}.{j}" for i, depth in enumerate((3, 4, 6, 3), 1) for j in range(depth)]
    _, ghost, layers = _converted("resnet18")
    assert find_blocks(ghost, layers, (torch.randn(1, 3, 32, 32),)) == ["layer1", "layer2", "layer3", "layer4"]


def test_a_layer_without_a_block_is_its_own():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), *[nn.Conv2d(8, 8, 3, padding=1) for _ in range(9)])
    ghost = ghostify.convert(model, example_inputs=torch.randn(1, 3, 16, 16), init="random")
    layers = [row.name for row in ghost.ghostify_result.replaced]
    assert find_blocks(ghost, layers, (torch.randn(1, 3, 16, 16),)) == layers  # the root is never a block


def _block_errors(model, ghost, x):
    """Relative error of each converted layer's output on ``x`` against the original's at the same point (the
    norm the Ghost module took in), each converted channel against the original channel it stands for."""
    rows = ghost.ghostify_result.replaced
    ours, theirs = {}, {}
    record(ghost, [row.name for row in rows], lambda name, out: ours.__setitem__(name, out.clone()), [(x,)])
    record(model, [row.norm or row.name for row in rows], lambda name, out: theirs.__setitem__(name, out.clone()),
           [(x,)])
    errors = []
    for row in rows:
        expected = theirs[row.norm or row.name][:, row.order]
        errors.append(((ours[row.name] - expected).norm() / expected.norm()).item())
    return errors


def test_block_tuning_lowers_every_blocks_held_out_error_below_calibrate(digits_model, monkeypatch):
    model, x = digits_model
    calibration, held_out = x[:256], x[-300:]
    measured = iter([1.0, 0.5])  # the model's output error "fell": the tuned blocks stay, to be measured
    monkeypatch.setattr(init_package, "output_error", lambda *args: next(measured))
    errors = {}
    for init in ("calibrate", "reconstruct"):
        ghost = ghostify.convert(model, s=4, example_inputs=calibration[:1], init=init, calibration_data=calibration)
        errors[init] = _block_errors(model, ghost, held_out)
    # each layer is its own block here: the model is one Sequential, and a Ghost module that took in its batch
    # norm is matched to that norm's output
    assert len(errors["calibrate"]) == 3
    assert all(r < 0.95 * c for r, c in zip(errors["reconstruct"], errors["calibrate"])), errors
    assert "3 of 3 improved" in ghost.ghostify_result.notes["reconstruct"]


@pytest.mark.parametrize("better", [True, False])
def test_reconstruct_keeps_its_result_only_if_the_held_out_output_error_fell(digits_model, monkeypatch, better):
    model, x = digits_model
    calibrated = ghostify.convert(model, s=4, example_inputs=x[:1], init="calibrate", calibration_data=x[:128])
    errors = iter([0.5, 0.25] if better else [0.5, 0.75])  # the model's output error before and after
    monkeypatch.setattr(init_package, "output_error", lambda *args: next(errors))
    tuned = ghostify.convert(model, s=4, example_inputs=x[:1], init="reconstruct", calibration_data=x[:128])
    note = tuned.ghostify_result.notes["reconstruct"]
    assert "3 of 3 improved" in note and "0.5000 -> " in note
    assert ("calibrated weights kept" in note) != better
    same = all(torch.equal(a, b) for a, b in zip(calibrated.state_dict().values(), tuned.state_dict().values()))
    assert same != better


def test_a_block_that_gets_worse_keeps_its_calibrated_weights(digits_model, monkeypatch):
    model, x = digits_model
    calibrated = ghostify.convert(model, s=4, example_inputs=x[:1], init="calibrate", calibration_data=x[:128])
    monkeypatch.setattr(blockwise, "LR", 10.0)  # steps that can only make things worse
    tuned = ghostify.convert(model, s=4, example_inputs=x[:1], init="reconstruct", calibration_data=x[:128],
                             reconstruct_steps=5)
    assert "0 of 3 improved" in tuned.ghostify_result.notes["reconstruct"]
    for (name, a), (_, b) in zip(calibrated.state_dict().items(), tuned.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_the_keep_decision_is_made_on_inputs_the_tuning_did_not_see():
    """The last fifth of the inputs wants the opposite map from the rest: tuning on the rest lowers the error
    over all inputs, but raises it on that fifth, so the weights go back."""
    torch.manual_seed(0)
    block = nn.Linear(4, 4, bias=False)
    x = torch.randn(50, 4)
    y = torch.cat([x[:40] @ torch.eye(4) * 2, x[40:] @ torch.eye(4) * -2])
    with torch.no_grad():
        block.weight.zero_()
    before, after = blockwise._tune(block, x, y, steps=200, deadline=None, generator=torch.Generator())
    assert after == before and torch.equal(block.weight, torch.zeros(4, 4))
    blockwise._tune(block, x[:40], y[:40], steps=200, deadline=None, generator=torch.Generator())  # consistent
    assert not torch.equal(block.weight, torch.zeros(4, 4)) and block.weight.grad is None


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_qdrop_mixing_takes_tuning_inputs_from_the_original_with_probability_mix(mix):
    """The converted model's inputs are all -1, the original's all +1: the share of +1 among the elements the
    block is tuned on is ``mix``; the held-out check still reads the converted inputs only."""
    block = nn.Linear(4, 4)
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()) if torch.is_grad_enabled()
                                    else None)
    x, clean = -torch.ones(50, 4), torch.ones(50, 4)
    blockwise._tune(block, x, torch.randn(50, 4), steps=40, deadline=None, generator=torch.Generator(),
                    original=clean, mix=mix)
    share = (torch.cat(seen) > 0).float().mean().item()
    assert abs(share - mix) < 0.05, share


def test_mix_is_a_probability(digits_model):
    model, x = digits_model
    with pytest.raises(ValueError, match=r"reconstruct_mix is a probability in \[0, 1\], got 1.5"):
        ghostify.convert(model, init="reconstruct", calibration_data=x[:16], reconstruct_mix=1.5)


def test_the_network_stage_brings_held_out_outputs_closer(digits_model):
    model, x = digits_model
    calibration, held_out = x[:256], x[-300:]
    with torch.no_grad():
        expected = model(held_out)
    errors = {}
    for network in (False, True):
        ghost = ghostify.convert(model, s=4, example_inputs=calibration[:1], init="reconstruct",
                                 calibration_data=calibration, reconstruct_network=network)
        with torch.no_grad():
            errors[network] = ((ghost(held_out) - expected).norm() / expected.norm()).item()
        assert ("the whole network on its output" in ghost.ghostify_result.notes["reconstruct"]) == network
    assert errors[True] < 0.95 * errors[False], errors  # measured 0.905 (1 thread), under 0.9 (2)
    assert all(p.grad is None for p in ghost.parameters())


def test_a_spent_time_budget_leaves_the_calibrated_weights(digits_model):
    model, x = digits_model
    calibrated = ghostify.convert(model, s=4, example_inputs=x[:1], init="calibrate", calibration_data=x[:128])
    tuned = ghostify.convert(model, s=4, example_inputs=x[:1], init="reconstruct", calibration_data=x[:128],
                             reconstruct_seconds=1e-9)
    for (name, a), (_, b) in zip(calibrated.state_dict().items(), tuned.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_cli_reconstruct_and_its_options(tmp_path):
    torch.save(torch.randn(16, 3, 32, 32), tmp_path / "calib.pt")
    out = tmp_path / "g.pt"
    args = ["convert", "resnet18", "--input-size", "3", "32", "32", "--calib-data", str(tmp_path / "calib.pt")]
    result = CliRunner().invoke(main, [*args, "--init", "reconstruct", "--recon-steps", "3", "--recon-seconds", "60",
                                       "--recon-network", "--recon-mix", "0.5", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert any(line.startswith("reconstructing the whole network") and "[5/5, " in line
               for line in result.stderr.splitlines()), result.stderr  # 4 blocks, then the network
    assert "blocks tuned" in ghostify.load(out).ghostify_result.notes["reconstruct"]
    assert "the whole network" in ghostify.load(out).ghostify_result.notes["reconstruct"]
    result = CliRunner().invoke(main, [*args, "--init", "calibrate", "--recon-steps", "3", "-o", str(out), "--force"])
    assert result.exit_code != 0
    assert "--recon-steps is only used with --init reconstruct, got --init calibrate" in result.stderr
