"""The CIFAR-10 baselines of the paper's Table 5: VGG-16 (15M parameters, 313M FLOPs) and ResNet-56 (0.85M, 125M).

VGG-16 is the 13-conv variant with batch norm used in the filter-pruning literature, with a 512-512-10
classifier; ResNet-56 is He et al.'s CIFAR ResNet with parameter-free (option A) shortcuts.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ghostify.models._registry import register_model

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class CifarVGG(nn.Module):
    """A VGG for 32x32 inputs: 3x3 conv + BN + ReLU layers and max pools, then a 2x2 average pool.

    Args:
        cfg: output channels of each conv, or ``"M"`` for a 2x2 max pool.
        num_classes: classifier outputs.
    """

    def __init__(self, cfg: Sequence[Union[int, str]] = VGG16_CFG, num_classes: int = 10) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            elif isinstance(v, int):
                layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                channels = v
            else:
                raise ValueError(f"cfg entries must be channel counts or 'M', got {v!r}")
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(channels, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class PadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and append zero channels; no parameters."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a shortcut; ReLU after the second BN and after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = PadShortcut(out_channels - in_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: a 3x3 stem, three stages of basic blocks (16, 32, 64 channels), pool, linear.

    Args:
        blocks_per_stage: basic blocks in each stage; depth is ``6 * blocks_per_stage + 2``.
        num_classes: classifier outputs.
    """

    def __init__(self, blocks_per_stage: int = 9, num_classes: int = 10) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage!r}")
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.layer1 = self._stage(16, 16, blocks_per_stage, 1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, 2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(input_size=(3, 32, 32))
def cifar_vgg16(*, num_classes: int = 10) -> CifarVGG:
    """VGG-16 for CIFAR (Table 5 baseline: 15M parameters, 313M FLOPs at 32x32)."""
    return CifarVGG(VGG16_CFG, num_classes=num_classes)


@register_model(input_size=(3, 32, 32))
def cifar_resnet56(*, num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (Table 5 baseline: 0.85M parameters, 125M FLOPs at 32x32)."""
    return CifarResNet(9, num_classes=num_classes)
