"""Reports: the papers' per-domain error table and the plots of a run (accuracy over time with domain boundaries,
the accuracy matrix as a heatmap, per-domain error bars). Each ``*_figure`` returns the matplotlib Figure (so
tests can count its lines); ``save_figure`` writes it and closes it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import pandas as pd


#: cost columns of the tables: (summary key, column, divisor): peak memory in MiB, parameter / element counts in
#: thousands
COST_COLUMNS = (("peak_memory_mb", "peak MiB", 1), ("trainable_parameters", "trainable (k)", 1e3),
                ("stored_elements", "stored (k)", 1e3))


def error_table(summaries: Mapping[str, Mapping]) -> pd.DataFrame:
    """Strategies as rows, domains as columns, then the mean: online error in %, as CTTA papers print it; last the
    run's ``status`` (ok / collapsed / diverged; unknown for a run written before health was recorded)."""
    rows = {}
    for strategy, s in summaries.items():
        row = {d: 100 * e for d, e in s["domain_error"].items()}
        row["mean"] = 100 * s["mean_error"] if s.get("mean_error") is not None else float("nan")
        for key, label in (("source_forgetting", "forgetting"), ("average_incremental_accuracy", "avg inc acc"),
                           ("last_accuracy", "last acc"), ("forgetting_avalanche", "forgetting (avalanche)")):
            if s.get(key) is not None:
                row[label] = 100 * s[key]
        realtime = s.get("realtime") or {}
        if realtime.get("relative_cost") is not None:  # realtime protocol: the method's cost and what it adapted on
            row["rel. cost"] = float(realtime["relative_cost"])
            row["adapted %"] = 100 * float(realtime.get("adapted_share") or 0)
        if s.get("adapt_images_per_s") is not None:
            row["img/s"] = s["adapt_images_per_s"]
        elif s.get("train_images_per_s") is not None:
            row["img/s"] = s["train_images_per_s"]
        for key, label, scale in COST_COLUMNS:
            if s.get(key) is not None:
                row[label] = float(s[key]) / scale
        row["status"] = s.get("health") or "unknown"
        rows[strategy] = row
    return pd.DataFrame.from_dict(rows, orient="index")


# every displayed number (terminal table, RunResult.table(), HTML, comparison cells) has this many decimals;
# the files (domains.csv, comparison.csv, summary.json) keep full precision
DISPLAY_DECIMALS = 1


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`error_table` rounded for display (``DISPLAY_DECIMALS``); the values are already percent."""
    return table.round(DISPLAY_DECIMALS)


def format_table(table: pd.DataFrame) -> str:
    """Fixed-width text of :func:`error_table`, domain names shortened to fit a terminal."""
    short = table.rename(columns=lambda c: str(c).replace("_noise", "").replace("_compression", "")
                         .replace("_transform", "").replace("_blur", "_b"))
    return short.to_string(float_format=lambda v: f"{v:.{DISPLAY_DECIMALS}f}")


# summary scalars that are fractions of samples (shown x 100 as %) or differences of two such (shown as % points)
PERCENT_METRICS = ("mean_error", "online_accuracy", "clean_accuracy_start", "clean_accuracy_end",
                   "average_incremental_accuracy", "last_accuracy", "average_anytime_accuracy")
POINT_METRICS = ("source_forgetting", "forgetting_avalanche", "forgetting_max", "backward_transfer")
UNITS = {"_images_per_s": "img/s", "_ms_per_step": "ms", "peak_memory_mb": "MiB", "trainable_parameters": "count",
         "adaptation_steps": "count", "stored_elements": "count"}


def metrics_table(summary: Mapping) -> pd.DataFrame:
    """The run's scalar metrics for display, one row each with its unit: accuracies and errors in %, forgetting
    and transfer in percentage points, cost in img/s, ms, MiB or counts (summary.json keeps the raw fractions)."""
    rows = {}
    for k, v in summary.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k in PERCENT_METRICS or k in POINT_METRICS:
            value, unit = f"{100 * v:.{DISPLAY_DECIMALS}f}", "%" if k in PERCENT_METRICS else "% points"
        else:
            unit = next((u for suffix, u in UNITS.items() if k.endswith(suffix)), "")
            value = f"{v:d}" if isinstance(v, int) else f"{v:.{DISPLAY_DECIMALS}f}" if unit else f"{v:.4g}"
        rows[k] = {"value": value, "unit": unit}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["value", "unit"])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` and free it."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def accuracy_figure(steps: pd.DataFrame, title: str = "", window: int = 10,
                    others: Optional[Dict[str, pd.DataFrame]] = None,
                    bands: Optional[Dict[str, pd.DataFrame]] = None):
    """Online accuracy per step (thin) and its rolling mean (thick) per curve, domain boundaries dashed.

    Lines: 2 per curve plus one per boundary. ``bands`` (label -> frame with columns step, lo, hi) adds a shaded
    mean +- std across seeds."""
    plt = _plt()
    curves = dict(others or {})
    if not curves:
        curves = {"accuracy": steps}
    fig, ax = plt.subplots(figsize=(11, 4))
    for label, df in curves.items():
        d = df[df["kind"] != "eval"].reset_index(drop=True)
        x = np.arange(len(d))
        acc = 100 * d["accuracy"].astype(float)
        line, = ax.plot(x, acc.to_numpy(), lw=0.6, alpha=0.35)
        # the rolling mean restarts at each domain, so a boundary is not smeared over the next window
        rolling = acc.groupby(d["segment_index"]).transform(lambda a: a.rolling(window, min_periods=1).mean())
        ax.plot(x, rolling.to_numpy(), lw=1.8, color=line.get_color(),
                label=f"{label} (rolling mean over {window} steps within a domain)")
        if bands and label in bands:
            b = bands[label]
            ax.fill_between(x[:len(b)], 100 * b["lo"].to_numpy()[:len(x)], 100 * b["hi"].to_numpy()[:len(x)],
                            color=line.get_color(), alpha=0.15, lw=0)
    ref = next(iter(curves.values()))
    d = ref[ref["kind"] != "eval"].reset_index(drop=True)
    seg = d["segment"].astype(str).to_numpy()
    starts = [0] + [i for i in range(1, len(seg)) if seg[i] != seg[i - 1]]
    for i, s in enumerate(starts if len(seg) else []):
        if i:
            ax.axvline(s, color="grey", ls="--", lw=0.8)
        ax.text(s + 0.5, 1.0, str(seg[s]).replace("_", " "), rotation=90, va="bottom", ha="left", fontsize=7,
                transform=ax.get_xaxis_transform())
    ax.set_xlabel("step (batch) in the stream")
    ax.set_ylabel("online accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "online accuracy over time", pad=60)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    return fig


def plot_accuracy(steps: pd.DataFrame, path: Path, title: str = "", window: int = 10,
                  others: Optional[Dict[str, pd.DataFrame]] = None) -> Path:
    """Write :func:`accuracy_figure` to ``path``."""
    return save_figure(accuracy_figure(steps, title, window, others), path)


def matrix_figure(values: Sequence[Sequence[Optional[float]]], rows: Sequence[str], columns: Sequence[str],
                  title: str = ""):
    """The accuracy matrix R[i, j] (%) as an annotated heatmap: rows = after learning, columns = evaluated on."""
    plt = _plt()
    R = 100 * np.array([[np.nan if v is None else v for v in r] for r in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * max(len(columns), 3), 1.2 + 0.5 * max(len(rows), 3)))
    im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
    annotate_cells(ax, R, white=lambda v: v < 60, fontsize=7, max_cells=400)
    ax.set_xlabel("evaluated on (session / domain)")
    ax.set_ylabel("after learning")
    ax.set_title(title or "accuracy matrix R[i, j] (%)")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    return fig


def annotate_cells(ax: Any, values: np.ndarray, white: Callable[[float], bool], fontsize: int,
                   max_cells: int) -> None:
    """Write each finite cell's value (no decimals) on a heat map, in white where ``white(value)``; skipped for
    grids of more than ``max_cells`` cells (unreadable)."""
    if values.size > max_cells:
        return
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=fontsize,
                        color="white" if white(values[i, j]) else "black")


def domain_error_figure(mean: pd.DataFrame, std: Optional[pd.DataFrame] = None, title: str = ""):
    """Grouped bars of the error (%) per domain, one bar per row of ``mean`` (strategies); ``std`` gives the
    whiskers (std across seeds)."""
    plt = _plt()
    cols = list(mean.columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(cols) * max(len(mean), 1) + 2), 4))
    width = 0.8 / max(len(mean), 1)
    x = np.arange(len(cols))
    for k, (label, row) in enumerate(mean.iterrows()):
        err = None
        if std is not None and label in std.index:
            err = std.loc[label, cols].to_numpy(dtype=float)
        ax.bar(x + (k - (len(mean) - 1) / 2) * width, row.to_numpy(dtype=float), width, yerr=err, capsize=2,
               label=str(label))
    ax.set_xticks(x, [str(c).replace("_", " ") for c in cols], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("error (%)")
    ax.set_xlabel("domain")
    ax.set_title(title or "error per domain" + (" (mean +- std over seeds)" if std is not None else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
