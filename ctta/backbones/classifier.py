"""A network plus its input normalisation: streams emit images in [0, 1] and every backbone takes them as they are."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are non-persistent buffers, so they never enter a state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} differ in length")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, " \
               f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())}"


class Classifier(nn.Module):
    """Images in [0, 1] (NCHW) -> logits: ``net(normalize(x))``; the state dict holds only ``net.*`` keys."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 name: str = "") -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.num_classes = int(num_classes)
        self.name = name or type(net).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
