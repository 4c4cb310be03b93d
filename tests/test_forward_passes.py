"""convert runs the model no more often than it needs: one analysis pass, whose traced graph and shapes every
later pass over the data flow reuses, and the two passes that measure each layer's error."""

import pytest
import torch
import torchvision

import ghostify


def test_copy_runs_the_model_three_times():
    """RegNet has grouped convs reading converted layers and residual streams: both channel passes (the grouped
    readers' group widths before the conversion, the coupled groups after it) walk the analysis's graph."""
    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf().eval()
    calls = []
    model.stem[0].register_forward_hook(lambda *_: calls.append(1))  # copied with the model: counts every copy
    ghost = ghostify.convert(model, example_inputs=torch.randn(1, 3, 64, 64))
    result = ghost.ghostify_result
    assert len(result.replaced) > 20 and not any(row.gather for row in result.replaced)
    assert len(calls) == 3  # the analysis, then the original and the converted model for the layer errors


def test_a_failing_model_reports_its_own_error_and_prints_nothing(capfd):
    with pytest.raises(ValueError, match=r"fails on inputs of shape \(1, 5, 16, 16\): RuntimeError: .*weight"):
        ghostify.convert(torchvision.models.resnet18(), example_inputs=torch.randn(1, 5, 16, 16))
    assert capfd.readouterr().err == ""
