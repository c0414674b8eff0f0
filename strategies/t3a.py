"""T3A: Test-Time Template Adjuster (Iwasawa, Matsuo, "Test-Time Classifier Adjustment Module for Model-Agnostic
Domain Generalization", NeurIPS 2021; code github.com/matsuolab/T3A ``domainbed/adapt_algorithms.py`` ``T3A``, commit
ff8cde5; also LINs-lab/ttab ``ttab/model_adaptation/t3a.py``, 19cb3ce).

Training-free: the backbone and its linear head never change; the classifier is replaced by class templates built
from the test stream. State: a support set of (feature, pseudo-label, entropy), started with the head's weight rows
w_c as features, labelled and scored by the head itself (argmax and entropy of head(w_c)). Per test batch x:
  1. z = penultimate features of x, p = head(z); add each (z_i, argmax p_i, H(p_i)) to the supports;
  2. filter: per pseudo-class keep the ``filter_k`` supports of lowest entropy (the others are dropped for good);
  3. templates t_c = normalise(sum of the L2-normalised supports labelled c) (a column per class);
  4. output z @ [t_1 .. t_C] (features not normalised, as the official code; argmax = nearest template by cosine).
``predict`` (eval steps) scores with the current templates and adds nothing.

Hyperparameters: ``filter_k`` 100, the default of TTAB's ``configs/algorithms.py`` (``"t3a": {"top_M": 100}``); the
official code selects it per data set on validation domains among {1, 5, 20, 50, 100, -1}. Its -1 ("keep all") is not
offered: the official slicing ``[:-1]`` then drops the most uncertain support of every class, and the support set
grows with the stream; a large ``filter_k`` keeps (nearly) all.

Implementation, and why: the supports live in a fixed bank of C x ``filter_k`` slots (class c's in slots c K .. c K +
K - 1, lowest entropy first, empty slots zero), so the filter is a sort on the device with no host synchronisation
and the state has one size for checkpoints and resets. The official code keeps a variable-length list in the same
order (class by class, entropy ascending); the templates are the same sums (agreement in docs/fidelity.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import features_and_logits, last_linear
from ctta.errors import UnsupportedError
from ctta.hparams import Count

from .base import Strategy, register
from .common.losses import softmax_entropy


def keep_lowest_entropy(labels: Tensor, entropy: Tensor, num_classes: int, k: int) -> Tensor:
    """Slot of each support in a C x k bank (class-major, entropy ascending within a class) or C * k (dropped):
    per class the ``k`` supports of lowest entropy. Labels equal to ``num_classes`` mark empty entries."""
    order = torch.argsort(entropy, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]  # grouped by class, entropy ascending within
    sorted_labels = labels[order]
    counts = F.one_hot(sorted_labels, num_classes + 1).sum(0)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order), device=labels.device) - starts[sorted_labels]
    keep = (rank < k) & (sorted_labels < num_classes)
    slot_sorted = torch.where(keep, sorted_labels * k + rank, torch.full_like(rank, num_classes * k))
    return torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)


def class_templates(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """D x C: per class the normalised sum of the L2-normalised features labelled with it (empty entries, labelled
    ``num_classes``, count for nothing)."""
    onehot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(features.dtype)
    return F.normalize(F.normalize(features, dim=1).T @ onehot, dim=0)


@register
class T3A(Strategy):
    """Prototype classifier from the test stream's own low-entropy features; the model is never changed."""

    name = "t3a"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})
    plugin_refusal = "it replaces the classifier head by feature templates, so a plug-in's logit correction is lost"

    def __init__(self, model: nn.Module, filter_k: Count = 100, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.model.eval().requires_grad_(False)
        head = last_linear(model)
        if head is None:
            raise UnsupportedError(f"t3a needs a linear classifier head to start its templates from; "
                                   f"{type(model).__name__} has no nn.Linear")
        self.num_classes, dim = head.weight.shape
        self.k = int(filter_k)
        with torch.no_grad():
            warm = head.weight.detach().clone()
            warm_logits = head(warm)
        slots = self.num_classes * self.k
        self.register_buffer("support_features", warm.new_zeros(slots, dim))
        self.register_buffer("support_labels", torch.full((slots,), self.num_classes, dtype=torch.long,
                                                          device=warm.device))
        self.register_buffer("support_entropy", warm.new_full((slots,), float("inf")))
        self._add(warm, warm_logits)
        self.remember_initial_state()

    def _add(self, z: Tensor, logits: Tensor) -> None:
        """Add (z, argmax, entropy) to the supports, then keep the ``k`` lowest-entropy ones per pseudo-class."""
        feats = torch.cat([self.support_features, z.to(self.support_features.dtype)])
        labels = torch.cat([self.support_labels, logits.argmax(1)])
        ent = torch.cat([self.support_entropy, softmax_entropy(logits).to(self.support_entropy.dtype)])
        slot = keep_lowest_entropy(labels, ent, self.num_classes, self.k)
        n = self.num_classes * self.k + 1  # the last slot collects what is dropped
        self.support_features.copy_(feats.new_zeros(n, feats.shape[1]).index_copy_(0, slot, feats)[:-1])
        self.support_labels.copy_(labels.new_full((n,), self.num_classes).index_copy_(0, slot, labels)[:-1])
        self.support_entropy.copy_(ent.new_full((n,), float("inf")).index_copy_(0, slot, ent)[:-1])

    def _score(self, z: Tensor) -> Tensor:
        return z @ class_templates(self.support_features, self.support_labels, self.num_classes).to(z.dtype)

    @torch.no_grad()
    def adapt(self, x: Tensor) -> Tensor:
        z, logits = features_and_logits(self.model, x)
        self._add(z, logits)
        return self._score(z)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        z, _ = features_and_logits(self.model, x)
        return self._score(z)


__all__ = ["T3A", "class_templates", "keep_lowest_entropy"]
