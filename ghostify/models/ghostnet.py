"""GhostNet (paper section 3.2, Fig. 3, Table 1): Ghost bottlenecks in the layout of MobileNetV3-Large.

Every Ghost module here has a 1x1 primary conv, ``s = 2`` and ``d = 3`` (paper section 4.2.1). Channel
counts are scaled by ``width`` and rounded to multiples of 4 by ``_make_divisible``.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ghostify.models._registry import register_model
from ghostify.module import GhostModule


class BottleneckConfig(NamedTuple):
    """One G-bneck row of Table 1.

    Attributes:
        kernel: kernel of the stride-2 depthwise conv and of the depthwise conv in a projection shortcut.
        expansion: hidden channels after the first Ghost module (#exp).
        out: output channels (#out).
        se: whether the block has a squeeze-and-excite module.
        stride: 1 or 2.
    """

    kernel: int
    expansion: int
    out: int
    se: bool
    stride: int


# Table 1; the kernel sizes follow MobileNetV3-Large, whose layout GhostNet takes.
GHOSTNET_CFGS = (
    BottleneckConfig(3, 16, 16, False, 1),
    BottleneckConfig(3, 48, 24, False, 2),
    BottleneckConfig(3, 72, 24, False, 1),
    BottleneckConfig(5, 72, 40, True, 2),
    BottleneckConfig(5, 120, 40, True, 1),
    BottleneckConfig(3, 240, 80, False, 2),
    BottleneckConfig(3, 200, 80, False, 1),
    BottleneckConfig(3, 184, 80, False, 1),
    BottleneckConfig(3, 184, 80, False, 1),
    BottleneckConfig(3, 480, 112, True, 1),
    BottleneckConfig(3, 672, 112, True, 1),
    BottleneckConfig(5, 672, 160, True, 2),
    BottleneckConfig(5, 960, 160, False, 1),
    BottleneckConfig(5, 960, 160, True, 1),
    BottleneckConfig(5, 960, 160, False, 1),
    BottleneckConfig(5, 960, 160, True, 1),
)


def _make_divisible(value: float, divisor: int = 4) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), losing at most 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite: scale each channel by a gate computed from the globally pooled input.

    Args:
        channels: input (and output) channels.
        reduction: the squeezed width is ``channels / reduction``, rounded by ``_make_divisible``.
        gate_layer: the gate nonlinearity; hard sigmoid, as in MobileNetV3.
    """

    def __init__(
        self, channels: int, reduction: int = 4, gate_layer: Callable[..., nn.Module] = nn.Hardsigmoid
    ) -> None:
        super().__init__()
        squeezed = _make_divisible(channels / reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * scale


class GhostBottleneck(nn.Module):
    """The Ghost bottleneck (G-bneck, Fig. 3): expand with a Ghost module, project back with another.

    Stride 2 puts a depthwise ``kernel_size`` conv + BN between the two Ghost modules. The shortcut is
    the identity when the shape is kept, else a depthwise conv + BN and a 1x1 conv + BN.

    Args:
        in_channels: input channels.
        hidden_channels: channels after the expanding Ghost module.
        out_channels: output channels.
        kernel_size: kernel of the depthwise convs (stride-2 path and shortcut).
        stride: 1 or 2.
        se: add a squeeze-and-excite module on the hidden channels.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        se: bool = False,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        pad = kernel_size // 2
        self.expand = GhostModule(in_channels, hidden_channels, 1, inner_bn=True, activation_layer=nn.ReLU)
        self.downsample: nn.Module = nn.Identity()
        if stride == 2:
            self.downsample = nn.Sequential(
                nn.Conv2d(hidden_channels, hidden_channels, kernel_size, 2, pad, groups=hidden_channels, bias=False),
                nn.BatchNorm2d(hidden_channels),
            )
        self.se: nn.Module = SqueezeExcite(hidden_channels) if se else nn.Identity()
        self.project = GhostModule(hidden_channels, out_channels, 1, inner_bn=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, kernel_size, stride, pad, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.downsample(self.expand(x))))
        return out + self.shortcut(x)


class GhostNet(nn.Module):
    """GhostNet (Table 1) at any width multiplier.

    Args:
        cfgs: the bottleneck rows; Table 1 by default.
        width: width multiplier applied to every layer but the 1280-channel head.
        num_classes: classifier outputs.
        dropout: dropout before the classifier.
        features_only: build no head; ``forward`` returns the output of the last block at each stride from
            4 up (strides 4, 8, 16, 32 for Table 1), with channels ``feature_channels``.

    Example:
        >>> GhostNet(width=0.5)(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """

    def __init__(
        self,
        cfgs: Optional[Sequence[BottleneckConfig]] = None,
        width: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
        features_only: bool = False,
    ) -> None:
        super().__init__()
        cfgs = GHOSTNET_CFGS if cfgs is None else tuple(cfgs)
        if width <= 0:
            raise ValueError(f"width must be positive, got {width!r}")
        if not cfgs:
            raise ValueError("cfgs must hold at least one bottleneck row")
        self.features_only = features_only
        channels = _make_divisible(16 * width)
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        blocks: List[nn.Module] = []
        strides: List[int] = []
        stride = 2
        for cfg in cfgs:
            out = _make_divisible(cfg.out * width)
            hidden = _make_divisible(cfg.expansion * width)
            blocks.append(GhostBottleneck(channels, hidden, out, cfg.kernel, cfg.stride, cfg.se))
            channels, stride = out, stride * cfg.stride
            strides.append(stride)
        self.blocks = nn.Sequential(*blocks)

        # A feature map is the output of the last block at each stride >= 4.
        last_at_stride = {s: i for i, s in enumerate(strides) if s >= 4}
        self._feature_indices = sorted(last_at_stride.values())
        self.feature_strides = [strides[i] for i in self._feature_indices]
        self.feature_channels = [_make_divisible(cfgs[i].out * width) for i in self._feature_indices]

        if not features_only:
            head_channels = _make_divisible(cfgs[-1].expansion * width)
            self.conv_head = nn.Sequential(
                nn.Conv2d(channels, head_channels, 1, bias=False), nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True)
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc_head = nn.Sequential(nn.Conv2d(head_channels, 1280, 1), nn.ReLU(inplace=True))
            self.classifier = nn.Sequential(nn.Flatten(1), nn.Dropout(dropout), nn.Linear(1280, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        x = self.stem(x)
        if self.features_only:
            features = []
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i in self._feature_indices:
                    features.append(x)
            return features
        x = self.pool(self.conv_head(self.blocks(x)))
        return self.classifier(self.fc_head(x))


@register_model()
def ghostnet_050(*, num_classes: int = 1000, **kwargs) -> GhostNet:
    """GhostNet 0.5x (Table 7: 2.6M parameters, 42M FLOPs at 224x224)."""
    return GhostNet(width=0.5, num_classes=num_classes, **kwargs)


@register_model()
def ghostnet_100(*, num_classes: int = 1000, **kwargs) -> GhostNet:
    """GhostNet 1.0x (Table 7: 5.2M parameters, 141M FLOPs at 224x224)."""
    return GhostNet(width=1.0, num_classes=num_classes, **kwargs)


@register_model()
def ghostnet_130(*, num_classes: int = 1000, **kwargs) -> GhostNet:
    """GhostNet 1.3x (Table 7: 7.3M parameters, 226M FLOPs at 224x224)."""
    return GhostNet(width=1.3, num_classes=num_classes, **kwargs)
