"""Counting and the report: fvcore totals cross-checked against torch's own flop counter, paper Table 6."""

import json
import os

import pytest
import torch
import torchvision
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

import ghostify
from ghostify.count import Counts
from ghostify.reporting import format_count, theoretical_ratio


def _torch_conv_and_linear_macs(model, x):
    """Multiply-adds of convolutions and matmuls by torch.utils.flop_counter (which counts 2 per multiply-add)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("vgg11", 64), ("mobilenet_v2", 96), ("googlenet", 64)])
def test_counts_agree_with_torch_flop_counter(name, size):
    model = torchvision.models.get_model(name)
    x = torch.randn(1, 3, size, size)
    ghost = ghostify.convert(model, example_inputs=x)
    summary = ghostify.report(model, ghost, (x,))
    assert summary.conv_flops_before == _torch_conv_and_linear_macs(model, x)
    assert summary.conv_flops_after == _torch_conv_and_linear_macs(ghost, x)
    assert summary.conv_flops_after < summary.conv_flops_before
    assert summary.flops_after < summary.flops_before


def test_counts_do_not_touch_training_flag_or_bn_stats():
    model = torchvision.models.resnet18().train()
    stats = model.bn1.running_mean.clone()
    assert Counts(model, (torch.randn(2, 3, 32, 32),)).flops > 0
    assert model.training and torch.equal(stats, model.bn1.running_mean)


def test_counts_follow_changes_to_the_model():
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    counts = Counts(model, (x,))
    before_flops, before_params = counts.conv_linear_flops, counts.params
    model.layer1[0].conv2 = ghostify.GhostModule.from_conv(model.layer1[0].conv2, s=2)
    assert counts.conv_linear_flops == _torch_conv_and_linear_macs(model, x) < before_flops
    assert counts.params == sum(p.numel() for p in model.parameters()) < before_params


@pytest.mark.parametrize("s, flops_paper, params_arithmetic", [(2, 2.2e9, 13.9e6), (4, 1.2e9, 8.1e6)])
def test_paper_table6_resnet50(s, flops_paper, params_arithmetic):
    """Ghost-ResNet-50 FLOPs within 5% of paper Table 6; params against the reference code's arithmetic."""
    model = torchvision.models.resnet50()
    summary = ghostify.report(model, ghostify.convert(model, s=s, d=3))
    assert summary.flops_before == pytest.approx(4.1e9, rel=0.05)
    assert summary.params_before == pytest.approx(25.6e6, rel=0.05)
    assert summary.flops_after == pytest.approx(flops_paper, rel=0.05)
    assert summary.params_after == pytest.approx(params_arithmetic, rel=0.05)


def test_report_rows_dict_and_rendering():
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    summary = ghostify.report(model, ghostify.convert(model, s=2, d=3, example_inputs=x), name="resnet18")
    data = json.loads(json.dumps(summary.to_dict()))
    for key in ("flops_before", "flops_after", "params_before", "params_after", "layers", "skipped",
                "conv_flops_before", "conv_flops_after"):
        assert key in data
    assert data["flops_after"] < data["flops_before"]
    assert [row["name"] for row in data["skipped"]] == ["conv1"]
    row = next(r for r in summary.layers if r.name == "layer4.1.conv2")
    assert row.output_shape == (1, 512, 2, 2)
    assert row.flops_before == 512 * 512 * 9 * 2 * 2 + Counts(model, (x,)).module_flops("layer4.1.bn2")  # + its BN
    assert row.ratio == pytest.approx(row.flops_before / row.flops_after)
    assert row.theoretical_ratio == pytest.approx(theoretical_ratio(512, (3, 3), 2, 3, (3, 3)))
    console = Console(width=200, record=True)
    console.print(summary)
    text = console.export_text()
    assert "layer4.1.conv2" in text and "multiply-adds" in text and "stem conv" in text
    assert "19 layers replaced" in text


def test_one_layer_replaced_is_said_in_the_singular():
    model = torchvision.models.resnet18()
    ghost = ghostify.convert(model, include="layer4.1.conv2", example_inputs=torch.randn(1, 3, 32, 32))
    console = Console(width=200, record=True)
    console.print(ghostify.report(model, ghost))
    assert "1 layer replaced" in console.export_text()


def test_theoretical_ratio_is_paper_eq4():
    c, k, s, d = 256, (3, 3), 2, 3
    assert theoretical_ratio(c, k, s, d, k) == pytest.approx(c * 9 / (c * 9 / s + (s - 1) * 9 / s))
    assert theoretical_ratio(1024, (1, 1), 4, 1, (1, 1)) == pytest.approx(4 * 1024 / (4 + 1024 - 1))


@pytest.mark.parametrize("value, text", [(4_111_512_576, "4.11G"), (25_557_032, "25.56M"), (9_200, "9.20K"),
                                         (12, "12"), (None, "-")])
def test_format_count(value, text):
    assert format_count(value) == text


def test_layer_row_counts_the_norm_its_ghost_module_took_in():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    ghost = ghostify.convert(model, example_inputs=x, init="random")
    row = next(r for r in ghostify.report(model, ghost, (x,)).layers if r.name == "layer1.0.conv1")
    counts = Counts(model, (x,))
    assert row.original.endswith("+ BN")
    assert row.flops_before == counts.module_flops("layer1.0.conv1") + counts.module_flops("layer1.0.bn1")
    assert row.params_before == 64 * 64 * 9 + 2 * 64


@pytest.mark.parametrize("width", [80, 100])
def test_layer_table_fits_a_narrow_terminal_without_losing_numbers(width):
    model = torchvision.models.resnet50()
    x = torch.randn(1, 3, 32, 32)
    summary = ghostify.report(model, ghostify.convert(model, example_inputs=x), (x,), name="resnet50")
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    console.print(summary)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= width
    assert not any("…" in line for line in lines)
    table = "\n".join(lines)
    for row in summary.layers:  # every layer with its measured ratio and FLOPs after, on one line
        line = next(line for line in lines if f" {row.name} " in line)
        assert f"{row.ratio:.2f}x" in line and format_count(row.flops_after) in line, line
    assert "columns left out to fit" in table


class _Detector(torch.nn.Module):
    """Called with a list of images, as torchvision's detection models are."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])

    def forward(self, images):
        return self.body(torch.stack(images))


def test_report_counts_a_model_called_with_a_list_of_images():
    torch.manual_seed(0)
    model = _Detector().eval()
    images = [torch.randn(3, 64, 64)]
    ghost = ghostify.convert(model, example_inputs=(images,))
    summary = ghostify.report(model, ghost, (images,))
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(summary)
    assert summary.input_shapes == [None] and "input (not a tensor)" in console.export_text()
    stacked = (torch.stack(images),)  # the same counts, on the body called with a tensor
    assert summary.flops_before == Counts(model.body, stacked).flops
    assert summary.flops_after == Counts(ghost.body, stacked).flops < summary.flops_before


def test_a_conversion_that_replaced_nothing_is_counted_once(monkeypatch):
    """ViT's only conv is its stem: the converted copy has the original's structure, so the report traces one
    model, and its counts are the original's; a real conversion is traced on its own."""
    traced = []
    analyse = Counts._analyse
    monkeypatch.setattr(Counts, "_analyse", lambda self: traced.append(self.model) or analyse(self))
    x = torch.randn(1, 3, 32, 32)
    model = torchvision.models.VisionTransformer(32, 16, 2, 2, 32, 64, num_classes=10).eval()
    unchanged = ghostify.convert(model, example_inputs=x)
    summary = ghostify.report(model, unchanged, (x,))
    assert traced == [model]
    assert (summary.flops_after, summary.params_after) == (summary.flops_before, summary.params_before)
    assert summary.flops_after == Counts(unchanged, (x,)).flops
    traced.clear()
    resnet = torchvision.models.resnet18().eval()
    summary = ghostify.report(resnet, ghostify.convert(resnet, example_inputs=x), (x,))
    assert len(traced) == 2 and summary.flops_after < summary.flops_before
