"""Reports: the papers' per-domain error table and the accuracy-over-time plot with domain boundaries."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional

import pandas as pd


def error_table(summaries: Mapping[str, Mapping]) -> pd.DataFrame:
    """Strategies as rows, domains as columns, then the mean: online error in %, as CTTA papers print it."""
    rows = {}
    for strategy, s in summaries.items():
        row = {d: 100 * e for d, e in s["domain_error"].items()}
        row["mean"] = 100 * s["mean_error"]
        if "source_forgetting" in s:
            row["forgetting"] = 100 * s["source_forgetting"]
        if "adapt_images_per_s" in s:
            row["img/s"] = s["adapt_images_per_s"]
        rows[strategy] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def format_table(table: pd.DataFrame) -> str:
    """Fixed-width text of :func:`error_table`, domain names shortened to fit a terminal."""
    short = table.rename(columns=lambda c: str(c).replace("_noise", "").replace("_compression", "")
                         .replace("_transform", "").replace("_blur", "_b"))
    return short.to_string(float_format=lambda v: f"{v:.1f}")


def plot_accuracy(steps: pd.DataFrame, path: Path, title: str = "", window: int = 10,
                  others: Optional[Dict[str, pd.DataFrame]] = None) -> Path:
    """Online accuracy per step (thin) and its rolling mean (thick), domain boundaries as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = dict(others or {})
    if not curves:
        curves = {"accuracy": steps}
    fig, ax = plt.subplots(figsize=(11, 4))
    for label, df in curves.items():
        d = df[df["kind"] != "eval"].reset_index(drop=True)
        x = range(len(d))
        acc = 100 * d["accuracy"]
        line, = ax.plot(x, acc.to_numpy(), lw=0.6, alpha=0.35)
        # the rolling mean restarts at each domain, so a boundary is not smeared over the next window
        rolling = acc.groupby(d["segment_index"]).transform(lambda a: a.rolling(window, min_periods=1).mean())
        ax.plot(x, rolling.to_numpy(), lw=1.8, color=line.get_color(),
                label=f"{label} (rolling mean over {window} steps within a domain)")
    ref = next(iter(curves.values()))
    d = ref[ref["kind"] != "eval"].reset_index(drop=True)
    seg = d["segment"].to_numpy()
    starts = [0] + [i for i in range(1, len(seg)) if seg[i] != seg[i - 1]]
    for i, s in enumerate(starts):
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
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
