"""Device-side accumulation of a segment's predictions: no host sync per step, one transfer at the segment's end."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .calibration import expected_calibration_error


@dataclass
class SegmentRecord:
    """What one segment produced, on the host: per-step sizes and correct counts, and every prediction."""

    step_sizes: np.ndarray  # (steps,)
    step_correct: np.ndarray  # (steps,)
    predictions: np.ndarray  # (N,) argmax class
    labels: np.ndarray  # (N,)
    confidence: np.ndarray  # (N,) max softmax probability
    groups: Optional[np.ndarray] = None  # (N,) index into the segment's group names, or None

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

    def confusion(self, num_classes: int) -> np.ndarray:
        """Confusion matrix C[true, predicted] (counts)."""
        k = int(max(num_classes, self.labels.max(initial=-1) + 1, self.predictions.max(initial=-1) + 1))
        flat = np.bincount(self.labels.astype(np.int64) * k + self.predictions, minlength=k * k)
        return flat.reshape(k, k)

    def per_class_accuracy(self, num_classes: int) -> List[Optional[float]]:
        """Accuracy on the samples of each true class (None for a class absent from the segment)."""
        c = self.confusion(num_classes)
        n = c.sum(1)
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

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor, groups: Optional[Tensor] = None) -> None:
        conf, pred = logits.detach().float().softmax(dim=1).max(dim=1)
        self._pred.append(pred)
        self._label.append(labels)
        self._conf.append(conf)
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
        ints = [torch.cat(self._pred), torch.cat(self._label).to(torch.long)]
        if self._group:
            ints.append(torch.cat(self._group).to(torch.long))
        stacked = torch.stack([t.to(ints[0].device) for t in ints]).cpu().numpy()
        conf = torch.cat(self._conf).cpu().numpy()
        pred, label = stacked[0], stacked[1]
        groups = stacked[2] if self._group else None
        correct = (pred == label).astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        step_correct = np.add.reduceat(correct, bounds[:-1]) if correct.size else np.zeros(0, np.int64)
        return SegmentRecord(sizes, step_correct, pred, label, conf, groups)
