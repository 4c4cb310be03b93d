"""The Ghost module (paper section 3.1, Eq. 2-3, Fig. 2b): a drop-in for one ``nn.Conv2d``.

A primary convolution makes ``m = ceil(n / s)`` intrinsic maps; a depthwise ``d x d`` convolution makes
``s - 1`` cheap "ghost" maps from each; the module outputs the first ``n`` maps of [intrinsic, ghosts].
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn

_Pair = Union[int, Tuple[int, int]]


def _pair(value: _Pair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_ratio(s: int) -> int:
    """Validate the ghost ratio ``s`` (an integer >= 2)."""
    if isinstance(s, bool) or not isinstance(s, int) or s < 2:
        raise ValueError(f"s must be an integer >= 2, got {s!r}")
    return s


def check_cheap_kernel(d: int) -> int:
    """Validate the cheap-operation kernel ``d`` (an odd integer >= 1)."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1 or d % 2 == 0:
        raise ValueError(f"d must be an odd integer >= 1, got {d!r}")
    return d


def primary_padding(
    kernel_size: _Pair,
    padding: Union[str, _Pair],
    dilation: _Pair,
    primary_kernel: _Pair,
) -> Union[str, Tuple[int, int]]:
    """Padding that gives a ``primary_kernel`` conv the output size of the original conv, for every input size.

    Output size is ``floor((H + 2p - dil * (k - 1) - 1) / stride) + 1``, so the primary conv keeps it exactly
    when ``2p' - dil * (k' - 1) == 2p - dil * (k - 1)`` in each dimension.

    Raises:
        ValueError: when no non-negative integer padding satisfies that (e.g. a 1x1 primary for an unpadded 3x3).
    """
    if padding == "same":
        return "same"
    kernel, dil = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    pk = _pair(primary_kernel, "primary_kernel")
    pad = (0, 0) if padding == "valid" else _pair(padding, "padding")
    result = []
    for k, p, dl, kp in zip(kernel, pad, dil, pk):
        twice = 2 * p - dl * (k - kp)
        if twice < 0 or twice % 2:
            raise ValueError(
                f"primary kernel {tuple(pk)} cannot keep the output size of a {tuple(kernel)} conv with padding "
                f"{padding!r} and dilation {tuple(dil)}; use a primary kernel of the same parity that is at least "
                f"{tuple(kernel)} minus twice the padding, or the original kernel size"
            )
        result.append(twice // 2)
    return (result[0], result[1])


class GhostModule(nn.Module):
    """``n`` output maps from ``ceil(n / s)`` intrinsic maps plus cheap depthwise ``d x d`` ghosts.

    By default the module is linear (no norm or activation inside), the closest stand-in for the conv it
    replaces. ``inner_bn=True`` and an ``activation_layer`` give the GhostNet form (norm + activation after
    both the primary conv and the cheap operation).

    Args:
        in_channels: input channels ``c``.
        out_channels: output channels ``n``.
        kernel_size: kernel of the conv being replaced; also the default primary kernel.
        stride, padding, dilation, bias, padding_mode: as in ``nn.Conv2d``; the primary conv uses them so the
            output height and width equal the original conv's.
        s: ghost ratio; ``m = ceil(n / s)`` intrinsic maps, ``s - 1`` ghosts each.
        d: kernel of the depthwise cheap operation (odd).
        primary_kernel: kernel of the primary conv (default ``kernel_size``); padding is adjusted to match.
        inner_bn: put ``norm_layer`` after the primary conv and the cheap operation.
        norm_layer: the norm to use when ``inner_bn`` is set.
        activation_layer: activation after the primary conv and the cheap operation (none by default).

    Example:
        >>> ghost = GhostModule(64, 128, 3, padding=1, s=2, d=3)
        >>> ghost(torch.randn(1, 64, 56, 56)).shape
        torch.Size([1, 128, 56, 56])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Pair,
        stride: _Pair = 1,
        padding: Union[str, _Pair] = 0,
        dilation: _Pair = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        s: int = 2,
        d: int = 3,
        primary_kernel: Optional[_Pair] = None,
        inner_bn: bool = False,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Optional[Callable[..., nn.Module]] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.s, self.d = check_ratio(s), check_cheap_kernel(d)
        if out_channels < s:
            raise ValueError(f"out_channels ({out_channels}) must be >= s ({s}): every intrinsic map needs a ghost")
        kernel_size = _pair(kernel_size, "kernel_size")
        primary_kernel = kernel_size if primary_kernel is None else _pair(primary_kernel, "primary_kernel")
        self.out_channels = out_channels
        self.intrinsic_channels = math.ceil(out_channels / s)
        self.ghost_channels = self.intrinsic_channels * (s - 1)
        factory = {"device": device, "dtype": dtype}
        m = self.intrinsic_channels

        primary = [
            nn.Conv2d(
                in_channels, m, primary_kernel, stride=stride,
                padding=primary_padding(kernel_size, padding, dilation, primary_kernel),
                dilation=dilation, bias=bias and not inner_bn, padding_mode=padding_mode, **factory,
            )
        ]
        cheap = [nn.Conv2d(m, self.ghost_channels, d, padding=d // 2, groups=m, bias=bias and not inner_bn, **factory)]
        for layers, channels in ((primary, m), (cheap, self.ghost_channels)):
            if inner_bn:
                layers.append(norm_layer(channels, **factory))
            if activation_layer is not None:
                layers.append(activation_layer())
        self.primary = nn.Sequential(*primary)
        self.cheap = nn.Sequential(*cheap)
        self.register_buffer("out_index", None)

    @property
    def primary_conv(self) -> nn.Conv2d:
        """The ordinary convolution that makes the intrinsic maps."""
        return self.primary[0]

    @property
    def cheap_conv(self) -> nn.Conv2d:
        """The depthwise convolution that makes the ghost maps."""
        return self.cheap[0]

    @property
    def inner_norms(self) -> Optional[Tuple[nn.Module, nn.Module]]:
        """The norms after the primary conv and after the cheap operation, when the module has them."""
        norm = nn.modules.batchnorm._NormBase
        if len(self.primary) > 1 and isinstance(self.primary[1], norm) and isinstance(self.cheap[1], norm):
            return self.primary[1], self.cheap[1]
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        intrinsic = self.primary(x)
        ghosts = self.cheap(intrinsic)
        out = torch.cat([intrinsic, ghosts], dim=1)
        if self.out_index is not None:
            return out.index_select(1, self.out_index)
        if self.intrinsic_channels * self.s != self.out_channels:
            out = out[:, : self.out_channels]
        return out

    def set_out_index(self, index: Optional[torch.Tensor]) -> None:
        """Reorder the outputs: output channel ``c`` becomes map ``index[c]`` of [intrinsic, ghosts]; None: no gather.

        Initialisers use this when the ghosts they fit come out in another order than the original conv's
        channels and no consuming layer can absorb the permutation; it costs one ``index_select`` per call.
        """
        if index is not None:
            index = torch.as_tensor(index, dtype=torch.long, device=self.primary_conv.weight.device)
            if index.shape != (self.out_channels,):
                raise ValueError(f"out_index must hold {self.out_channels} channel indices, "
                                 f"got shape {tuple(index.shape)}")
        self.out_index = index

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        s: int = 2,
        d: int = 3,
        primary_kernel: Optional[_Pair] = None,
        **kwargs,
    ) -> "GhostModule":
        """Build a Ghost module with the geometry, bias, padding mode, dtype and device of ``conv``.

        The new module's weights are freshly initialised; ``ghostify.init`` fills them from ``conv``.

        Raises:
            TypeError: ``conv`` is not a plain ``nn.Conv2d``.
            ValueError: ``conv`` is grouped, has fewer output channels than ``s``, or ``primary_kernel``
                cannot keep its output size.
        """
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"GhostModule.from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"cannot replace a grouped conv (groups={conv.groups}); only dense convs have ghosts")
        return cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            s=s, d=d, primary_kernel=primary_kernel,
            device=conv.weight.device, dtype=conv.weight.dtype, **kwargs,
        )

    def extra_repr(self) -> str:
        gather = ", gather" if self.out_index is not None else ""
        return f"out_channels={self.out_channels}, s={self.s}, d={self.d}{gather}"
