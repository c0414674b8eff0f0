"""RDumb: ETA with a full reset to the source model at a fixed interval (Press, Schneider, Kümmerer, Bethge,
"RDumb: A simple approach that questions our progress in continual test-time adaptation", NeurIPS 2023,
arXiv 2306.05401; code github.com/oripress/CCC).

Per test batch x: one ETA step (``strategies/eta.py``: reliable and non-redundant samples, entropy-weighted entropy
minimisation of the norm affines); then, after every ``reset_every`` = T steps (counted with and without an
update), everything returns to the state at construction: the source weights, an empty optimiser and the unset
moving average of predictions (the paper's "reset every T = 1000 steps", Section 4).
Hyperparameters: the reference benchmark's ``cfgs/cifar10_c/rdumb.yaml`` (mariodoebler/test-time-adaptation@8b2ed63,
its ``EATA`` class with ``MODEL.RESET_AFTER_NUM_UPDATES: 1000`` counted in ``methods/base.py``): Adam lr 1e-3, beta
0.9, wd 0, 1 step, batch 200, E0 = 0.4 ln C, ``D_MARGIN`` 0.4, ``FISHER_ALPHA`` 0; CIFAR-100-C and ImageNet-C
values in configs/strategies/rdumb.yaml.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import register
from .eta import ETA


@register
class RDumb(ETA):
    """ETA, reset to the source model every ``reset_every`` steps."""

    name = "rdumb"

    def __init__(self, model: nn.Module, reset_every: Count = 1000, e_margin: Positive = 0.4, d_margin: Unit = 0.4,
                 probs_momentum: Unit = 0.9, optimizer: Literal["adam", "sgd"] = "adam", lr: Positive = 1e-3,
                 beta: Momentum = 0.9, momentum: Momentum = 0.9, nesterov: bool = True,
                 weight_decay: NonNegative = 0.0, steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, e_margin=e_margin, d_margin=d_margin, probs_momentum=probs_momentum,
                         optimizer=optimizer, lr=lr, beta=beta, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, steps=steps, reset_every=reset_every, seed=seed)


__all__ = ["RDumb"]
