"""The optimiser choice of the reference benchmark's test-time methods (mariodoebler/test-time-adaptation,
``classification/methods/base.py`` ``setup_optimizer``): Adam with betas (beta, 0.999), or SGD with momentum,
optional Nesterov and no dampening; weight decay on either. Its CIFAR configs use Adam, its ImageNet-C configs SGD
(momentum 0.9 and Nesterov from ``conf.py``)."""
from __future__ import annotations

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


__all__ = ["adam_or_sgd"]
