"""The Ghost bottleneck (Fig. 3), its squeeze-and-excite module and the channel rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ghostify.models import GhostBottleneck, GhostNet, SqueezeExcite
from ghostify.models.ghostnet import GHOSTNET_CFGS, _make_divisible
from ghostify.module import GhostModule


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "in_channels, out_channels, stride, size_out",
    [(16, 16, 1, 20), (16, 24, 1, 20), (16, 24, 2, 10), (24, 24, 2, 10)],
)
def test_ghost_bottleneck_output_shape(in_channels: int, out_channels: int, stride: int, size_out: int) -> None:
    block = GhostBottleneck(in_channels, 48, out_channels, kernel_size=3, stride=stride).eval()
    with torch.no_grad():
        out = block(torch.randn(2, in_channels, 20, 20))
    assert out.shape == (2, out_channels, size_out, size_out)


def test_ghost_bottleneck_odd_input_stride2() -> None:
    block = GhostBottleneck(16, 48, 24, kernel_size=5, stride=2).eval()
    with torch.no_grad():
        assert block(torch.randn(1, 16, 15, 15)).shape == (1, 24, 8, 8)


def test_ghost_bottleneck_identity_shortcut_only_when_shape_kept() -> None:
    assert isinstance(GhostBottleneck(16, 48, 16).shortcut, nn.Identity)
    assert isinstance(GhostBottleneck(16, 48, 16).downsample, nn.Identity)
    for block in (GhostBottleneck(16, 48, 24), GhostBottleneck(16, 48, 16, stride=2)):
        depthwise, _, pointwise, _ = block.shortcut
        assert depthwise.groups == 16 and pointwise.kernel_size == (1, 1)


def test_ghost_bottleneck_ghost_modules_follow_paper() -> None:
    block = GhostBottleneck(16, 48, 24, stride=2)
    for ghost in (block.expand, block.project):
        assert isinstance(ghost, GhostModule)
        assert (ghost.s, ghost.d, ghost.primary_conv.kernel_size) == (2, 3, (1, 1))
        assert isinstance(ghost.primary[1], nn.BatchNorm2d)
    assert isinstance(block.expand.primary[-1], nn.ReLU)
    assert not any(isinstance(m, nn.ReLU) for m in block.project.modules())
    assert block.downsample[0].stride == (2, 2) and block.downsample[0].groups == 48


def test_ghost_bottleneck_bad_stride_raises() -> None:
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        GhostBottleneck(16, 48, 16, stride=3)


def test_ghost_bottleneck_se_on_off() -> None:
    plain, excited = GhostBottleneck(40, 120, 40), GhostBottleneck(40, 120, 40, se=True)
    assert isinstance(plain.se, nn.Identity)
    assert isinstance(excited.se, SqueezeExcite)
    assert _params(excited) - _params(plain) == _params(excited.se)
    with torch.no_grad():
        assert excited.eval()(torch.randn(1, 40, 7, 7)).shape == (1, 40, 7, 7)


def test_squeeze_excite_gate_scales_each_channel() -> None:
    se = SqueezeExcite(120).eval()
    assert se.reduce.out_channels == 32  # 120 / 4 = 30, rounded to a multiple of 4
    assert isinstance(se.gate, nn.Hardsigmoid)
    x = torch.rand(2, 120, 5, 5) + 0.1
    with torch.no_grad():
        ratio = se(x) / x
    assert ratio.min() >= 0 and ratio.max() <= 1
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio))


@pytest.mark.parametrize(
    "value, expected", [(16, 16), (8, 8), (30, 32), (1.3 * 16, 20), (0.5 * 72, 36), (2, 4), (8.8, 8), (9.9, 12)]
)
def test_make_divisible(value: float, expected: int) -> None:
    assert _make_divisible(value, 4) == expected


def test_ghostnet_follows_table_1() -> None:
    model = GhostNet()
    assert len(model.blocks) == 16 == len(GHOSTNET_CFGS)
    assert [cfg.stride for cfg in GHOSTNET_CFGS].count(2) == 4
    assert sum(isinstance(b.se, SqueezeExcite) for b in model.blocks) == 7
    assert model.stem[0].out_channels == 16 and model.stem[0].stride == (2, 2)
    assert model.conv_head[0].out_channels == 960
    assert model.fc_head[0].out_channels == 1280
    assert [b.project.out_channels for b in model.blocks] == [cfg.out for cfg in GHOSTNET_CFGS]
    assert [b.expand.out_channels for b in model.blocks] == [cfg.expansion for cfg in GHOSTNET_CFGS]
