"""Calibration: expected calibration error with equal-width confidence bins (Guo et al., 2017; Naeini et al., 2015)."""
from __future__ import annotations

import numpy as np

ECE_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|, bins (k/bins, (k+1)/bins] over [0, 1].

    The standard definition (Guo et al. 2017, as in torchmetrics' ``binary/multiclass_calibration_error`` with
    ``norm='l1'``): confidence is the max softmax probability, a bin's accuracy the fraction of its argmax
    predictions that are right. NaN for an empty segment.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return float("nan")
    # bin k holds (k/bins, (k+1)/bins]; a confidence of exactly 0 goes to the first bin
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    acc = np.bincount(idx, weights=ok, minlength=bins)
    cf = np.bincount(idx, weights=conf, minlength=bins)
    return float(np.abs(acc - cf).sum() / conf.size)
