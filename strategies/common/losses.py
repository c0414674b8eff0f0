"""Entropy losses on logits used by the entropy-minimisation and mean-teacher methods."""
from __future__ import annotations

from torch import Tensor


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample Shannon entropy of softmax(logits), shape N (TENT's objective)."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-sample cross-entropy of the student against the teacher's soft labels, shape N (CoTTA's consistency loss)."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1)
