"""Run health: divergence (non-finite outputs) and collapse (predictions far more concentrated than the labels).

Both are judged per segment from what the evaluator already holds (predictions, labels, a per-sample finite flag)
and summarised per run, so that a broken run is marked in every table instead of being averaged like any other.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import numpy as np
import pandas as pd

#: default ``run.collapse_threshold``: collapsed when H(predictions) < threshold * H(labels)
COLLAPSE_THRESHOLD = 0.5
#: a segment is judged only when at least this many labelled samples lie outside its most frequent label
MIN_EVIDENCE = 20
HEALTH = ("ok", "collapsed", "diverged")  # from best to worst
ON_DIVERGE = ("stop", "mark")


def histogram_entropy(values: np.ndarray) -> float:
    """Shannon entropy (nats) of the histogram of the non-negative integers in ``values``."""
    counts = np.bincount(values.astype(np.int64))
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: one class gives 0.0, not -0.0


def collapse_ratio(predictions: np.ndarray, labels: np.ndarray) -> float:
    """H(predicted classes) / H(true labels) over a segment's labelled, predicted samples (1: as spread as the
    labels; 0: one class for all); NaN when there is too little evidence (see :data:`MIN_EVIDENCE`)."""
    keep = (labels >= 0) & (predictions >= 0)
    pred, lab = predictions[keep], labels[keep]
    if not lab.size or lab.size - np.bincount(lab.astype(np.int64)).max() < MIN_EVIDENCE:
        return float("nan")
    return histogram_entropy(pred) / histogram_entropy(lab)


def is_collapsed(ratio: float, threshold: float = COLLAPSE_THRESHOLD) -> bool:
    """Collapsed: a judged segment whose prediction entropy is below ``threshold`` times its label entropy."""
    return not math.isnan(ratio) and ratio < threshold


def _flag(v: Any) -> bool:
    return v is True or (isinstance(v, (int, float, np.integer, np.bool_)) and v == v and bool(v)) or \
        (isinstance(v, str) and v.strip().lower() in ("true", "1"))


def _count(v: Any) -> int:
    try:
        return 0 if v is None or v != v else int(float(v))
    except (TypeError, ValueError):
        return 0


def health_summary(segments: pd.DataFrame, threshold: float = COLLAPSE_THRESHOLD) -> Dict[str, Any]:
    """``health`` (ok / collapsed / diverged), ``diverged``, ``nonfinite_samples`` and the segments affected."""
    rows = segments.to_dict("records")
    diverged = [str(r["segment"]) for r in rows if _count(r.get("nonfinite")) > 0]
    collapsed = [str(r["segment"]) for r in rows if _flag(r.get("collapsed"))]
    return {"health": "diverged" if diverged else "collapsed" if collapsed else "ok", "diverged": bool(diverged),
            "nonfinite_samples": sum(_count(r.get("nonfinite")) for r in rows), "diverged_segments": diverged,
            "collapsed_segments": collapsed, "collapse_threshold": float(threshold)}


def worst(statuses: List[str]) -> str:
    """The worst of several runs' health (unknown values, e.g. of old runs, count as ok)."""
    return max(statuses, key=lambda s: HEALTH.index(s) if s in HEALTH else 0, default="ok")


def health_note(label: str, summary: Dict[str, Any], where: str = "") -> str:
    """One line naming a run that diverged or collapsed and where ('' for a healthy run)."""
    status = summary.get("health")
    at = f" ({where})" if where else ""
    if status == "diverged":
        segs = summary.get("diverged_segments") or []
        stop = f"; stopped after {summary['stopped_at']}" if summary.get("stopped_at") else ""
        return (f"{label}{at} diverged: {summary.get('nonfinite_samples', '?')} sample(s) with non-finite outputs "
                f"in {', '.join(segs)}{stop}")
    if status == "collapsed":
        segs = summary.get("collapsed_segments") or []
        return f"{label}{at} collapsed: predictions collapsed in {len(segs)} segment(s): {', '.join(segs)}"
    return ""
