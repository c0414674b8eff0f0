"""RPL: robust pseudo-labelling (Rusak, Schneider, Pachitariu, Eckstein, Gehler, Bethge, Brendel, "If your data
distribution shifts, use self-learning", TMLR 2022, arXiv 2104.12928, Section 3 "robust pseudo-labeling"; code
github.com/bethgelab/robustness).

Adapted: the affine scale and shift of every normalisation layer (BatchNorm on test-batch statistics), everything
else frozen. Per test batch x (``steps`` times):
  1. logits z = f(x); hard pseudo-labels y^ = argmax z (from the same forward, no gradient through them);
  2. loss = mean over the batch of the generalised cross-entropy GCE(z, y^) = (1 - p_y^ ** q) / q, p = softmax z
     (Zhang & Sabuncu 2018; q -> 0 is the cross-entropy, q = 1 the MAE: a large q damps the gradient of the
     uncertain, likely wrong pseudo-labels);
  3. one optimiser step. The prediction returned is z, made before the step's update.
As the reference benchmark's ``RPL`` (mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/rpl.py``,
which builds on oripress/CCC ``models/rpl.py``): model in ``eval()`` mode with BatchNorm on batch statistics, the
GCE of its ``utils/losses.py`` (the label's probability picked by index).
Hyperparameters (``conf.py`` + ``cfgs/cifar10_c/rpl.yaml``): q 0.8 (``RPL.Q``), Adam lr 1e-3, beta 0.9, wd 0,
1 step, batch 200; CIFAR-100-C the same; ImageNet-C SGD lr 5e-4, momentum 0.9, Nesterov, batch 64
(configs/strategies/rpl.yaml).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, Positive

from .base import Strategy, register
from .common import generalized_cross_entropy, norm_affine_parameters, use_batch_statistics
from .common.optim import adam_or_sgd


@register
class RPL(Strategy):
    """Generalised cross-entropy on the model's own hard pseudo-labels, minimised over the norm affines."""

    name = "rpl"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, q: Positive = 0.8, optimizer: Literal["adam", "sgd"] = "adam",
                 lr: Positive = 1e-3, beta: Momentum = 0.9, momentum: Momentum = 0.9, nesterov: bool = True,
                 weight_decay: NonNegative = 0.0, steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        if q > 1:
            raise ConfigError(f"rpl: q must be in (0, 1] (1: mean absolute error), not {q}")
        self.q, self.steps = float(q), int(steps)
        self.model.eval().requires_grad_(False)  # eval: no dropout / stochastic depth (as the reference)
        use_batch_statistics(self.model)
        self.params = [p for _, p in norm_affine_parameters(self.model)]
        if not self.params:
            raise ConfigError("rpl needs normalisation layers with affine parameters; the backbone has none")
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = adam_or_sgd(self.params, optimizer, lr, beta, momentum, nesterov, weight_decay)
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def adapt(self, x: Tensor) -> Tensor:
        prediction = x.new_empty(0)
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self.model(x)
                prediction = logits.detach()  # before this step's update
                loss = generalized_cross_entropy(logits, logits.detach().argmax(dim=1), self.q).mean(0)
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return prediction


__all__ = ["RPL"]
