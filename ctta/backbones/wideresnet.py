"""WideResNet (Zagoruyko & Komodakis 2016) in RobustBench's key layout, so its CIFAR-10 ``Standard.pt`` loads as is.

Keys: ``conv1``, ``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2[,convShortcut]}``, ``bn1``, ``fc``.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import LinearHeadNet
from .spec import register_backbone


class WideBasicBlock(nn.Module):
    """Pre-activation block; when the width or stride changes, the shortcut is a 1x1 conv of the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else \
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        shortcut = x if self.equal_in_out else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideStage(nn.Module):
    """``n`` wide blocks held as ``.layer`` (the RobustBench nesting), the first one changing width/stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        blocks: List[nn.Module] = [WideBasicBlock(in_planes, out_planes, stride, drop_rate)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(LinearHeadNet):
    """WRN-depth-k for 32x32 inputs: 16 -> 16k/32k/64k channels, BN-ReLU, global pooling and a linear head."""

    head_attr = "fc"

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideStage(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideStage(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """BN-ReLU'd last-stage feature map before global pooling, N x 64k x H/4 x W/4 (``forward_features``
        pools it)."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(out))


@register_backbone("wrn28_10_cifar", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
def wrn28_10_cifar(num_classes: int = 10, depth: int = 28, widen_factor: int = 10,
                   drop_rate: float = 0.0) -> WideResNet:
    """WideResNet-28-10 (36.5M params), RobustBench 'Standard' layout; raw [0,1] input."""
    return WideResNet(depth, widen_factor, num_classes, drop_rate)
