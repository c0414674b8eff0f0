"""Device-side accumulation of a segment's predictions: no host sync per step, one transfer at the segment's end."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .calibration import expected_calibration_error
from .health import collapse_ratio


@dataclass
class SegmentRecord:
    """What one segment produced, on the host: per-step sizes and correct counts, and every prediction."""

    step_sizes: np.ndarray  # (steps,)
    step_correct: np.ndarray  # (steps,)
    predictions: np.ndarray  # (N,) argmax class; -1 where the logits were not finite (no prediction: an error)
    labels: np.ndarray  # (N,)
    confidence: np.ndarray  # (N,) max softmax probability
    groups: Optional[np.ndarray] = None  # (N,) index into the segment's group names, or None
    finite: Optional[np.ndarray] = None  # (N,) bool: every logit of the sample finite (None: all were)

    @property
    def n(self) -> int:
        return int(self.step_sizes.sum())

    @property
    def accuracy(self) -> float:
        """Online accuracy over the segment: correct predictions / samples (each judged when it arrived)."""
        return float(self.step_correct.sum() / max(self.n, 1))

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    @property
    def nonfinite(self) -> int:
        """Samples whose logits held a NaN or +inf, or no finite value (the model diverged on them)."""
        return 0 if self.finite is None else int((~self.finite).sum())

    def collapse_ratio(self) -> float:
        """H(predictions) / H(labels) of the segment (see :func:`ctta.evaluation.health.collapse_ratio`)."""
        return collapse_ratio(self.predictions, self.labels)

    def confusion(self, num_classes: int) -> np.ndarray:
        """Confusion matrix C[true, predicted] (counts) of the labelled samples that have a prediction."""
        k = int(max(num_classes, self.labels.max(initial=-1) + 1, self.predictions.max(initial=-1) + 1))
        keep = (self.labels >= 0) & (self.predictions >= 0)
        flat = np.bincount(self.labels[keep].astype(np.int64) * k + self.predictions[keep], minlength=k * k)
        return flat.reshape(k, k)

    def per_class_accuracy(self, num_classes: int) -> List[Optional[float]]:
        """Accuracy on the samples of each true class (None for a class absent from the segment)."""
        c = self.confusion(num_classes)
        n = np.bincount(self.labels[self.labels >= 0].astype(np.int64), minlength=len(c))[:len(c)]
        return [float(c[i, i] / n[i]) if n[i] else None for i in range(len(n))]

    def ece(self, bins: int = 15) -> float:
        return expected_calibration_error(self.confidence, self.correct, bins)

    def group_rows(self, names: Sequence[str]) -> List[Dict[str, float]]:
        """Per group: name, samples, correct predictions, accuracy, mean confidence (groups in ``names`` order)."""
        if self.groups is None:
            return []
        k = len(names)
        n = np.bincount(self.groups, minlength=k)[:k]
        c = np.bincount(self.groups, weights=self.correct.astype(np.float64), minlength=k)[:k]
        conf = np.bincount(self.groups, weights=self.confidence.astype(np.float64), minlength=k)[:k]
        return [{"group": str(names[i]), "n": int(n[i]), "correct": int(c[i]),
                 "accuracy": float(c[i] / n[i]) if n[i] else float("nan"),
                 "mean_confidence": float(conf[i] / n[i]) if n[i] else float("nan")} for i in range(k)]


class SegmentAccumulator:
    """Collects argmax predictions, labels, confidences (and group indices) as device tensors; ``finish`` moves
    them to the host once, so the per-step path never synchronises."""

    def __init__(self) -> None:
        self._pred: List[Tensor] = []
        self._label: List[Tensor] = []
        self._conf: List[Tensor] = []
        self._group: List[Tensor] = []
        self._finite: List[Tensor] = []

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor, groups: Optional[Tensor] = None) -> None:
        logits = logits.detach().float()
        # NaN or +inf anywhere, or no finite logit at all; -inf alone is a masked class (unseen classes of CIL)
        finite = ~(torch.isnan(logits) | torch.isposinf(logits)).any(dim=1) & torch.isfinite(logits).any(dim=1)
        conf, pred = logits.softmax(dim=1).max(dim=1)
        self._pred.append(torch.where(finite, pred, -1))  # no prediction from non-finite logits: counted wrong
        self._label.append(labels)
        self._conf.append(torch.where(finite, conf, 0.0))
        self._finite.append(finite)
        if groups is not None:
            self._group.append(groups)

    def finish(self) -> SegmentRecord:
        if not self._pred:
            empty = np.zeros(0, dtype=np.int64)
            return SegmentRecord(empty, empty, empty, empty, np.zeros(0, dtype=np.float32))
        if self._group and len(self._group) != len(self._pred):
            raise ValueError("group indices were given for some steps of a segment but not all")
        sizes = np.array([p.numel() for p in self._pred], dtype=np.int64)
        # one transfer: predictions, labels and groups stacked as int64, confidences separately
        ints = [torch.cat(self._pred), torch.cat(self._label).to(torch.long), torch.cat(self._finite).to(torch.long)]
        if self._group:
            ints.append(torch.cat(self._group).to(torch.long))
        stacked = torch.stack([t.to(ints[0].device) for t in ints]).cpu().numpy()
        conf = torch.cat(self._conf).cpu().numpy()
        pred, label, finite = stacked[0], stacked[1], stacked[2].astype(bool)
        groups = stacked[3] if self._group else None
        correct = (pred == label).astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        step_correct = np.add.reduceat(correct, bounds[:-1]) if correct.size else np.zeros(0, np.int64)
        return SegmentRecord(sizes, step_correct, pred, label, conf, groups, finite)
