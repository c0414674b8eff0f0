"""Entropy losses on logits used by the entropy-minimisation and mean-teacher methods."""
from __future__ import annotations

from torch import Tensor


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample Shannon entropy of softmax(logits), shape N (TENT's objective).

    Written as the official code (DequanWang/tent; mariodoebler/test-time-adaptation ``utils/losses.py``
    ``Entropy``): ``softmax * log_softmax``. The former ``exp(log_softmax) * log_softmax`` rounds differently, which
    made TENT's gradients, hence its updates, differ from the reference's by float rounding (benchmarks/RESULTS.md)."""
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-sample cross-entropy of the student against the teacher's soft labels, shape N (CoTTA's consistency loss)."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1)


def symmetric_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.5) -> Tensor:
    """Per-sample symmetric cross-entropy of RMT (Döbler et al., CVPR 2023), used by PSMT's released code, shape N:
    ``-(1 - alpha) sum softmax(t) log softmax(s) - alpha sum softmax(s) log softmax(t)``.

    Gradients reach the student through both terms (through ``softmax(s)`` in the second); pass teacher logits
    that need no gradient.
    """
    return (-(1.0 - alpha) * (teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1)
            - alpha * (student_logits.softmax(dim=1) * teacher_logits.log_softmax(dim=1)).sum(dim=1))


def aug_cross_entropy(logits: Tensor, logits_aug: Tensor, anchor_logits: Tensor, alpha: float = 0.5) -> Tensor:
    """Per-sample cross-entropy of SANTA (reference benchmark ``AugCrossEntropy``), shape N: the test and augmented
    predictions against the anchor's log-probabilities,
    ``-(1 - alpha) sum softmax(s) log softmax(a) - alpha sum softmax(s') log softmax(a)``."""
    log_anchor = anchor_logits.log_softmax(dim=1)
    return (-(1.0 - alpha) * (logits.softmax(dim=1) * log_anchor).sum(dim=1)
            - alpha * (logits_aug.softmax(dim=1) * log_anchor).sum(dim=1))


def generalized_cross_entropy(logits: Tensor, targets: Tensor, q: float = 0.8) -> Tensor:
    """Per-sample generalised cross-entropy (Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural
    Networks with Noisy Labels", NeurIPS 2018, arXiv 1805.07836), shape N: ``(1 - p_y ** q) / q`` with p = softmax(logits)
    and y = ``targets``; q -> 0 gives the cross-entropy, q = 1 the mean absolute error (RPL's robust loss)."""
    p_y = logits.softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
    return (1.0 - p_y ** q) / q


def soft_likelihood_ratio(logits: Tensor, clip: float = 0.99, eps: float = 1e-5) -> Tensor:
    """Per-sample soft likelihood ratio loss of ROID (Marsden, Döbler, Yang, WACV 2024), shape N:
    ``-sum_c p_c log(p_c / (1 - p_c) + eps)`` with p = softmax(logits) clipped to [0, ``clip``] (the clip keeps the
    ratio finite; a clipped class gives no gradient). As the reference benchmark's ``SoftLikelihoodRatio``."""
    p = logits.softmax(dim=1).clamp(min=0.0, max=clip)
    return -(p * (p / (1.0 - p) + eps).log()).sum(dim=1)
