"""The Ghost module (paper section 3.1, Eq. 2-3, Fig. 2b): a drop-in for one ``nn.Conv1d/2d/3d``.

A primary convolution makes ``m = ceil(n / s)`` intrinsic maps; a depthwise ``d x d`` convolution (``d`` in
1-D, ``d x d x d`` in 3-D) makes ``s - 1`` cheap "ghost" maps from each; the module outputs the first ``n``
maps of [intrinsic, ghosts].
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn

_Size = Union[int, Tuple[int, ...]]
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def conv_dim(conv: nn.Module) -> Optional[int]:
    """1, 2 or 3 for an ``nn.Conv1d/2d/3d``, or a subclass that only changes how it is built (as torchvision's
    video ``Conv3DSimple``); None for anything else, including subclasses with their own ``forward``."""
    for dim, kind in CONVS.items():
        if isinstance(conv, kind):
            plain = type(conv).forward is kind.forward and type(conv)._conv_forward is kind._conv_forward
            return dim if plain else None
    return None


def _tuple(value: _Size, name: str, dim: int = 2) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dim
    if isinstance(value, (tuple, list)) and len(value) == dim and all(isinstance(v, int) for v in value):
        return tuple(int(v) for v in value)
    raise TypeError(f"{name} must be an int or a tuple of {dim} ints, got {value!r}")


def check_ratio(s: int) -> int:
    """Validate the ghost ratio ``s`` (an integer >= 2)."""
    if isinstance(s, bool) or not isinstance(s, int) or s < 2:
        raise ValueError(f"s must be an integer >= 2, got {s!r}")
    return s


def intrinsic_count(n: int, s: int, width: int = 1, align: int = 1) -> int:
    """The fewest intrinsic maps, at least ``ceil(n / s)``, in whole groups of ``width`` channels (a grouped
    conv reads the output), that also split the ``n`` outputs at multiples of ``align`` channels where ``n``
    allows it: a multiple of both below ``n`` (runtimes keep a concatenation in their SIMD-blocked layout only
    when every part is a multiple of the block)."""
    unit = math.lcm(width, align)
    if n % unit == 0 and unit * -(-(n // unit) // s) < n:
        return unit * -(-(n // unit) // s)
    return width * -(-(n // width) // s)


def check_cheap_kernel(d: int) -> int:
    """Validate the cheap-operation kernel ``d`` (an odd integer >= 1)."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1 or d % 2 == 0:
        raise ValueError(f"d must be an odd integer >= 1, got {d!r}")
    return d


def primary_padding(
    kernel_size: Tuple[int, ...],
    padding: Union[str, _Size],
    dilation: _Size,
    primary_kernel: _Size,
) -> Union[str, Tuple[int, ...]]:
    """Padding that gives a ``primary_kernel`` conv the output size of the original conv, for every input size.

    Output size is ``floor((H + 2p - dil * (k - 1) - 1) / stride) + 1``, so the primary conv keeps it exactly
    when ``2p' - dil * (k' - 1) == 2p - dil * (k - 1)`` in each dimension.

    Raises:
        ValueError: when no non-negative integer padding satisfies that (e.g. a 1x1 primary for an unpadded 3x3).
    """
    if padding == "same":
        return "same"
    dim = len(kernel_size)
    kernel, dil = _tuple(kernel_size, "kernel_size", dim), _tuple(dilation, "dilation", dim)
    pk = _tuple(primary_kernel, "primary_kernel", dim)
    pad = (0,) * dim if padding == "valid" else _tuple(padding, "padding", dim)
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
    return tuple(result)


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by tensor rank: 2-D and 3-D maps


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` channels-last (oneDNN's fastest layout on the CPU) when it is a batch of 2-D or 3-D maps or
    filters; other tensors as they are."""
    return x.contiguous(memory_format=CHANNELS_LAST[x.dim()]) if x.dim() in CHANNELS_LAST else x


def layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format a new tensor shaped like ``x`` should take to match it: channels-last where ``x`` is."""
    if x.dim() in CHANNELS_LAST and not x.is_contiguous() and x.is_contiguous(memory_format=CHANNELS_LAST[x.dim()]):
        return CHANNELS_LAST[x.dim()]
    return torch.contiguous_format


class GhostModule(nn.Module):
    """``n`` output maps from ``ceil(n / s)`` intrinsic maps plus cheap depthwise ``d x d`` ghosts.

    By default the module is linear (no norm or activation inside), the closest stand-in for the conv it
    replaces. ``inner_bn=True`` and an ``activation_layer`` give the GhostNet form (norm + activation after
    both the primary conv and the cheap operation). ``dim`` 1 or 3 makes the same module from ``Conv1d`` or
    ``Conv3d`` (a cheap kernel of ``d`` or ``d x d x d``), for audio and video networks.

    Output order: ``m`` intrinsic maps, then the ghosts ghost-major (``s - 1`` runs of ``m``, run ``k`` holding
    ghost ``k`` of every intrinsic map), so each run is one true depthwise conv of the intrinsic maps (the
    deploy form runs them so; depthwise kernels with a channel multiplier are slow on CPU runtimes).

    Args:
        in_channels: input channels ``c``.
        out_channels: output channels ``n``.
        kernel_size: kernel of the conv being replaced; also the default primary kernel.
        stride, padding, dilation, bias, padding_mode: as in ``nn.Conv2d``; the primary conv uses them so the
            output's spatial size equals the original conv's.
        s: ghost ratio; ``m = ceil(n / s)`` intrinsic maps, ``s - 1`` ghosts each.
        intrinsic_channels: ``m`` when it must be more than ``ceil(n / s)`` (and less than ``n``), e.g. a
            multiple of the group width of a grouped conv that reads the output; the last ghosts are then unused.
        d: kernel of the depthwise cheap operation (odd).
        primary_kernel: kernel of the primary conv (default ``kernel_size``); padding is adjusted to match.
        inner_bn: put ``norm_layer`` after the primary conv and the cheap operation.
        norm_layer: the norm to use when ``inner_bn`` is set (default: batch norm of the module's ``dim``).
        activation_layer: activation after the primary conv and the cheap operation (none by default).
        dim: spatial dimensions, 1, 2 (default) or 3.

    Example:
        >>> ghost = GhostModule(64, 128, 3, padding=1, s=2, d=3)
        >>> ghost(torch.randn(1, 64, 56, 56)).shape
        torch.Size([1, 128, 56, 56])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Size,
        stride: _Size = 1,
        padding: Union[str, _Size] = 0,
        dilation: _Size = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        s: int = 2,
        d: int = 3,
        primary_kernel: Optional[_Size] = None,
        inner_bn: bool = False,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        activation_layer: Optional[Callable[..., nn.Module]] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        dim: int = 2,
        intrinsic_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.s, self.d = check_ratio(s), check_cheap_kernel(d)
        if dim not in CONVS:
            raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
        if out_channels < s:
            raise ValueError(f"out_channels ({out_channels}) must be >= s ({s}): every intrinsic map needs a ghost")
        self.dim = dim
        conv, norm_layer = CONVS[dim], norm_layer or NORMS[dim]
        kernel_size = _tuple(kernel_size, "kernel_size", dim)
        primary_kernel = kernel_size if primary_kernel is None else _tuple(primary_kernel, "primary_kernel", dim)
        self.out_channels = out_channels
        least = math.ceil(out_channels / s)
        if intrinsic_channels is not None and not least <= intrinsic_channels < out_channels:
            raise ValueError(f"intrinsic_channels must be in [ceil(n / s), n) = [{least}, {out_channels}), "
                             f"got {intrinsic_channels}")
        self.intrinsic_channels = least if intrinsic_channels is None else int(intrinsic_channels)
        self.ghost_channels = self.intrinsic_channels * (s - 1)
        factory = {"device": device, "dtype": dtype}
        m = self.intrinsic_channels

        primary = [
            conv(
                in_channels, m, primary_kernel, stride=stride,
                padding=primary_padding(kernel_size, padding, dilation, primary_kernel),
                dilation=dilation, bias=bias and not inner_bn, padding_mode=padding_mode, **factory,
            )
        ]
        g = self.ghost_channels
        cheap = [conv(g, g, d, padding=d // 2, groups=g, bias=bias and not inner_bn, **factory)]
        for layers, channels in ((primary, m), (cheap, self.ghost_channels)):
            if inner_bn:
                layers.append(norm_layer(channels, **factory))
            if activation_layer is not None:
                layers.append(activation_layer())
        self.primary = nn.Sequential(*primary)
        self.cheap = nn.Sequential(*cheap)
        self.register_buffer("out_index", None)

    @property
    def primary_conv(self) -> nn.modules.conv._ConvNd:
        """The ordinary convolution that makes the intrinsic maps."""
        return self.primary[0]

    @property
    def cheap_conv(self) -> nn.modules.conv._ConvNd:
        """The depthwise convolution that makes the ghost maps: its channel ``k * m + i`` reads intrinsic map ``i``."""
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
        ghosts = self.cheap(intrinsic if self.s == 2 else intrinsic.repeat(1, self.s - 1, *[1] * self.dim))
        every_map = self.intrinsic_channels * self.s == self.out_channels
        if self.out_index is not None and every_map and not torch.jit.is_tracing():  # a traced export: gather
            return self._gathered(intrinsic, ghosts)
        out = torch.cat([intrinsic, ghosts], dim=1)
        if self.out_index is not None:
            return out.index_select(1, self.out_index)
        if not every_map:
            out = out[:, : self.out_channels]
        return out

    def _gathered(self, intrinsic: torch.Tensor, ghosts: torch.Tensor) -> torch.Tensor:
        """``cat([intrinsic, ghosts])[:, out_index]`` when that is a permutation (no map left out), each half
        copied straight to its channels: one pass over the output instead of two (a ``cat``, then a gather)."""
        n, m = self.out_channels, intrinsic.shape[1]
        channel = torch.empty_like(self.out_index)  # the output channel of each of [intrinsic, ghosts]
        channel[self.out_index] = torch.arange(n, device=channel.device)
        out = torch.empty((intrinsic.shape[0], n, *intrinsic.shape[2:]), dtype=intrinsic.dtype,
                          device=intrinsic.device, memory_format=layout(intrinsic))
        out.index_copy_(1, channel[:m], intrinsic)
        return out.index_copy_(1, channel[m:], ghosts)

    def set_out_index(self, index: Optional[torch.Tensor]) -> None:
        """Reorder the outputs: output channel ``c`` becomes map ``index[c]`` of [intrinsic, ghosts]; None: no gather.

        Initialisers use this when the ghosts they fit come out in another order than the original conv's
        channels and no consuming layer can absorb the permutation; it costs a scattered copy per call.
        """
        if index is not None:
            index = torch.as_tensor(index, dtype=torch.long, device=self.primary_conv.weight.device)
            maps = self.intrinsic_channels + self.ghost_channels
            if index.shape != (self.out_channels,) or not (index.is_meta or (
                    len(index.unique()) == len(index) and 0 <= int(index.min()) and int(index.max()) < maps)):
                raise ValueError(f"out_index must hold {self.out_channels} distinct indices of the module's "
                                 f"{maps} maps, got {tuple(index.shape)}" + (" with repeats or out of range"
                                                                           if index.shape == (self.out_channels,)
                                                                           else ""))
        self.out_index = index

    @classmethod
    def from_conv(
        cls,
        conv: nn.modules.conv._ConvNd,
        s: int = 2,
        d: int = 3,
        primary_kernel: Optional[_Size] = None,
        **kwargs,
    ) -> "GhostModule":
        """Build a Ghost module with the geometry, bias, padding mode, dtype and device of ``conv``.

        The new module's weights are freshly initialised; ``ghostify.init`` fills them from ``conv``. ``kwargs``
        go to the constructor (``device`` and ``dtype`` default to ``conv``'s).

        Raises:
            TypeError: ``conv`` is not a plain ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.
            ValueError: ``conv`` is grouped, has fewer output channels than ``s``, or ``primary_kernel``
                cannot keep its output size.
        """
        dim = conv_dim(conv)
        if dim is None:
            raise TypeError(f"GhostModule.from_conv needs an nn.Conv1d, nn.Conv2d or nn.Conv3d, "
                            f"got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"cannot replace a grouped conv (groups={conv.groups}); only dense convs have ghosts")
        return cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            s=s, d=d, primary_kernel=primary_kernel, dim=dim,
            **{"device": conv.weight.device, "dtype": conv.weight.dtype, **kwargs},
        )

    def extra_repr(self) -> str:
        gather = ", gather" if self.out_index is not None else ""
        dim = f", dim={self.dim}" if self.dim != 2 else ""
        m = self.intrinsic_channels
        wider = f", intrinsic_channels={m}" if m != math.ceil(self.out_channels / self.s) else ""
        return f"out_channels={self.out_channels}, s={self.s}, d={self.d}{wider}{dim}{gather}"
