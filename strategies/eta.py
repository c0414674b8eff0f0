"""ETA: EATA without its Fisher regulariser (Niu et al., "Efficient Test-Time Model Adaptation without Forgetting",
ICML 2022, arXiv 2204.02610, Section 4: "ETA" = reliable and non-redundant sample selection with entropy
weighting only; no source data).

Per test batch x: steps 1-3 of ``strategies/eata.py`` with ``fisher_weight`` = 0 (S1 = {E(x) < E0}, S2 = the
samples of S1 whose prediction is not redundant with the moving average m, loss = mean over S2 of
E(x) / exp(E(x) - E0), one step if S2 is not empty).
Hyperparameters: the reference benchmark's ``cfgs/cifar10_c/eta.yaml`` (mariodoebler/test-time-adaptation@8b2ed63;
its ``EATA`` class, ``EATA.FISHER_ALPHA: 0.0``): Adam lr 1e-3, beta 0.9, wd 0, 1 step, batch 200, E0 = 0.4 ln C,
``D_MARGIN`` 0.4; CIFAR-100-C and ImageNet-C values in configs/strategies/eta.yaml.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

from ctta.hparams import Count, Momentum, NonNegative, NonNegInt, Positive, Unit

from .base import register
from .eata import EATA


@register
class ETA(EATA):
    """EATA's selection and weighting, no Fisher regulariser and no source data."""

    name = "eta"
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, e_margin: Positive = 0.4, d_margin: Unit = 0.4, probs_momentum: Unit = 0.9,
                 optimizer: Literal["adam", "sgd"] = "adam", lr: Positive = 1e-3, beta: Momentum = 0.9,
                 momentum: Momentum = 0.9, nesterov: bool = True, weight_decay: NonNegative = 0.0, steps: Count = 1,
                 reset_every: NonNegInt = 0, seed: int = 0) -> None:
        super().__init__(model, source_data=None, fisher_weight=0.0, e_margin=e_margin, d_margin=d_margin,
                         probs_momentum=probs_momentum, optimizer=optimizer, lr=lr, beta=beta, momentum=momentum,
                         nesterov=nesterov, weight_decay=weight_decay, steps=steps, reset_every=reset_every,
                         seed=seed)


__all__ = ["ETA"]
