"""Device-side accumulation of a segment's predictions: no host sync per step, one transfer at the segment's end."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from torch import Tensor


@dataclass
class SegmentRecord:
    """What one segment produced, on the host: per-step sizes and correct counts, and every prediction."""

    step_sizes: np.ndarray  # (steps,)
    step_correct: np.ndarray  # (steps,)
    predictions: np.ndarray  # (N,) argmax class
    labels: np.ndarray  # (N,)
    confidence: np.ndarray  # (N,) max softmax probability

    @property
    def n(self) -> int:
        return int(self.step_sizes.sum())

    @property
    def accuracy(self) -> float:
        """Online accuracy over the segment: correct predictions / samples (each judged when it arrived)."""
        return float(self.step_correct.sum() / max(self.n, 1))


class SegmentAccumulator:
    """Collects argmax predictions, labels and confidences as device tensors; ``finish`` moves them once."""

    def __init__(self) -> None:
        self._pred: List[Tensor] = []
        self._label: List[Tensor] = []
        self._conf: List[Tensor] = []

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        probs = logits.detach().float().softmax(dim=1)
        conf, pred = probs.max(dim=1)
        self._pred.append(pred)
        self._label.append(labels)
        self._conf.append(conf)

    def finish(self) -> SegmentRecord:
        if not self._pred:
            empty = np.zeros(0, dtype=np.int64)
            return SegmentRecord(empty, empty, empty, empty, np.zeros(0, dtype=np.float32))
        sizes = torch.tensor([p.numel() for p in self._pred])
        pred = torch.cat(self._pred).cpu().numpy()
        label = torch.cat(self._label).cpu().numpy()
        conf = torch.cat(self._conf).cpu().numpy()
        correct = (pred == label).astype(np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes.numpy())])
        step_correct = np.add.reduceat(correct, bounds[:-1]) if correct.size else np.zeros(0, np.int64)
        return SegmentRecord(sizes.numpy(), step_correct, pred, label, conf)
