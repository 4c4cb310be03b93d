"""Calibration reads each layer's inputs and outputs on all batches in one forward pass per model (``Frontier``),
with the same values as running the model again from its inputs (``Replay``), and samples design rows that
reproduce the conv they are drawn for."""

import pytest
import torch
import torchvision
from torch import nn

import ghostify
from ghostify.init import activations as activations_module
from ghostify.init.activations import Frontier, Replay, activations
from ghostify.init.calibrate import _design, taps_last


def _batches(count=3, size=32):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, size, size, generator=generator),) for _ in range(count)]


def _hooked(model, module, batches, output):
    """Independent truth: the value at ``module`` from one plain forward pass per batch."""
    seen = []
    hook = (module.register_forward_hook(lambda m, a, out: seen.append(out.clone())) if output
            else module.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())))
    with torch.no_grad():
        for inputs in batches:
            model(*inputs)
    hook.remove()
    return seen


@pytest.mark.parametrize("reader", [Frontier, Replay])
def test_values_match_a_plain_forward_and_see_weight_changes(reader):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    batches = _batches()
    source = reader(model, batches)
    with torch.no_grad():
        for path in ("layer1.0.conv1", "layer2.0.downsample.0", "layer3.1.conv2"):
            module = model.get_submodule(path)
            for got, want in zip(source.input_of(module), _hooked(model, module, batches, output=False)):
                torch.testing.assert_close(got, want)
            module.weight.mul_(-0.5)  # a refit: the layers after it must see the new weights
            for got, want in zip(source.output_of(module), _hooked(model, module, batches, output=True)):
                torch.testing.assert_close(got, want)
        head = source.output_of(model.fc)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(head), model(torch.cat([b[0] for b in batches])))


def test_frontier_refuses_requests_out_of_run_order():
    model = torchvision.models.resnet18().eval()
    source = Frontier(model, _batches(1))
    with torch.no_grad():
        source.output_of(model.layer2[0].conv1)
        with pytest.raises(RuntimeError, match="run order"):
            source.input_of(model.layer1[0].conv1)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.conv(x)


def test_untraceable_model_is_replayed():
    assert isinstance(activations(_Untraceable(), _batches(1)), Replay)
    assert isinstance(activations(torchvision.models.resnet18(), _batches(1)), Frontier)


def test_calibrate_runs_each_model_once_per_batch(monkeypatch):
    """Linear in depth: the original's stem runs once per calibration batch (plus the analysis and the error
    pass), not once per converted layer."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(24, 3, 32, 32)
    calls = []
    model.conv1.register_forward_hook(lambda m, a, out: calls.append(len(a[0])) if m is model.conv1 else None)
    ghost = ghostify.convert(model, example_inputs=x[:1], init="calibrate", calibration_data=x,
                             calibration_samples=24)
    assert len(ghost.ghostify_result.replaced) > 10
    assert "4 versions" in ghost.ghostify_result.notes["mirror"]  # the inputs and 3 mirror images of each
    assert sum(calls) <= 4 * 24 + 16 + 4, calls  # one calibration pass, the error pass, and the one-image analyses


def test_frontier_and_replay_calibrate_the_same_model(monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(16, 3, 32, 32)
    results = []
    for reader in (Frontier, Replay):
        monkeypatch.setattr(activations_module, "Frontier", reader)
        ghost = ghostify.convert(model, example_inputs=x[:1], init="calibrate", calibration_data=x)
        results.append(ghost)
    for (name, a), (_, b) in zip(results[0].state_dict().items(), results[1].state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("dim, kernel, stride, dilation, padding, mode", [
    (2, 3, 1, 1, 1, "zeros"), (2, 3, 2, 2, 2, "zeros"), (2, (1, 5), (2, 1), 1, (0, 2), "reflect"),
    (1, 5, 2, 1, 2, "zeros"), (3, 3, 1, 1, 1, "circular"), (2, 4, 1, 1, "same", "zeros"),
    (2, 3, 1, 2, "same", "replicate")])
def test_design_rows_reproduce_the_conv(dim, kernel, stride, dilation, padding, mode):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1](4, 6, kernel, stride=stride, dilation=dilation,
                                                      padding=padding, padding_mode=mode, bias=False)
    x = torch.randn(3, 4, *[9] * dim)
    with torch.no_grad():
        y = conv(x)
        patches, targets = _design(conv, x, y, 50, torch.Generator().manual_seed(0))
    assert len(patches) == min(50, y[:, 0].numel())
    torch.testing.assert_close(patches @ taps_last(conv.weight).T, targets, atol=1e-5, rtol=1e-5)
