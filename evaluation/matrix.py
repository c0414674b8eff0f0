"""The accuracy matrix R[i, j] and the continual-learning numbers read off it (incremental accuracy, forgetting).

Convention (docs/evaluation.md): an ``eval`` segment with ``meta["after"] = i`` (the last learned segment) and
``groups`` = the sessions/domains whose test data it holds gives row i; R[i, j] is its accuracy on group j. When
several eval segments share one ``after``, the last one is the row (as Avalanche keeps the last value).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import pandas as pd


@dataclass
class AccuracyMatrix:
    """R (accuracy), N (samples) and C (correct) with rows = learned segments, columns = evaluated groups.

    Entries are NaN / 0 where a row did not evaluate a group. ``learned`` is the order in which the groups were
    learned (the learned segments' names in stream order), used for "seen" and for forgetting.
    """

    rows: List[str]
    columns: List[str]
    R: np.ndarray
    N: np.ndarray
    C: np.ndarray

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.R, index=self.rows, columns=self.columns)

    def to_dict(self) -> Dict[str, object]:
        return {"rows": self.rows, "columns": self.columns,
                "values": [[None if np.isnan(v) else float(v) for v in r] for r in self.R]}

    def _col(self, name: str) -> Optional[int]:
        return self.columns.index(name) if name in self.columns else None

    def seen_columns(self, i: int) -> List[int]:
        """Columns learned at or before row i: a column named like a row up to i, or by position when no column
        is named like a learned segment (e.g. groups named by their classes)."""
        named = [self._col(r) for r in self.rows[:i + 1]]
        if any(c is not None for c in named) or not self.columns:
            return [c for c in named if c is not None]
        return list(range(min(i + 1, len(self.columns))))

    def diag_col(self, i: int) -> Optional[int]:
        """The column of the group learned in row i (by name, else by position)."""
        c = self._col(self.rows[i])
        if c is None and not any(self._col(r) is not None for r in self.rows) and i < len(self.columns):
            c = i
        return c


def accuracy_matrix(groups: pd.DataFrame, segments: pd.DataFrame) -> Optional[AccuracyMatrix]:
    """Build R from the groups table (segment_index, segment, kind, after, group, n, correct) of eval segments.

    Rows are ordered as the learned segments appear in the stream; None when no eval segment names an ``after``.
    """
    if groups is None or not len(groups) or "after" not in groups:
        return None
    g = groups[(groups["kind"] == "eval") & groups["after"].notna() & (groups["after"].astype(str) != "")]
    if not len(g):
        return None
    g = g.assign(after=g["after"].astype(str))
    learned = [str(s) for s in segments[segments["kind"] != "eval"]["segment"]] if len(segments) else []
    # the last eval segment for each `after`
    last_idx = g.groupby("after")["segment_index"].max()
    g = g[g["segment_index"] == g["after"].map(last_idx)]
    rows = sorted(last_idx.index, key=lambda a: (learned.index(a) if a in learned else len(learned),
                                                 int(last_idx[a])))
    columns: List[str] = []
    for name in list(g.sort_values("segment_index")["group"].astype(str)):
        if name not in columns:
            columns.append(name)
    order = {c: k for k, c in enumerate(learned)}
    columns.sort(key=lambda c: order.get(c, len(order)))  # stable: unknown names keep their first-seen order
    R = np.full((len(rows), len(columns)), np.nan)
    N = np.zeros((len(rows), len(columns)), dtype=np.int64)
    C = np.zeros((len(rows), len(columns)), dtype=np.int64)
    for r in g.itertuples():
        i, j = rows.index(r.after), columns.index(str(r.group))
        N[i, j], C[i, j] = int(r.n), int(r.correct)
        R[i, j] = r.correct / r.n if r.n else np.nan
    return AccuracyMatrix(rows, columns, R, N, C)


def seen_accuracy(m: AccuracyMatrix, i: int) -> float:
    """Accuracy on all groups learned so far after row i: correct / samples pooled over the seen groups
    (PyCIL's accuracy on the test set of all seen classes)."""
    cols = m.seen_columns(i)
    n = m.N[i, cols].sum()
    return float(m.C[i, cols].sum() / n) if n else float("nan")


def average_incremental_accuracy(m: AccuracyMatrix) -> float:
    """Mean over rows (sessions) of the accuracy on all seen groups (PyCIL's 'Average Accuracy')."""
    vals = [seen_accuracy(m, i) for i in range(len(m.rows))]
    return float(np.nanmean(vals)) if vals else float("nan")


def last_accuracy(m: AccuracyMatrix) -> float:
    """Accuracy on all seen groups after the last row (PyCIL's last entry of the top-1 curve)."""
    return seen_accuracy(m, len(m.rows) - 1) if m.rows else float("nan")


def _pairs(m: AccuracyMatrix):
    """(j-row, column) of every group learned before the last row and evaluated in the last row."""
    last = len(m.rows) - 1
    for i in range(last):
        c = m.diag_col(i)
        if c is not None and not np.isnan(m.R[i, c]) and not np.isnan(m.R[last, c]):
            yield i, c


def forgetting_avalanche(m: AccuracyMatrix) -> Dict[str, float]:
    """Avalanche's ExperienceForgetting per group: R[j, j] (right after learning j) - R[T, j] (after the last row);
    groups learned in the last row have none."""
    last = len(m.rows) - 1
    return {m.columns[c]: float(m.R[i, c] - m.R[last, c]) for i, c in _pairs(m)}


def forgetting_max(m: AccuracyMatrix) -> Dict[str, float]:
    """Chaudhry et al. (2018) per group: max over rows l in [j, T-1] of R[l, j] - R[T, j] (the best accuracy ever
    had on j before the last row, minus the final one)."""
    last = len(m.rows) - 1
    return {m.columns[c]: float(np.nanmax(m.R[i:last, c]) - m.R[last, c]) for i, c in _pairs(m)}


def backward_transfer(m: AccuracyMatrix) -> float:
    """Lopez-Paz & Ranzato (2017): BWT = mean over j < T of R[T, j] - R[j, j] (negative: forgetting)."""
    last = len(m.rows) - 1
    vals = [m.R[last, c] - m.R[i, c] for i, c in _pairs(m)]
    return float(np.mean(vals)) if vals else float("nan")


def forward_transfer(m: AccuracyMatrix, initial: Dict[str, float]) -> float:
    """Lopez-Paz & Ranzato (2017): FWT = mean over rows i >= 1 of R[i-1, j_i] - b_j (j_i the group learned in row i,
    b_j the accuracy on it before anything was learned, ``initial``); needs rows that evaluate future groups."""
    vals = []
    for i in range(1, len(m.rows)):
        c = m.diag_col(i)
        if c is not None and m.columns[c] in initial and not np.isnan(m.R[i - 1, c]):
            vals.append(m.R[i - 1, c] - initial[m.columns[c]])
    return float(np.mean(vals)) if vals else float("nan")


def mean_or_nan(d: Dict[str, float]) -> float:
    return float(np.mean(list(d.values()))) if d else float("nan")


def matrix_metrics(m: Optional[AccuracyMatrix], anytime_rows: Optional[List[float]] = None) -> Dict[str, object]:
    """Every matrix-derived number of a run (empty when there is no matrix)."""
    if m is None or not m.rows:
        return {}
    fa, fm = forgetting_avalanche(m), forgetting_max(m)
    out: Dict[str, object] = {
        "accuracy_matrix": m.to_dict(),
        "seen_accuracy": {r: seen_accuracy(m, i) for i, r in enumerate(m.rows)},
        "average_incremental_accuracy": average_incremental_accuracy(m),
        "last_accuracy": last_accuracy(m),
        "forgetting_avalanche": mean_or_nan(fa), "forgetting_avalanche_per_group": fa,
        "forgetting_max": mean_or_nan(fm), "forgetting_max_per_group": fm,
        "backward_transfer": backward_transfer(m),
    }
    return out


def average_anytime_accuracy(groups: pd.DataFrame, segments: pd.DataFrame) -> float:
    """Mean over every eval segment with an ``after`` (not only the last per row) of its accuracy on the groups
    learned so far: evaluations inside a session count too (anytime inference, Koh et al. 2022; Caccia et al.)."""
    if groups is None or not len(groups) or "after" not in groups:
        return float("nan")
    g = groups[(groups["kind"] == "eval") & groups["after"].notna() & (groups["after"].astype(str) != "")]
    if not len(g):
        return float("nan")
    learned = [str(s) for s in segments[segments["kind"] != "eval"]["segment"]]
    vals = []
    for _, e in g.groupby("segment_index"):
        after = str(e["after"].iloc[0])
        seen = set(learned[:learned.index(after) + 1]) if after in learned else set()
        sel = e[e["group"].astype(str).isin(seen)] if seen & set(e["group"].astype(str)) else e
        n = sel["n"].sum()
        if n:
            vals.append(sel["correct"].sum() / n)
    return float(np.mean(vals)) if vals else float("nan")
