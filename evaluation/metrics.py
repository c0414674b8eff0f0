"""Run-level metrics computed from the per-segment table; every number carries its definition."""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import pandas as pd

DEFINITIONS: Dict[str, str] = {
    "domain_error": "online error on each domain: wrong predictions / samples, each sample judged when it arrived, "
                    "before the strategy adapted on its batch",
    "mean_error": "mean of domain_error over the domains (the CTTA papers' 'mean' column)",
    "clean_accuracy_start": "accuracy on clean held-out samples before the stream (eval steps, no adaptation)",
    "clean_accuracy_end": "accuracy on the same clean samples after the stream (eval steps, no adaptation)",
    "source_forgetting": "clean_accuracy_start - clean_accuracy_end (positive: clean accuracy was lost)",
    "adapt_images_per_s": "images through adapt steps per second of wall time (device synchronised per segment)",
    "peak_memory_mb": "peak device memory: CUDA allocator peak on a GPU, process peak RSS on a CPU",
    "trainable_parameters": "number of parameters the strategy's optimizer updates",
}


def run_metrics(segments: pd.DataFrame) -> Dict[str, Any]:
    """Per-domain error, mean error and source forgetting from the segments table."""
    out: Dict[str, Any] = {}
    dom = segments[segments["role"] == "domain"]
    out["domain_error"] = {str(r.segment): float(r.error) for r in dom.itertuples()}
    out["mean_error"] = float(np.mean(dom["error"])) if len(dom) else float("nan")
    probes = segments[segments["role"] == "probe"]
    start = probes[probes["segment"] == "clean@start"]
    end = probes[probes["segment"] == "clean@end"]
    if len(start) and len(end):
        a0, a1 = float(start["accuracy"].iloc[0]), float(end["accuracy"].iloc[0])
        out.update(clean_accuracy_start=a0, clean_accuracy_end=a1, source_forgetting=a0 - a1)
    return out
