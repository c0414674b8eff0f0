"""BN-EMA: normalise with running (exponential-moving-average) test statistics, the reference benchmark's
``norm_ema`` baseline (mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/norm.py`` ``BNEMA``,
``methods/bn.py`` ``EMABatchNorm``; it cites no paper; test-time BatchNorm statistics: Schneider et al., NeurIPS
2020, arXiv 2006.16971).

Algorithm (per test batch x, no gradient step); the BatchNorm running statistics start at the source statistics:
  1. statistics pass: forward x with every BatchNorm on the batch's statistics, each layer folding them into its
     running estimates, mu <- (1 - m) mu + m mu_batch, s2 <- (1 - m) s2 + m s2_batch (unbiased), m = ``momentum``;
  2. prediction pass: forward x again with every BatchNorm on the updated running estimates; return these logits.
Each layer's statistics in pass 1 are those of its input under batch-normalised earlier layers (as the reference's
``train()`` forward), not under the running estimates. An ``eval`` step (``predict``) runs pass 2 only.
Hyperparameter: ``momentum`` 0.1, the BatchNorm momentum the reference's models keep (PyTorch's default; none of its
``norm_ema.yaml`` sets it); those configs' batch: 200 (cifar10_c, cifar100_c), 64 (imagenet_c).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Unit

from .base import Strategy, register
from .common import batchnorm_layers


@register
class BNEMA(Strategy):
    """Running test statistics (EMA, from the source ones); no gradient step."""

    name = "bn_ema"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, momentum: Unit = 0.1, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.model.eval().requires_grad_(False)
        self.layers = batchnorm_layers(self.model)
        if not self.layers:
            raise ConfigError("bn_ema needs BatchNorm layers; the backbone has none")
        for m in self.layers:
            m.track_running_stats = True
            m.momentum = float(momentum)
        self.remember_initial_state()

    @torch.no_grad()
    def adapt(self, x: Tensor) -> Tensor:
        for m in self.layers:  # 1: batch statistics, folded into the running estimates
            m.train()
        try:
            self.model(x)
        finally:
            for m in self.layers:
                m.eval()
        return self.model(x)  # 2: the updated running estimates
