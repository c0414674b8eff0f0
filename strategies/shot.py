"""Online SHOT: source hypothesis transfer at test time (Liang, Hu, Feng, "Do We Really Need to Access the Source
Data? Source Hypothesis Transfer for Unsupervised Domain Adaptation", ICML 2020, arXiv 2002.08546), in the online form
the test-time benchmarks run: one update per test batch.

The classifier head (the "hypothesis") is frozen; every other parameter of the model (the feature extractor) is
adapted. Per test batch x, ``steps`` times: logits = model(x), p = softmax(logits);
  loss = ent_par * (mean_i H(p_i) + sum_c m_c log(m_c + 1e-5)),   m = mean_i p_i   (information maximisation)
       + cls_par * CE(logits_i, argmax p_i) over the confident samples, max p_i > threshold   (pseudo-labels)
one optimiser step; the prediction returned is the last step's, before its update. ``cls_par: 0`` is SHOT-IM.

Hyperparameters: LINs-lab/ttab @ 19cb3ce (``ttab/configs/algorithms.py`` ``"shot"``: SGD, threshold_shot 0.9,
ent_par 1.0, cls_par 0.3; ``parameters.py`` lr 1e-3; ``ttab/model_adaptation/utils.py`` ``define_optimizer``: momentum
0.9, Nesterov, no dampening, weight decay 0; ``ttab/model_adaptation/shot.py`` ``one_adapt_step``: the loss above, the
model in train mode, so BatchNorm normalises with the test batch; TTAB's CIFAR-10-C batch is 64). ``bn: source``
with ``optimizer: adam``, ``cls_par`` 0.1 (SHOT) or 0 (SHOT-IM) is the online SHOT of matsuolab/T3A @ ff8cde5
(``domainbed/adapt_algorithms.py`` ``SHOT``, ``SHOTIM``: Adam on the featurizer, the featurizer in eval mode during
its adaptation forward, so BatchNorm keeps the source statistics); agreement with it: docs/fidelity.md.

One choice of ours: a batch with no confident sample adds no pseudo-label term (both references average the cross
entropy over an empty selection, which is NaN, and the NaN reaches every adapted weight).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import last_linear
from ctta.errors import UnsupportedError
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import Strategy, register
from .common import softmax_entropy, use_batch_statistics
from .common.optim import adam_or_sgd


def information_maximisation(logits: Tensor, eps: float = 1e-5) -> Tensor:
    """SHOT's IM loss: mean per-sample entropy minus the entropy of the mean prediction (with SHOT's 1e-5)."""
    mean = logits.softmax(dim=1).mean(dim=0)
    return softmax_entropy(logits).mean() + torch.sum(mean * torch.log(mean + eps))


def confident_pseudo_label_loss(logits: Tensor, threshold: float) -> Tensor:
    """Cross entropy against argmax pseudo-labels, averaged over the samples with max probability > ``threshold``;
    0 (not NaN) when there is none, without a host synchronisation."""
    conf, label = logits.softmax(dim=1).max(dim=1)
    keep = (conf > threshold).to(logits.dtype)
    return (F.cross_entropy(logits, label, reduction="none") * keep).sum() / keep.sum().clamp_min(1.0)


@register
class Shot(Strategy):
    """Information maximisation (+ confident pseudo-labels) of the feature extractor; the head stays the source's."""

    name = "shot"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})
    plugin_refusal = ("it freezes the model's classifier head (its last linear layer), which a plug-in's wrapper "
                      "hides behind the plug-in's own layers")

    def __init__(self, model: nn.Module, cls_par: NonNegative = 0.3, ent_par: NonNegative = 1.0,
                 threshold: Unit = 0.9, bn: Literal["batch", "source"] = "batch",
                 optimizer: Literal["adam", "sgd"] = "sgd", lr: Positive = 1e-3, beta: Momentum = 0.9,
                 momentum: Momentum = 0.9, nesterov: bool = True, weight_decay: NonNegative = 0.0,
                 steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.cls_par, self.ent_par, self.threshold, self.steps = cls_par, ent_par, threshold, steps
        head = last_linear(model)
        if head is None:
            raise UnsupportedError(f"shot freezes the classifier head and adapts the rest; {type(model).__name__} "
                                   f"has no nn.Linear head")
        self.model.requires_grad_(True)
        head.requires_grad_(False)
        if bn == "batch":
            self.model.train()
            use_batch_statistics(self.model)
        else:
            self.model.eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adam_or_sgd(params, optimizer, lr, beta=beta, momentum=momentum, nesterov=nesterov,
                                     weight_decay=weight_decay)
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        loss = self.ent_par * information_maximisation(logits)
        if self.cls_par > 0:
            loss = loss + self.cls_par * confident_pseudo_label_loss(logits, self.threshold)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    def adapt(self, x: Tensor) -> Tensor:
        return self.stepped(x, self._step, self.steps)


__all__ = ["Shot", "confident_pseudo_label_loss", "information_maximisation"]
