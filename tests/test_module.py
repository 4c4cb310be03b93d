"""GhostModule: geometry equals the conv it replaces, channel bookkeeping of paper Eq. 3, clear errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ghostify import GhostModule


@st.composite
def conv_and_input(draw):
    """A random Conv2d (square or not) and an input size it accepts, plus Ghost settings."""
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding_kind = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    stride = (1, 1) if padding_kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = {"int": draw(st.integers(0, 3)), "pair": (draw(st.integers(0, 3)), draw(st.integers(0, 3))),
               "same": "same", "valid": "valid"}[padding_kind]
    s = draw(st.integers(2, 5))
    out_channels = draw(st.integers(s, 24))
    conv = nn.Conv2d(draw(st.integers(1, 8)), out_channels, kernel, stride=stride, padding=padding,
                     dilation=dilation, bias=draw(st.booleans()),
                     padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
                     if padding_kind not in ("valid",) else "zeros")
    span = [dl * (k - 1) + 1 for k, dl in zip(kernel, dilation)]
    pads = (0, 0) if padding_kind in ("same", "valid") else conv.padding
    # reflect/replicate/circular padding needs the input larger than any padding (a 7x7 primary pads up to 6)
    least = 13 if conv.padding_mode != "zeros" else 1
    height = draw(st.integers(max(span[0] - 2 * pads[0], least), 20))
    width = draw(st.integers(max(span[1] - 2 * pads[1], least), 20))
    primary = draw(st.one_of(st.none(), st.integers(1, 7), st.tuples(st.integers(1, 7), st.integers(1, 7))))
    d = draw(st.sampled_from([1, 3, 5, 7]))
    return conv, torch.randn(2, conv.in_channels, height, width), s, d, primary


@settings(max_examples=150, deadline=None)
@given(conv_and_input())
def test_from_conv_output_shape_equals_conv(case):
    conv, x, s, d, primary = case
    try:
        ghost = GhostModule.from_conv(conv, s=s, d=d, primary_kernel=primary)
    except ValueError as error:
        assert primary is not None and "cannot keep the output size" in str(error)
        return
    assert ghost(x).shape == conv(x).shape


@pytest.mark.parametrize("n, s", [(64, 2), (63, 2), (10, 3), (7, 4), (5, 5)])
def test_channels_follow_paper_eq3(n, s):
    ghost = GhostModule(16, n, 3, padding=1, s=s, d=3)
    m = math.ceil(n / s)
    assert ghost.primary_conv.out_channels == m
    assert ghost.cheap_conv.out_channels == m * (s - 1)
    assert ghost.cheap_conv.groups == m
    assert ghost(torch.randn(1, 16, 9, 9)).shape == (1, n, 9, 9)


def test_output_is_intrinsic_then_ghosts():
    ghost = GhostModule(4, 8, 3, padding=1, s=2, d=3)
    x = torch.randn(1, 4, 6, 6)
    intrinsic = ghost.primary_conv(x)
    out = ghost(x)
    assert torch.equal(out[:, :4], intrinsic)
    assert torch.allclose(out[:, 4:], ghost.cheap_conv(intrinsic))


def test_from_conv_keeps_bias_padding_mode_dtype_device():
    conv = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=1, bias=True,
                     padding_mode="reflect", dtype=torch.float64)
    ghost = GhostModule.from_conv(conv, s=2, d=3)
    assert ghost.primary_conv.bias is not None and ghost.cheap_conv.bias is not None
    assert ghost.primary_conv.padding_mode == "reflect"
    assert all(p.dtype == torch.float64 for p in ghost.parameters())
    assert ghost.primary_conv.stride == (2, 1)
    x = torch.randn(1, 3, 11, 13, dtype=torch.float64)
    assert ghost(x).shape == conv(x).shape


def test_default_is_linear_and_ghostnet_style_has_bn_relu():
    linear = GhostModule(8, 16, 1)
    assert [type(m) for m in linear.primary] == [nn.Conv2d]
    styled = GhostModule(8, 16, 1, inner_bn=True, activation_layer=nn.ReLU)
    assert [type(m) for m in styled.primary] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert [type(m) for m in styled.cheap] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert styled.primary_conv.bias is None


@pytest.mark.parametrize("kwargs, message", [
    ({"s": 1}, "s must be an integer >= 2, got 1"),
    ({"s": 2.5}, "s must be an integer >= 2"),
    ({"d": 2}, "d must be an odd integer >= 1, got 2"),
    ({"d": 0}, "d must be an odd integer >= 1, got 0"),
])
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GhostModule(8, 16, 3, **kwargs)


def test_from_conv_rejects_non_conv2d_and_grouped():
    with pytest.raises(TypeError, match="needs an nn.Conv2d, got Conv1d"):
        GhostModule.from_conv(nn.Conv1d(3, 8, 3))
    with pytest.raises(TypeError, match="got ConvTranspose2d"):
        GhostModule.from_conv(nn.ConvTranspose2d(3, 8, 3))
    with pytest.raises(ValueError, match="grouped conv"):
        GhostModule.from_conv(nn.Conv2d(8, 8, 3, groups=8))


def test_primary_kernel_that_cannot_keep_geometry_raises():
    with pytest.raises(ValueError, match="cannot keep the output size"):
        GhostModule.from_conv(nn.Conv2d(8, 16, 3), primary_kernel=1)
    ghost = GhostModule.from_conv(nn.Conv2d(8, 16, 3, padding=1), primary_kernel=1)
    assert ghost(torch.randn(1, 8, 7, 7)).shape == (1, 16, 7, 7)
