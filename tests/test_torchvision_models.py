"""Every torchvision classification model converts, keeps its output shape, and gets cheaper.

All models are checked at 224x224 on the meta device (shapes and torch's own flop counter, no memory or
compute), so even the 600M-parameter ones run in CI; a model per family is also run for real and counted by
the report. A detection model, which symbolic tracing cannot handle, goes through the hook fallback.
"""

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import ghostify

NAMES = torchvision.models.list_models(module=torchvision.models)


def _build_on_meta(name):
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name).eval()
    except NotImplementedError:  # builders that compute widths with tensor ops (RegNet) need real tensors
        return torchvision.models.get_model(name).to("meta").eval()


def _macs_and_shape(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(x)
    return counter.get_total_flops() // 2, out.shape


@pytest.mark.filterwarnings("ignore:init='copy' skipped")  # on the meta device; tested below
@pytest.mark.parametrize("name", NAMES)
def test_every_torchvision_model_converts(name):
    model = _build_on_meta(name)
    x = torch.empty(1, 3, 224, 224, device="meta")
    ghost = ghostify.convert(model, example_inputs=x).eval()
    result = ghost.ghostify_result
    macs_before, shape_before = _macs_and_shape(model, x)
    macs_after, shape_after = _macs_and_shape(ghost, x)
    assert shape_after == shape_before
    dense_beyond_stem = [s for s in result.skipped if "stem" not in s.reason and "depthwise" not in s.reason
                         and "grouped" not in s.reason and s.kind == "Conv2d"]
    if result.replaced:
        assert macs_after < macs_before
    else:  # e.g. ViT and Swin: the only conv is the patch-embedding stem, and the report says so
        assert macs_after == macs_before and not dense_beyond_stem
        assert any("stem" in s.reason for s in result.skipped)


FAMILIES = [("alexnet", 64), ("vgg11_bn", 32), ("resnet18", 64), ("resnext50_32x4d", 64), ("densenet121", 64),
            ("googlenet", 64), ("inception_v3", 96), ("mobilenet_v3_small", 64), ("mnasnet0_5", 64),
            ("efficientnet_b0", 64), ("shufflenet_v2_x0_5", 64), ("squeezenet1_1", 64), ("regnet_x_400mf", 64),
            ("convnext_tiny", 64), ("swin_t", 64)]


@pytest.mark.parametrize("name, size", FAMILIES)
def test_family_runs_for_real_and_report_counts(name, size):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(2, 3, size, size)
    ghost = ghostify.convert(model, example_inputs=x).eval()
    with torch.no_grad():
        assert ghost(x).shape == model(x).shape
    summary = ghostify.report(model, ghost, (x[:1],))
    if ghost.ghostify_result.replaced:
        assert summary.flops_after < summary.flops_before and summary.params_after < summary.params_before
    else:
        assert (summary.flops_after, summary.params_after) == (summary.flops_before, summary.params_before)
    assert len(summary.layers) == len(ghost.ghostify_result.replaced)


def test_detection_model_uses_hook_fallback():
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None, num_classes=3).eval()
    x = [torch.rand(3, 160, 160)]
    ghost = ghostify.convert(model, example_inputs=(x,)).eval()
    assert ghost.ghostify_result.method == "hooks"
    assert ghost.ghostify_result.replaced
    with torch.no_grad():
        out, ref = ghost(x), model(x)
    assert type(ghost) is type(model) and out[0].keys() == ref[0].keys()


def test_detection_model_called_with_a_bare_list_says_how_to_pass_it():
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None, num_classes=3).eval()
    with pytest.raises(ValueError, match=r"wrap it: example_inputs=\(\[image\],\)"):
        ghostify.convert(model, example_inputs=[torch.rand(3, 160, 160)])


def test_meta_device_conversion_says_init_was_skipped():
    model = _build_on_meta("resnet18")
    with pytest.warns(UserWarning, match="init='copy' skipped: the weights are on the meta device"):
        ghost = ghostify.convert(model, example_inputs=torch.empty(1, 3, 64, 64, device="meta"))
    assert "meta device" in ghost.ghostify_result.notes["init"]
    assert all(row.error is None for row in ghost.ghostify_result.replaced)
