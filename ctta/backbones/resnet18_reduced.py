"""The reduced ResNet-18 of online continual learning (Lopez-Paz & Ranzato's GEM; Mammoth; ER-ACE; AdaB²N).

A ResNet-18 (BasicBlock, [2, 2, 2, 2]) for 32x32 inputs with ``nf`` base filters (20 in the "reduced" network,
64 in the full one): 3x3 stem of stride 1 without max-pooling, stages of nf, 2nf, 4nf and 8nf channels (strides
1, 2, 2, 2), projection shortcuts (1x1 convolution + BatchNorm) where the shape changes, global average pooling and
a linear head. State-dict keys as Mammoth's ``backbone/ResNet18.py`` (``conv1``, ``bn1``, ``layerK.i.{conv1,bn1,
conv2,bn2,shortcut.0,shortcut.1}``, ``linear``). Input normalised with the CIFAR-10 mean / std (as Mammoth).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import LinearHeadNet
from .spec import register_backbone

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2615)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (projection) shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18(LinearHeadNet):
    """ResNet-18 with ``nf`` base filters (reduced: nf = 20, about 1.1M parameters at 10 classes)."""

    def __init__(self, num_classes: int = 10, nf: int = 20, in_chans: int = 3) -> None:
        super().__init__()
        if isinstance(nf, bool) or not isinstance(nf, int) or nf < 1:
            raise ValueError(f"nf must be a positive integer, got {nf!r}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self._in = nf
        self.layer1 = self._stage(nf, 2, 1)
        self.layer2 = self._stage(2 * nf, 2, 2)
        self.layer3 = self._stage(4 * nf, 2, 2)
        self.layer4 = self._stage(8 * nf, 2, 2)
        self.linear = nn.Linear(8 * nf, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: List[nn.Module] = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self._in, planes, s))
            self._in = planes
        return nn.Sequential(*layers)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map before global pooling, N x 8nf x H/8 x W/8 (``forward_features`` pools it)."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


@register_backbone("resnet18_reduced", CIFAR10_MEAN, CIFAR10_STD)
def resnet18_reduced(num_classes: int = 10, nf: int = 20, in_chans: int = 3) -> ReducedResNet18:
    """Reduced ResNet-18 of online CL (nf=20, ~1.1M params; Mammoth / ER-ACE / AdaB2N); nf=64 gives the full one."""
    return ReducedResNet18(num_classes, nf, in_chans)
