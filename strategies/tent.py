"""TENT: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021).

Algorithm (per test batch, ``steps`` times): normalise with test-batch statistics; predict; minimise the mean
softmax entropy of the prediction with respect to the affine scale and shift of the normalisation layers only;
the prediction returned is the last step's, made before that step's update (``forward_and_adapt`` of the
official code returns each step's pre-update outputs and the caller keeps the last). Hyperparameters for CIFAR-10-C follow the official
code (DequanWang/tent, ``cfgs/cifar10``): Adam, lr 1e-3, betas (0.9, 0.999), no weight decay, 1 step, batch 200.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ctta.hparams import Count, Momentum, NonNegative, Positive

from .base import Strategy, register
from .common import norm_affine_parameters, softmax_entropy, use_batch_statistics


@register
class Tent(Strategy):
    """Entropy minimisation of the norm layers' affine parameters, everything else frozen."""

    name = "tent"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, lr: Positive = 1e-3, beta: Momentum = 0.9, weight_decay: NonNegative = 0.0,
                 steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.steps = steps
        self.model.train().requires_grad_(False)
        use_batch_statistics(self.model)
        params = [p for _, p in norm_affine_parameters(self.model)]
        if not params:
            raise ValueError("tent needs normalisation layers with affine parameters; the backbone has none")
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def adapt(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self.model(x)
                prediction = logits.detach()  # the last step's output before its update, as the official code
                loss = softmax_entropy(logits).mean()
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return prediction
