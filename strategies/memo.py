"""MEMO: test-time robustness via adaptation and augmentation (Zhang, Levine, Finn, NeurIPS 2022, arXiv 2110.09506).

Single-sample and episodic: every test image is handled alone, starting from the source model. Per image x:
  1. draw ``n_views`` AugMix views of x (``strategies/common/augmix.py``, all views in one batch on the device);
  2. marginal entropy: the entropy of the mean of the views' softmax outputs (computed as a log-mean-exp of the
     log-probabilities, clamped at the dtype's lowest value);
  3. ``steps`` optimiser steps on it over all weights and biases of the model;
  4. predict x with the adapted model; then return to the source model (weights and optimiser state).
BatchNorm normalises with the source statistics as a prior on the current batch's (``bn_alpha``'s layer, alpha 0.1:
the views in step 3, the single image in step 4), as the reference benchmark's MEMO.

Reference: mariodoebler/test-time-adaptation@8b2ed63 (``classification/methods/memo.py``, after zhangmarvin/memo;
``cfgs/cifar10_c/memo.yaml``: SGD lr 5e-3, momentum 0.9 and Nesterov from ``conf.py``, wd 0, 1 step, batch 1,
32 views, episodic; ``cfgs/imagenet_c/memo.yaml``: lr 2.5e-4, 64 views; ``conf.py`` ``BN.ALPHA`` 0.1). The engine's
batches are handled image by image (a batch of B images costs B episodes of ``n_views`` views each); the result is
the reference's at batch 1 up to the random views.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import Strategy, register
from .common import mix_source_statistics_
from .common.augmix import augmix_views
from .common.optim import adam_or_sgd


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the mean softmax of ``logits`` (views x classes), from log-probabilities (MEMO's form)."""
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    mean = logp.logsumexp(dim=0) - torch.log(torch.tensor(float(logits.shape[0]), device=logits.device))
    mean = mean.clamp_min(torch.finfo(mean.dtype).min)
    return -(mean * mean.exp()).sum(dim=-1)


@register
class MEMO(Strategy):
    """Per image: adapt the source model on the marginal entropy of its AugMix views, predict it, reset."""

    name = "memo"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, n_views: Count = 32, severity: Positive = 1.0, bn_alpha: Unit = 0.1,
                 optimizer: Literal["adam", "sgd"] = "sgd", lr: Positive = 5e-3, beta: Momentum = 0.9,
                 momentum: Momentum = 0.9, nesterov: bool = True, weight_decay: NonNegative = 0.0,
                 steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.n_views, self.severity, self.steps = int(n_views), float(severity), int(steps)
        self.model.eval().requires_grad_(True)
        if mix_source_statistics_(self.model, float(bn_alpha)) == 0:
            raise ConfigError("memo normalises with BatchNorm2d's source statistics as a prior; the backbone has none")
        self.optimizer = adam_or_sgd(self.model.parameters(), optimizer, lr, beta=beta, momentum=momentum,
                                     nesterov=nesterov, weight_decay=weight_decay)
        self._source = [p.detach().clone() for p in self.model.parameters()]
        self.remember_initial_state()

    @torch.no_grad()
    def _back_to_source(self) -> None:
        for p, p0 in zip(self.model.parameters(), self._source):
            p.copy_(p0)
        self.optimizer.state.clear()

    def _episode(self, x: Tensor) -> Tensor:
        """One image (1 x C x H x W): adapt on its views, predict it, reset; returns its logits."""
        views = augmix_views(x, self.n_views, self.generator(x.device), severity=self.severity)
        with torch.enable_grad():
            for _ in range(self.steps):
                marginal_entropy(self.model(views)).backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            out = self.model(x)
        self._back_to_source()
        return out

    def adapt(self, x: Tensor) -> Tensor:
        return torch.cat([self._episode(x[i:i + 1]) for i in range(len(x))])

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The source model with the BN prior on the batch (MEMO keeps no state between images)."""
        return self.model(x)


__all__ = ["MEMO", "marginal_entropy"]
