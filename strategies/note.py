"""NOTE: robust continual test-time adaptation against temporal correlation (Gong, Jeong, Kim, Kim, Shin, Lee,
NeurIPS 2022, arXiv 2208.05117).

State: a PBRS memory (``strategies/common/pbrs.py``) of ``memory_size`` test images balanced over pseudo-classes, and
BatchNorm layers whose running statistics follow the memory (momentum ``bn_momentum``). Per test batch x:
  1. predict x with the model in eval mode (the learned running statistics: no dependence on the batch's labels
     being correlated); the argmax is each sample's pseudo-label;
  2. offer the samples to the PBRS memory with their pseudo-labels;
  3. ``steps`` times, in train mode on the memory's images: minimise the entropy of softmax(logits / T) (averaged
     over samples and classes, +1e-6 in the log) with respect to the norm layers' affines; the forward updates the
     running statistics with momentum ``bn_momentum``.
The prediction returned is step 1's.

Reference and hyperparameters: LINs-lab/ttab @ 19cb3ce (``ttab/model_adaptation/note.py`` ``NOTE``, ``PBRS``;
``ttab/model_adaptation/utils.py`` ``HLoss``; ``ttab/configs/algorithms.py`` ``"note"``: SGD, memory 64, update every
64, PBRS, bn_momentum 0.01, temperature 1, iabn False, use_learned_stats True; ``parameters.py`` lr 1e-3;
``define_optimizer`` momentum 0.9, Nesterov, wd 0). TTAB adapts once per test batch (its batch 64 = NOTE's update
interval); so does this. What is not here: instance-aware BatchNorm (IABN), which NOTE trains into the source model
(TTAB's default leaves it off for source models trained with BatchNorm, as the ones here are); the official code's
Adam at lr 1e-4 is ``optimizer: adam, lr: 1e-4``.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import Strategy, register
from .common import batchnorm_layers, norm_affine_parameters
from .common.incremental import num_outputs
from .common.optim import adam_or_sgd
from .common.pbrs import PBRS


def tempered_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """NOTE's loss: mean over samples and classes of -p log(p + 1e-6), p = softmax(logits / temperature)."""
    p = F.softmax(logits / temperature, dim=1)
    return (-p * torch.log(p + 1e-6)).mean()


@register
class NOTE(Strategy):
    """Entropy minimisation of the norm affines on a class-balanced memory; prediction with learned statistics."""

    name = "note"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, memory_size: Count = 64, bn_momentum: Unit = 0.01,
                 temperature: Positive = 1.0, optimizer: Literal["adam", "sgd"] = "sgd", lr: Positive = 1e-3,
                 beta: Momentum = 0.9, momentum: Momentum = 0.9, nesterov: bool = True,
                 weight_decay: NonNegative = 0.0, steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.temperature, self.steps = float(temperature), int(steps)
        self.model.eval().requires_grad_(False)
        bns = batchnorm_layers(self.model)
        if not bns:
            raise ConfigError("note adapts BatchNorm statistics on its memory; the backbone has no BatchNorm")
        for m in bns:
            m.track_running_stats = True
            m.momentum = float(bn_momentum)
        params = [p for _, p in norm_affine_parameters(self.model)]
        for p in params:
            p.requires_grad_(True)
        self.optimizer = adam_or_sgd(params, optimizer, lr, beta=beta, momentum=momentum, nesterov=nesterov,
                                     weight_decay=weight_decay)
        self.num_classes = num_outputs(self.model)
        self.memory = PBRS(memory_size, self.num_classes, seed=seed)
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.model(x)

    def adapt(self, x: Tensor) -> Tensor:
        logits = self.predict(x)
        self.memory.add(x, logits.argmax(1).tolist())  # PBRS decides on the host: one read per batch
        batch = self.memory.images()
        self.model.train()
        with torch.enable_grad():
            for _ in range(self.steps):
                tempered_entropy(self.model(batch), self.temperature).backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return logits

    def extra_state(self) -> Any:
        return self.memory.state()

    def load_extra_state(self, state: Any) -> None:
        self.memory = PBRS(self.memory.capacity, self.num_classes)
        self.memory.load(state)


__all__ = ["NOTE", "tempered_entropy"]
