"""GhostModule: geometry equals the conv it replaces, channel bookkeeping of paper Eq. 3, clear errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ghostify import GhostModule


@st.composite
def conv_and_input(draw, dim: int = 2):
    """A random Conv1d/2d/3d (sizes may differ per dimension) and an input size it accepts, plus Ghost settings."""
    sizes = st.integers(1, 5 if dim < 3 else 3)
    kernel = tuple(draw(sizes) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1,) * dim if padding_kind == "same" else tuple(draw(st.integers(1, 3)) for _ in range(dim))
    padding = {"int": draw(st.integers(0, 3)), "tuple": tuple(draw(st.integers(0, 3)) for _ in range(dim)),
               "same": "same", "valid": "valid"}[padding_kind]
    s = draw(st.integers(2, 5))
    out_channels = draw(st.integers(s, 24 if dim < 3 else 8))
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    conv = convs[dim](draw(st.integers(1, 8)), out_channels, kernel, stride=stride, padding=padding,
                      dilation=dilation, bias=draw(st.booleans()),
                      padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
                      if padding_kind not in ("valid",) and dim < 3 else "zeros")
    span = [dl * (k - 1) + 1 for k, dl in zip(kernel, dilation)]
    pads = (0,) * dim if padding_kind in ("same", "valid") else conv.padding
    # reflect/replicate/circular padding needs the input larger than any padding (a 7x7 primary pads up to 6)
    least = 13 if conv.padding_mode != "zeros" else 1
    size = [draw(st.integers(max(extent - 2 * pad, least), 20 if dim < 3 else 9)) for extent, pad in zip(span, pads)]
    primary = draw(st.one_of(st.none(), st.integers(1, 7 if dim < 3 else 3),
                             st.tuples(*[st.integers(1, 7 if dim < 3 else 3)] * dim)))
    d = draw(st.sampled_from([1, 3, 5, 7] if dim < 3 else [1, 3]))
    return conv, torch.randn(2, conv.in_channels, *size), s, d, primary


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_from_conv_output_shape_equals_conv(dim):
    @settings(max_examples=150 if dim == 2 else 60, deadline=None)
    @given(conv_and_input(dim))
    def check(case):
        conv, x, s, d, primary = case
        try:
            ghost = GhostModule.from_conv(conv, s=s, d=d, primary_kernel=primary)
        except ValueError as error:
            assert primary is not None and "cannot keep the output size" in str(error)
            return
        assert ghost.dim == dim and ghost.cheap_conv.kernel_size == (d,) * dim
        assert ghost(x).shape == conv(x).shape

    check()


@pytest.mark.parametrize("n, s", [(64, 2), (63, 2), (10, 3), (7, 4), (5, 5)])
def test_channels_follow_paper_eq3(n, s):
    ghost = GhostModule(16, n, 3, padding=1, s=s, d=3)
    m = math.ceil(n / s)
    assert ghost.primary_conv.out_channels == m
    assert ghost.cheap_conv.out_channels == m * (s - 1)
    assert ghost.cheap_conv.groups == ghost.cheap_conv.in_channels == m * (s - 1)  # true depthwise
    assert ghost(torch.randn(1, 16, 9, 9)).shape == (1, n, 9, 9)


def test_output_is_intrinsic_then_ghosts():
    ghost = GhostModule(4, 8, 3, padding=1, s=2, d=3)
    x = torch.randn(1, 4, 6, 6)
    intrinsic = ghost.primary_conv(x)
    out = ghost(x)
    assert torch.equal(out[:, :4], intrinsic)
    assert torch.allclose(out[:, 4:], ghost.cheap_conv(intrinsic))


def test_ghosts_are_ghost_major():
    """Ghost ``k`` of intrinsic map ``i`` is output ``m + k * m + i``: a cheap kernel that is a centre tap of
    value ``k + 1`` makes that output exactly ``(k + 1)`` times map ``i``."""
    ghost = GhostModule(3, 10, 1, s=4, d=3)  # m = 3: ghost runs of 3, 3 and the first 1 of the last run
    with torch.no_grad():
        ghost.cheap_conv.weight.zero_()
        ghost.cheap_conv.weight[:, 0, 1, 1] = torch.arange(9).div(3, rounding_mode="floor") + 1.0
    x = torch.randn(2, 3, 5, 5)
    intrinsic = ghost.primary_conv(x)
    expected = torch.cat([intrinsic, intrinsic, 2 * intrinsic, 3 * intrinsic[:, :1]], 1)
    torch.testing.assert_close(ghost(x), expected)


@pytest.mark.parametrize("n,s,intrinsic", [(8, 2, None), (9, 3, None), (10, 3, None), (7, 4, None), (16, 3, 8)])
def test_gather_puts_each_map_at_its_channel(n, s, intrinsic):
    # out_index[c] names the map of [intrinsic, ghosts] that channel c gets: equal to cat-then-index_select,
    # in values and in gradients, whether it uses every map (n = m * s: a scatter) or leaves some out
    torch.manual_seed(0)
    module = GhostModule(3, n, 3, s=s, intrinsic_channels=intrinsic)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    first = module.primary(x)
    plain = torch.cat([first, module.cheap(first.repeat(1, s - 1, 1, 1))], 1)  # every map, none cut
    index = torch.randperm(module.intrinsic_channels * s)[:n]  # any n of the maps: all of them when m * s = n
    module.set_out_index(index)
    out = module(x)
    assert torch.equal(out, plain[:, index])
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (expected,) = torch.autograd.grad((plain[:, index] * weights).sum(), x)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_gather_keeps_channels_last():
    torch.manual_seed(0)
    module = GhostModule(3, 8, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6)
    index = torch.randperm(8)
    plain = module(x)
    module.set_out_index(index)
    out = module(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, plain[:, index])


def test_out_index_must_pick_distinct_maps():
    module = GhostModule(3, 5, 3, s=3)  # 2 intrinsic maps, 4 ghost maps, 5 outputs
    module.set_out_index(torch.tensor([5, 0, 1, 3, 2]))  # any 5 of the 6 maps
    with pytest.raises(ValueError, match="5 distinct indices of the module's 6 maps, got \\(5,\\) with repeats"):
        module.set_out_index(torch.tensor([0, 1, 2, 3, 3]))
    with pytest.raises(ValueError, match="out of range"):
        module.set_out_index(torch.tensor([0, 1, 2, 3, 6]))
    with pytest.raises(ValueError, match="got \\(4,\\)$"):
        module.set_out_index(torch.arange(4))


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


class ScaledConv(nn.Conv2d):
    """A conv subclass with its own forward: not a plain conv."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_from_conv_rejects_other_modules_and_grouped():
    with pytest.raises(TypeError, match="needs an nn.Conv1d, nn.Conv2d or nn.Conv3d, got ScaledConv"):
        GhostModule.from_conv(ScaledConv(3, 8, 3))
    with pytest.raises(TypeError, match="got ConvTranspose2d"):
        GhostModule.from_conv(nn.ConvTranspose2d(3, 8, 3))
    with pytest.raises(ValueError, match="grouped conv"):
        GhostModule.from_conv(nn.Conv2d(8, 8, 3, groups=8))


def test_primary_kernel_that_cannot_keep_geometry_raises():
    with pytest.raises(ValueError, match="cannot keep the output size"):
        GhostModule.from_conv(nn.Conv2d(8, 16, 3), primary_kernel=1)
    ghost = GhostModule.from_conv(nn.Conv2d(8, 16, 3, padding=1), primary_kernel=1)
    assert ghost(torch.randn(1, 8, 7, 7)).shape == (1, 16, 7, 7)
