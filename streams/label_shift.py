"""Label shift for test streams: index schedules over a label tensor, seeded and pure (no images touched).

Two families, combinable (at most one of each in a spec):

- **Temporal correlation** (``dirichlet``): the same samples, reordered so that classes come in runs. The scheme of
  NOTE (Gong et al., NeurIPS 2022), reused by RoTTA and the Döbler et al. benchmark: every class is split over
  K chunks with proportions drawn from Dir(delta * 1_K) (chunks already holding N/K samples get no more), then
  the chunks are played one after the other, each as its class pieces in a random class order. delta -> 0 gives
  one class per chunk (runs of about N/K), a large delta an equal share of every class in every chunk.
- **Marginal prior shift** (``longtail``, ``zipf``): a subset whose class histogram is imbalanced.
  ``longtail`` (Label Shift Adapter, Park et al., ICCV 2023, arXiv 2308.08810): n_k = n_max * rho^(-k/(K-1)),
  ``forward`` (class 0 most frequent), ``backward`` (reversed) or ``uniform`` (balanced, n_max each).
  ``zipf`` (LAME, Boudiaf et al., CVPR 2022): class proportions are i.i.d. Zipf(a) draws, normalised, redrawn until
  the top 10% of classes hold less than 90% of the samples. Unlike LAME (which samples with replacement) we draw
  without replacement, so the total shrinks until every class can supply its share: no sample repeats.

A spec is a mapping ``{kind: dirichlet, delta: 0.1}``, ``{kind: longtail, rho: 100, direction: forward}``,
``{kind: zipf, a: 2}``, a bare kind name (its defaults), a list of such, or None (no label shift).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ctta.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("dirichlet", "longtail", "zipf")
DIRECTIONS = ("forward", "backward", "uniform")
# defaults: delta 0.1 as RoTTA / NOTE; rho 100 as the LSA long-tail targets; a=2 as LAME's zipf_imbalance
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "dirichlet": {"delta": 0.1},
    "longtail": {"rho": 100.0, "direction": "forward"},
    "zipf": {"a": 2.0, "top_fraction": 0.1, "top_share": 0.9},
}
_MAX_TRIES = 1000


def _number(value: Any, key: str, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ConfigError(f"label_shift {kind}: {key} must be a number, got {value!r}")
    return float(value)


def check_label_shift(spec: Any) -> List[Dict[str, Any]]:
    """Validate a label-shift spec and return it as a list of complete dicts (defaults filled); [] for none."""
    if spec is None or spec is False or spec == "none" or spec == []:
        return []
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out: List[Dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            item = {"kind": item}
        if not isinstance(item, Mapping):
            raise ConfigError(f"label_shift must be a mapping like {{kind: dirichlet, delta: 0.1}}, a kind name or a "
                              f"list of them, got {item!r}")
        kind = item.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"label_shift kind must be one of {', '.join(KINDS)}, got {kind!r}")
        unknown = sorted(set(item) - set(DEFAULTS[kind]) - {"kind"})
        if unknown:
            raise ConfigError(f"label_shift {kind} has no key {', '.join(map(repr, unknown))}; "
                              f"it takes: {', '.join(DEFAULTS[kind])}")
        full: Dict[str, Any] = {"kind": kind, **DEFAULTS[kind], **{k: v for k, v in item.items() if k != "kind"}}
        if kind == "dirichlet":
            full["delta"] = _number(full["delta"], "delta", kind)
            if full["delta"] <= 0:
                raise ConfigError(f"label_shift dirichlet: delta must be > 0 (small = long single-class runs), "
                                  f"got {full['delta']!r}")
        elif kind == "longtail":
            full["rho"] = _number(full["rho"], "rho", kind)
            if full["rho"] < 1:
                raise ConfigError(f"label_shift longtail: imbalance ratio rho must be >= 1 (max/min class count), "
                                  f"got {full['rho']!r}")
            if full["direction"] not in DIRECTIONS:
                raise ConfigError(f"label_shift longtail: direction must be one of {', '.join(DIRECTIONS)}, "
                                  f"got {full['direction']!r}")
        else:
            full["a"] = _number(full["a"], "a", kind)
            if full["a"] <= 1:
                raise ConfigError(f"label_shift zipf: exponent a must be > 1, got {full['a']!r}")
            for key in ("top_fraction", "top_share"):
                full[key] = _number(full[key], key, kind)
                if not 0 < full[key] <= 1:
                    raise ConfigError(f"label_shift zipf: {key} must be in (0, 1], got {full[key]!r}")
        out.append(full)
    kinds = [d["kind"] for d in out]
    if kinds.count("dirichlet") > 1 or sum(k in ("longtail", "zipf") for k in kinds) > 1:
        raise ConfigError(f"label_shift combines at most one reordering (dirichlet) and one prior shift "
                          f"(longtail or zipf), got {kinds}")
    return out


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def dirichlet_order(labels: Tensor, delta: float, seed: int, min_chunk: Optional[int] = None) -> Tensor:
    """A permutation of ``range(len(labels))`` with classes temporally correlated (NOTE's Dirichlet chunks).

    The class histogram is unchanged (it is a permutation). ``min_chunk`` (default min(10, N / 2K)) is the smallest
    chunk size accepted; up to 1000 draws are tried and the one with the largest smallest chunk is kept.
    """
    if delta <= 0:
        raise ConfigError(f"dirichlet delta must be > 0, got {delta!r}")
    y = labels.detach().cpu().numpy().astype(np.int64)
    n = len(y)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    classes = np.unique(y)
    k = len(classes)
    rng = _rng(seed)
    threshold = min(10, n // (2 * k)) if min_chunk is None else min_chunk
    members = [np.flatnonzero(y == c) for c in classes]
    best, best_min = None, -1
    for _ in range(_MAX_TRIES):
        pieces: List[Dict[int, np.ndarray]] = [dict() for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for c, idx in zip(classes, members):
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, delta))
            p = p * (sizes < n / k)  # balance: a full chunk takes no more
            if not np.isfinite(p).all() or p.sum() <= 0:  # all mass on full chunks: one open chunk at random
                open_ = np.flatnonzero(sizes < n / k)
                p = np.zeros(k)
                p[rng.choice(open_) if len(open_) else int(np.argmin(sizes))] = 1.0
            p = p / p.sum()
            ends = (np.cumsum(p) * len(idx)).astype(np.int64)
            ends[-1] = len(idx)
            starts = np.concatenate([[0], ends[:-1]])
            for j in np.flatnonzero(ends > starts):  # only the chunks that get a piece of this class
                pieces[j][int(c)] = idx[starts[j]:ends[j]]
                sizes[j] += ends[j] - starts[j]
        if sizes.min() > best_min:
            best, best_min = pieces, int(sizes.min())
        if best_min >= threshold:
            break
    else:
        log.warning("dirichlet order (delta=%g): smallest chunk holds %d samples (< %d)", delta, best_min, threshold)
    order: List[np.ndarray] = []
    for chunk in best:
        for c in rng.permutation(classes):
            part = chunk.get(int(c))
            if part is not None and len(part):
                order.append(part)
    return torch.from_numpy(np.concatenate(order)).long()


def longtail_counts(num_classes: int, n_max: int, rho: float, direction: str = "forward") -> List[int]:
    """Per-class counts n_k = round(n_max * rho^(-k/(K-1))) (forward), reversed (backward), or n_max each (uniform)."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"long-tail direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if rho < 1:
        raise ConfigError(f"imbalance ratio rho must be >= 1, got {rho!r}")
    if direction == "uniform" or num_classes == 1:
        return [int(n_max)] * num_classes
    counts = [int(round(n_max * rho ** (-i / (num_classes - 1)))) for i in range(num_classes)]
    return counts[::-1] if direction == "backward" else counts


def zipf_proportions(num_classes: int, a: float, seed: int, top_fraction: float = 0.1,
                     top_share: float = 0.9) -> np.ndarray:
    """LAME's class prior: i.i.d. Zipf(a) weights normalised, redrawn until the top classes hold < ``top_share``."""
    rng = _rng(seed)
    top = max(1, int(top_fraction * num_classes))
    for _ in range(_MAX_TRIES):
        w = rng.zipf(a, num_classes).astype(np.float64)
        p = w / w.sum()
        if np.sort(p)[-top:].sum() < top_share or num_classes == 1:
            return p
    raise ConfigError(f"zipf label shift: no prior with the top {top} class(es) under {top_share:.0%} of the samples "
                      f"in {_MAX_TRIES} draws (a={a}); use a larger a or top_share")


def prior_counts(shift: Mapping[str, Any], available: Sequence[int], budget: Optional[int], seed: int) -> List[int]:
    """Per-class sample counts for a ``longtail`` or ``zipf`` shift, given what each class has and a total budget.

    ``available[k]`` is the number of samples of class k; ``budget`` caps the total (None: as many as possible).
    Raises ConfigError when the rarest class would get no sample.
    """
    avail = [int(a) for a in available]
    k = len(avail)
    cap = budget if budget is not None else sum(avail)
    if shift["kind"] == "longtail":
        rho, direction = float(shift["rho"]), shift["direction"]

        def total(m: int) -> List[int]:
            return longtail_counts(k, m, rho, direction)

        # the largest n_max that every class can supply, that fits the budget and (where one exists) that makes
        # max/min exactly rho; else the largest feasible one (rho then holds up to rounding)
        hi = min(avail) if direction == "uniform" else max(avail)
        feasible = [m for m in range(hi, 0, -1)
                    if sum(total(m)) <= cap and all(c <= a for c, a in zip(total(m), avail)) and min(total(m)) >= 1]
        exact = [m for m in feasible if abs(max(total(m)) / min(total(m)) - rho) < 1e-9]
        m = exact[0] if exact else (feasible[0] if feasible else 0)
        counts = total(m)
        if m == 0 or min(counts) < 1:
            need = int(np.ceil(rho))
            raise ConfigError(f"long-tail label shift rho={rho:g} needs {need} samples of the most frequent class "
                              f"(about {sum(total(need))} in all) so that the rarest keeps one; the data allow "
                              f"{max(avail)} and a total of {cap}: use a smaller rho or more samples")
        return counts
    p = zipf_proportions(k, float(shift["a"]), seed, float(shift["top_fraction"]), float(shift["top_share"]))
    scale = min(cap, min(a / q for a, q in zip(avail, p) if q > 0))
    counts = [min(int(np.floor(scale * q)), a) for q, a in zip(p, avail)]
    if sum(counts) == 0:
        raise ConfigError("zipf label shift left no sample; use more samples")
    return counts


def select_counts(labels: Tensor, classes: Sequence[int], counts: Sequence[int]) -> Tensor:
    """Positions of the first ``counts[i]`` samples of class ``classes[i]`` in ``labels``, in their original order."""
    y = labels.detach().cpu()
    keep = torch.zeros(len(y), dtype=torch.bool)
    for c, n in zip(classes, counts):
        pos = torch.nonzero(y == int(c)).flatten()
        if len(pos) < n:
            raise ConfigError(f"label shift needs {n} samples of class {c}, only {len(pos)} available")
        keep[pos[:n]] = True
    return torch.nonzero(keep).flatten()


def run_lengths(labels: Tensor) -> Tensor:
    """Lengths of the runs of equal consecutive labels (a diagnostic of temporal correlation)."""
    y = labels.detach().cpu()
    if len(y) == 0:
        return torch.zeros(0, dtype=torch.long)
    change = torch.nonzero(y[1:] != y[:-1]).flatten() + 1
    bounds = torch.cat([torch.tensor([0]), change, torch.tensor([len(y)])])
    return bounds[1:] - bounds[:-1]


__all__ = ["DIRECTIONS", "KINDS", "check_label_shift", "dirichlet_order", "longtail_counts", "prior_counts",
           "run_lengths", "select_counts", "zipf_proportions"]
