"""Run-level metrics computed from the per-segment and per-group tables; every number carries its definition.

The full list, with the Avalanche / PyCIL / Mammoth definition each one matches, is docs/evaluation.md.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np
import pandas as pd

from .calibration import ECE_BINS
from .health import COLLAPSE_THRESHOLD, MIN_EVIDENCE, health_summary
from .matrix import accuracy_matrix, average_anytime_accuracy, forward_transfer, matrix_metrics

DEFINITIONS: Dict[str, str] = {
    "domain_error": "online error on each domain: wrong predictions / samples, each sample judged when it arrived, "
                    "before the strategy adapted on its batch; a domain segment with groups (a mixed-domain "
                    "stream) is reported per group",
    "mean_error": "mean of domain_error over the domains (the CTTA papers' 'mean' column)",
    "online_accuracy": "correct / samples over every adapt and train step of the stream, each judged on arrival "
                       "(Avalanche's Accuracy accumulated over the whole stream)",
    "segment_accuracy": "accuracy over each segment: correct / samples (online for adapt/train, plain for eval)",
    "group_accuracy": "accuracy of each group (sub-population) inside a segment: correct / samples of the group",
    "ece": f"expected calibration error per segment: sum over {ECE_BINS} equal-width confidence bins of "
           "|bin| / N * |accuracy(bin) - mean max-softmax confidence(bin)| (Guo et al. 2017)",
    "per_class_accuracy": "accuracy on the samples of each true class, per segment (None: class absent); the "
                          "confusion matrices C[true, predicted] are in segment_details.jsonl",
    "clean_accuracy_start": "accuracy on clean held-out samples before the stream (eval steps, no adaptation)",
    "clean_accuracy_end": "accuracy on the same clean samples after the stream (eval steps, no adaptation)",
    "interleaved_clean_error": "error (%) on each clean domain interleaved between the shifts, in stream order; "
                               "not part of domain_error / mean_error",
    "source_forgetting": "clean_accuracy_start - clean_accuracy_end (positive: clean accuracy was lost)",
    "accuracy_matrix": "R[i, j]: accuracy on group j of the last eval segment whose meta['after'] is learned "
                       "segment i (rows: learned segments in stream order; columns: evaluated groups)",
    "seen_accuracy": "after each row i of R: correct / samples pooled over the groups learned up to i",
    "average_incremental_accuracy": "mean over rows of seen_accuracy (PyCIL's 'Average Accuracy', Rebuffi et al. "
                                    "2017)",
    "last_accuracy": "seen_accuracy after the last row of R (PyCIL's final top-1 accuracy)",
    "average_anytime_accuracy": "mean over every eval segment with an 'after' (also those inside a session) of "
                                "its accuracy on the groups learned so far (anytime inference)",
    "forgetting_avalanche": "mean over groups j learned before the last row T of R[j, j] - R[T, j]: accuracy right "
                            "after learning j minus final accuracy (Avalanche's StreamForgetting)",
    "forgetting_max": "mean over groups j < T of max_{j <= l < T} R[l, j] - R[T, j] (Chaudhry et al. 2018; "
                      "PyCIL and Mammoth also take the max, Mammoth including row T, i.e. clipping at 0)",
    "backward_transfer": "mean over groups j < T of R[T, j] - R[j, j] (Lopez-Paz & Ranzato 2017; Avalanche's "
                         "StreamBWT = -forgetting_avalanche)",
    "forward_transfer": "mean over rows i >= 1 of R[i-1, j_i] - b_j: accuracy on the domain learned in row i just "
                        "before it, minus the source model's (probes@start; Lopez-Paz & Ranzato 2017; probes: all)",
    "adapt_images_per_s": "images through adapt steps per second of wall time (device synchronised per segment)",
    "train_images_per_s": "images through train steps per second of wall time (device synchronised per segment)",
    "eval_images_per_s": "images through eval steps per second of wall time (device synchronised per segment)",
    "adapt_seconds": "wall time of all adapt steps (device synchronised per segment), seconds",
    "train_seconds": "wall time of all train steps (device synchronised per segment), seconds",
    "eval_seconds": "wall time of all eval steps: probes and held-out evaluations, apart from the adaptation",
    "adapt_ms_per_step": "mean wall time of one adapt step (segment time / its steps), milliseconds",
    "train_ms_per_step": "mean wall time of one train step (segment time / its steps), milliseconds",
    "eval_ms_per_step": "mean wall time of one eval step (segment time / its steps), milliseconds",
    "peak_memory_mb": "peak device memory: CUDA allocator peak on a GPU, process peak RSS on a CPU (MiB; reset at "
                      "the run's start where Linux allows it, see memory_kind)",
    "trainable_parameters": "number of parameters the strategy's optimizer updates (the most at any segment end)",
    "stored_elements": "tensor elements the strategy keeps beyond the backbone weights it started from: memories "
                       "(images x C x H x W, labels, logits), prompts, adapters, heads, prototypes, statistics, "
                       "teacher copies, changed backbone weights",
    "adaptation_steps": "number of adapt and train steps taken (steps that may change the model)",
    "health": "diverged if any segment had a sample with non-finite logits, else collapsed if any segment's "
              "predictions collapsed, else ok; a run that is not ok is marked in every table",
    "diverged": "true when some sample of some segment had a NaN or +inf logit, or no finite one (segments.csv: "
                "nonfinite); such a sample has no prediction and counts as an error",
    "nonfinite_samples": "samples, over all segments, whose logits held a NaN or +inf, or no finite value (-inf "
                         "alone is a masked class)",
    "diverged_segments": "segments with at least one sample of non-finite logits, in stream order",
    "collapsed_segments": "segments whose collapse_ratio = H(predicted classes) / H(true labels) (histogram "
                          "entropies over the segment) is below collapse_threshold; judged only when at least "
                          f"{MIN_EVIDENCE} labelled samples lie outside the segment's most frequent label",
    "collapse_threshold": "run.collapse_threshold: a segment is collapsed when H(predictions) < threshold * "
                          "H(labels), i.e. it uses fewer than (effective label classes)^threshold classes",
    "stopped_at": "the segment after which the run stopped because it diverged (run.on_diverge: stop)",
}


def _nan_none(v: float) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def _is_clean_interleave(meta: Any) -> bool:
    """A clean domain interleaved between shifts to probe forgetting (``meta["clean"]``): not a shift."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return False
    return isinstance(meta, Mapping) and bool(meta.get("clean"))


def clean_interleave_errors(segments: pd.DataFrame) -> Dict[str, float]:
    """Error on each interleaved clean domain, in stream order (forgetting of the source domain over time)."""
    if "meta" not in segments:
        return {}
    dom = segments[(segments["role"] == "domain") & segments["meta"].map(_is_clean_interleave)]
    return {str(r.segment): float(r.error) for r in dom.itertuples()}


def domain_errors(segments: pd.DataFrame, groups: Optional[pd.DataFrame] = None) -> Dict[str, float]:
    """Error per shifted domain; a domain segment with groups contributes one entry per group instead of one.

    Interleaved clean domains are left out (they are reported by :func:`clean_interleave_errors`).
    """
    out: Dict[str, float] = {}
    dom = segments[segments["role"] == "domain"]
    if "meta" in segments:
        dom = dom[~dom["meta"].map(_is_clean_interleave)]
    grouped = groups[groups["role"] == "domain"] if groups is not None and len(groups) else None
    for r in dom.itertuples():
        sub = grouped[grouped["segment_index"] == r.segment_index] if grouped is not None and \
            "segment_index" in segments else None
        if sub is not None and len(sub):
            for g in sub.itertuples():
                key = str(g.group) if str(g.group) not in out else f"{r.segment}/{g.group}"
                out[key] = float(g.error)
        else:
            out[str(r.segment)] = float(r.error)
    return out


def run_metrics(segments: pd.DataFrame, groups: Optional[pd.DataFrame] = None,
                details: Optional[Iterable[Mapping[str, Any]]] = None,
                collapse_threshold: float = COLLAPSE_THRESHOLD) -> Dict[str, Any]:
    """Every run metric from the segment table, the group table and the per-segment details (ECE, per class),
    and the run's health (divergence, collapse)."""
    out: Dict[str, Any] = health_summary(segments, collapse_threshold) if "segment" in segments else {}
    out["domain_error"] = domain_errors(segments, groups)
    out["mean_error"] = float(np.mean(list(out["domain_error"].values()))) if out["domain_error"] else float("nan")
    interleaved = clean_interleave_errors(segments)
    if interleaved:
        out["interleaved_clean_error"] = interleaved
    if "n" in segments and "kind" in segments:
        online = segments[segments["kind"] != "eval"]
        if len(online) and online["n"].sum():
            out["online_accuracy"] = float((online["accuracy"] * online["n"]).sum() / online["n"].sum())
        out["segment_accuracy"] = {str(r.segment): float(r.accuracy) for r in segments.itertuples()}
    probes = segments[segments["role"] == "probe"]
    start = probes[probes["segment"] == "clean@start"]
    end = probes[probes["segment"] == "clean@end"]
    if len(start) and len(end):
        a0, a1 = float(start["accuracy"].iloc[0]), float(end["accuracy"].iloc[0])
        out.update(clean_accuracy_start=a0, clean_accuracy_end=a1, source_forgetting=a0 - a1)
    if groups is not None and len(groups):
        ga: Dict[str, Dict[str, Optional[float]]] = {}
        for r in groups.itertuples():
            ga.setdefault(str(r.segment), {})[str(r.group)] = _nan_none(float(r.accuracy))
        out["group_accuracy"] = ga
        m = accuracy_matrix(groups, segments)
        out.update(matrix_metrics(m))
        start = groups[groups["segment"] == "probes@start"]
        if m is not None and len(start):  # probes of every domain before the first: forward transfer
            fwt = forward_transfer(m, {str(r.group): float(r.accuracy) for r in start.itertuples()})
            if not np.isnan(fwt):
                out["forward_transfer"] = fwt
        aaa = average_anytime_accuracy(groups, segments)
        if not np.isnan(aaa):
            out["average_anytime_accuracy"] = aaa
    if details:
        details = list(details)
        out["ece"] = {str(d["segment"]): _nan_none(d.get("ece", float("nan"))) for d in details}
        out["per_class_accuracy"] = {str(d["segment"]): d.get("per_class_accuracy") for d in details}
    return out


def definitions_for(summary: Mapping[str, Any]) -> Dict[str, str]:
    """The definitions of the metrics present in ``summary``."""
    keys: List[str] = [k for k in DEFINITIONS if k in summary or k == "domain_error"]
    keys += [k for k in summary if k.endswith("_per_group") and k[:-10] in DEFINITIONS]
    return {k: DEFINITIONS.get(k, DEFINITIONS.get(k[:-10], "")) + (" (per group)" if k.endswith("_per_group") else "")
            for k in keys}
