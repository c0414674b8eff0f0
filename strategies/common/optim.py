"""The optimiser choice of the reference benchmark's test-time methods (mariodoebler/test-time-adaptation,
``classification/methods/base.py`` ``setup_optimizer``): Adam with betas (beta, 0.999), or SGD with momentum,
optional Nesterov and no dampening; weight decay on either. Its CIFAR configs use Adam, its ImageNet-C configs SGD
(momentum 0.9 and Nesterov from ``conf.py``). Also the per-epoch learning-rate schedules shared by more than one
method."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def adam_or_sgd(params: Iterable[nn.Parameter], optimizer: str, lr: float, beta: float = 0.9, momentum: float = 0.9,
                nesterov: bool = True, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``optimizer``: ``"adam"`` (lr, betas (beta, 0.999), weight_decay) or ``"sgd"`` (lr, momentum, Nesterov where
    momentum > 0, weight_decay)."""
    params = list(params)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=bool(nesterov) and momentum > 0,
                               weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")



def epoch_cosine(epoch: int, epochs: int) -> float:
    """The official CoSO rate factor in epoch ``epoch`` (0-based) of ``epochs``: ``cos(99 pi (e - 1) / (200 (K - 1)))``,
    1 in epochs 0 and 1 (its scheduler's first step repeats epoch 0's rate); 1 when K <= 1."""
    if epochs <= 1:
        return 1.0
    return math.cos(99 * math.pi * (min(max(epoch, 1), epochs - 1) - 1) / (200 * (epochs - 1)))


__all__ = ["adam_or_sgd", "epoch_cosine"]
