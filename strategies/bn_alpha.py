"""BN-alpha: normalise with the source statistics as a prior on the test statistics (Schneider et al., "Improving
robustness against common corruptions by covariate shift adaptation", NeurIPS 2020, arXiv 2006.16971).

Algorithm (per test batch x, no gradient step, no state carried from batch to batch); in every BatchNorm2d layer:
  1. test statistics of the layer's input: mean mu_t and unbiased variance s2_t over (batch, height, width);
  2. mu = (1 - alpha) mu_s + alpha mu_t,  s2 = (1 - alpha) s2_s + alpha s2_t  (mu_s, s2_s: the stored source
     statistics; the paper's prior of strength N over n test samples is alpha = n / (N + n));
  3. normalise with (mu, s2) and the layer's affine scale and shift.
``alpha = 0`` is the source model, ``alpha = 1`` BN adaptation with test statistics (``bn``, up to the unbiased
variance). As the reference benchmark's ``BNAlpha`` (mariodoebler/test-time-adaptation@8b2ed63,
``classification/methods/norm.py`` and ``methods/bn.py`` ``AlphaBatchNorm``, after bethgelab/robustness): the test
variance is the one torch's BatchNorm stores with momentum 1 (unbiased), only ``nn.BatchNorm2d`` layers are mixed.
Hyperparameter: alpha 0.1 (``BN.ALPHA`` of the reference's cifar10_c, cifar100_c and imagenet_c ``norm_alpha.yaml``;
those configs run at ``TEST.BATCH_SIZE: 1``, i.e. N = 9 source "samples" against one test image; the batch is the
stream's here, see configs/strategies/bn_alpha.yaml).
"""
from __future__ import annotations

from torch import nn

from ctta.errors import ConfigError
from ctta.hparams import Unit

from .base import Strategy, register
from .common import mix_source_statistics_


@register
class BNAlpha(Strategy):
    """Source statistics mixed with the test batch's by alpha; no gradient step."""

    name = "bn_alpha"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, alpha: Unit = 0.1, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.alpha = float(alpha)
        self.model.eval().requires_grad_(False)
        if mix_source_statistics_(self.model, self.alpha) == 0:
            raise ConfigError("bn_alpha needs BatchNorm2d layers; the backbone has none")
        self.remember_initial_state()
