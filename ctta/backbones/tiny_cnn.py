"""A three-convolution CNN with BatchNorm: small enough for CPU tests and the offline demo, with layers TTA touches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import register_backbone


class TinyCNN(nn.Module):
    """conv-BN-ReLU x3 (widths w, 2w, 4w; the last two stride 2), global average pooling, linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc = nn.Linear(4 * width, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map of the last convolution before global pooling, N x 4w x H/4 x W/4."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.relu(self.bn3(self.conv3(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features of the last convolution, N x 4w."""
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_feature_map(x), 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_backbone("tiny_cnn", (0.5,), (0.5,))
def tiny_cnn(num_classes: int = 10, width: int = 16, in_chans: int = 3) -> TinyCNN:
    """3-conv CNN with BatchNorm (~25k params); for tests and the offline demo."""
    return TinyCNN(num_classes, width, in_chans)
