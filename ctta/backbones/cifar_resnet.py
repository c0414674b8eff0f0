"""CIFAR ResNet-20/32/44/56 (He et al. 2016) with parameter-free option-A shortcuts, in the widely shared key layout.

State-dict keys: ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear`` -- the layout of the
public akamaster checkpoints (e.g. ``resnet20-12fca82f.th``), which load as they are.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import LinearHeadNet
from .spec import IMAGENET_MEAN, IMAGENET_STD, register_backbone


class PadShortcut(nn.Module):
    """Option-A shortcut: take every other pixel and zero-pad the channels, so the identity path has no weights."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_pad = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes - in_planes) if needs_pad else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(LinearHeadNet):
    """A 6n+2-layer ResNet for 32x32 inputs: 16/32/64 channels in three stages of ``n`` blocks each."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: List[nn.Module] = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map before global pooling, N x 64 x H/4 x W/4 (``forward_features`` pools it)."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))


@register_backbone("resnet20_cifar", IMAGENET_MEAN, IMAGENET_STD)
def resnet20_cifar(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M params, option-A shortcuts)."""
    return CifarResNet(20, num_classes)


@register_backbone("resnet32_cifar", IMAGENET_MEAN, IMAGENET_STD)
def resnet32_cifar(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (0.46M params, option-A shortcuts)."""
    return CifarResNet(32, num_classes)


@register_backbone("resnet44_cifar", IMAGENET_MEAN, IMAGENET_STD)
def resnet44_cifar(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 for CIFAR (0.66M params, option-A shortcuts)."""
    return CifarResNet(44, num_classes)


@register_backbone("resnet56_cifar", IMAGENET_MEAN, IMAGENET_STD)
def resnet56_cifar(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (0.85M params, option-A shortcuts)."""
    return CifarResNet(56, num_classes)
