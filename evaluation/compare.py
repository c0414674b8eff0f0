"""Compare runs: group runs that differ only in seed, table of mean +- std (strategies x domains, mean, cost),
overlaid accuracy curves; written as CSV, Markdown and an HTML page. Runs on different streams are refused."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ctta.errors import ConfigError

from .health import health_note, worst
from .html import comparison_report
from .report import accuracy_figure, domain_error_figure, error_table, save_figure

SEED_KEYS = ("seed",)
log = logging.getLogger(__name__)


@dataclass
class RunData:
    """What a comparison needs of one run: its summary, per-step table, strategy config and folder."""

    summary: Dict[str, Any]
    steps: pd.DataFrame
    strategy_cfg: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def seed(self) -> Any:
        return self.strategy_cfg.get("seed", self.summary.get("stream_spec", {}).get("seed"))


def find_runs(paths: Sequence[str | Path]) -> List[Path]:
    """Run folders (holding summary.json) named directly or found below the given folders, in order."""
    found: List[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            cands = [p]
        elif p.is_dir():
            cands = sorted(s.parent for s in p.rglob("summary.json"))
        else:
            raise ConfigError(f"no run folder at {str(p)!r} (a run folder holds summary.json)")
        if not cands:
            raise ConfigError(f"no run found in {str(p)!r}: no summary.json below it")
        found += [c for c in cands if c not in found]
    return found


def load_run(path: Path) -> RunData:
    """Read a run folder written by the engine."""
    from .recorder import read_table

    path = Path(path)
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {str(path / 'summary.json')!r}: {e}") from None
    steps = read_table(path / "steps.csv") if (path / "steps.csv").is_file() else pd.DataFrame()
    cfg: Dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        from ctta.config import yaml_load

        cfg = (yaml_load((path / "config.yaml").read_text()) or {}).get("strategy", {}) or {}
    return RunData(summary, steps, dict(cfg), path)


def _without_seed(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if k not in SEED_KEYS}


def stream_key(run: RunData) -> str:
    return json.dumps(_without_seed(run.summary.get("stream_spec", {})), sort_keys=True, default=str)


def check_same_stream(runs: Sequence[RunData], force: bool = False) -> None:
    """Refuse runs whose stream specs differ (seed aside) unless ``force``."""
    keys = [stream_key(r) for r in runs]
    if force or len(set(keys)) <= 1:
        return
    a, b = runs[0], next(r for r, k in zip(runs, keys) if k != keys[0])
    sa, sb = _without_seed(a.summary.get("stream_spec", {})), _without_seed(b.summary.get("stream_spec", {}))
    diff = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
    name = lambda r: str(r.path) if r.path else r.summary.get("strategy")  # noqa: E731
    raise ConfigError(f"runs on different streams: {name(a)} and {name(b)} differ in {', '.join(diff)} "
                      f"({', '.join(f'{k}={sa.get(k)!r} vs {sb.get(k)!r}' for k in diff[:3])}); "
                      f"use --force to compare anyway")


def group_runs(runs: Sequence[RunData]) -> Dict[str, List[RunData]]:
    """Runs that differ only in seed share a group, labelled by strategy (plus folder when names collide)."""
    keyed: Dict[str, List[RunData]] = {}
    for r in runs:
        cfg = _without_seed(r.strategy_cfg) or {"name": r.summary.get("strategy")}
        key = json.dumps({"strategy": r.summary.get("strategy"), "cfg": cfg, "stream": stream_key(r),
                          "protocol": r.summary.get("protocol", "offline")}, sort_keys=True, default=str)
        keyed.setdefault(key, []).append(r)
    names = [g[0].summary.get("strategy", "?") + ("@realtime" if g[0].summary.get("protocol") == "realtime" else "")
             for g in keyed.values()]
    out: Dict[str, List[RunData]] = {}
    for (key, g), name in zip(keyed.items(), names):
        label = str(name)
        if names.count(name) > 1:
            label = f"{name} ({g[0].path.parent.name if g[0].path and len(g) > 1 else (g[0].path.name if g[0].path else len(out))})"
        while label in out:
            label += "'"
        out[label] = g
    return out


def aggregate(groups: Mapping[str, Sequence[RunData]]) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Mean and std (sample std, ddof=1; 0 for one seed) over each group's runs of every table column."""
    means, stds, counts = {}, {}, {}
    order: List[str] = []
    for label, runs in groups.items():
        t = error_table({str(i): r.summary for i, r in enumerate(runs)}).drop(columns="status")  # see group_status
        order += [c for c in t.columns if c not in order]
        means[label] = t.mean(axis=0, numeric_only=True)
        stds[label] = t.std(axis=0, ddof=1, numeric_only=True).fillna(0.0) if len(runs) > 1 else t.iloc[0] * 0.0
        counts[label] = len(runs)
    # domains first (in stream order), then the summary columns, whatever run had them first
    tail = [c for c in ("mean", "forgetting", "avg inc acc", "last acc", "forgetting (avalanche)", "img/s",
                        "peak MiB", "trainable (k)", "stored (k)") if c in order]
    order = [c for c in order if c not in tail] + tail
    mean = pd.DataFrame(means).T.reindex(columns=order)
    std = pd.DataFrame(stds).T.reindex(columns=order)
    return mean, std, pd.Series(counts, name="seeds")


def summary_stats(runs: Sequence[RunData]) -> Dict[str, Dict[str, float]]:
    """Mean and std across runs of every scalar number in their summaries (and of each domain's error)."""
    values: Dict[str, List[float]] = {}
    for r in runs:
        for k, v in r.summary.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault(k, []).append(float(v))
            elif k == "domain_error" and isinstance(v, dict):
                for d, e in v.items():
                    values.setdefault(f"domain_error/{d}", []).append(float(e))
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in values.items()}


def to_markdown(table: pd.DataFrame, index_label: str = "strategy") -> str:
    """A GitHub-style pipe table (no tabulate needed)."""
    cols = [index_label] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join([" --- "] + [" ---: "] * len(table.columns)) + "|"]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def mean_std_text(mean: pd.DataFrame, std: pd.DataFrame, counts: pd.Series) -> pd.DataFrame:
    """Cells 'mean +- std' (just the mean for a single seed), one decimal."""
    out = mean.copy().astype(object)
    for label in mean.index:
        for c in mean.columns:
            m, s = mean.loc[label, c], std.loc[label, c]
            out.loc[label, c] = "–" if pd.isna(m) else (f"{m:.1f} ± {s:.1f}" if counts[label] > 1 else f"{m:.1f}")
    out["seeds"] = counts
    return out


def group_status(runs: Sequence[RunData]) -> str:
    """The worst health of a group's runs, with how many of them when only some are affected."""
    statuses = [str(r.summary.get("health") or "unknown") for r in runs]
    bad = worst(statuses)
    k = sum(s == bad for s in statuses)
    return bad if k == len(runs) or bad in ("ok", "unknown") else f"{bad} ({k}/{len(runs)} seeds)"


def health_notes(groups: Mapping[str, Sequence[RunData]]) -> List[str]:
    """One line per run that diverged or collapsed (label, folder, where), in table order."""
    return [n for label, g in groups.items() for r in g
            if (n := health_note(label, r.summary, str(r.path) if r.path else ""))]


MARK = "†"
FOOTNOTE = (f"{MARK} not a healthy number: the mean includes a run that diverged (non-finite outputs) or whose "
            "predictions collapsed (see status and below)")


def mark_unhealthy(text: pd.DataFrame, status: pd.Series) -> pd.DataFrame:
    """The text table with a ``status`` column and a footnote mark on the mean of every group that is not ok."""
    out = text.copy()
    out["status"] = status
    if "mean" in out:
        for label in out.index:
            if not str(status[label]).startswith(("ok", "unknown")) and out.loc[label, "mean"] != "–":
                out.loc[label, "mean"] = f"{out.loc[label, 'mean']} {MARK}"
    return out


def _mean_curve(runs: Sequence[RunData]) -> tuple[pd.DataFrame, Optional[pd.DataFrame]]:
    """The first run's step table with accuracy replaced by the mean over runs; a +-std band when several."""
    base = runs[0].steps.reset_index(drop=True)
    if len(runs) == 1:
        return base, None
    n = min(len(r.steps) for r in runs)
    acc = np.stack([r.steps["accuracy"].to_numpy(dtype=float)[:n] for r in runs])
    mean = base.iloc[:n].copy()
    mean["accuracy"] = acc.mean(0)
    sd = acc.std(0, ddof=1)
    online = mean["kind"] != "eval"
    band = pd.DataFrame({"lo": (acc.mean(0) - sd)[online.to_numpy()], "hi": (acc.mean(0) + sd)[online.to_numpy()]})
    return mean, band


def fingerprint_notes(runs: Sequence[RunData]) -> List[str]:
    """Warnings for fingerprint fields (versions, data, weights, settings) in which the compared runs differ."""
    from ctta.provenance import fingerprint_differences

    lines = fingerprint_differences([(str(r.path or r.summary.get("strategy")), r.summary.get("fingerprint"))
                                     for r in runs])
    for line in lines:
        log.warning("comparison: %s", line)
    return [f"Warning: {line}" for line in lines]


def write_comparison_report(runs: Sequence[RunData], out: Path, force: bool = False,
                            title: Optional[str] = None) -> Dict[str, Path]:
    """comparison.csv / .md / .html, accuracy_over_time.png and domain_errors.png in ``out``."""
    if not runs:
        raise ConfigError("nothing to compare: no runs given")
    check_same_stream(runs, force)
    groups = group_runs(runs)
    mean, std, counts = aggregate(groups)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_table = mean.copy()
    for c in mean.columns:
        csv_table[f"{c} std"] = std[c]
    csv_table["seeds"] = counts
    status = pd.Series({label: group_status(g) for label, g in groups.items()}, name="status")
    csv_table["status"] = status
    csv_table.to_csv(out / "comparison.csv", index_label="strategy")
    text = mark_unhealthy(mean_std_text(mean, std, counts), status)
    marked = "mean" in text and text["mean"].astype(str).str.endswith(MARK).any()
    warnings = ([FOOTNOTE] if marked else []) + health_notes(groups) + fingerprint_notes(runs)
    stream = runs[0].summary.get("stream", "?")
    unit = "online error (%) per domain, mean, forgetting (%), img/s"
    (out / "comparison.md").write_text(f"{unit} on {stream}; mean ± std over seeds\n\n" + to_markdown(text)
                                       + "".join(f"\n{line}\n" for line in warnings))
    curves, bands = {}, {}
    for label, g in groups.items():
        if len(g[0].steps):
            curves[label], band = _mean_curve(g)
            if band is not None:
                bands[label] = band
    files = {"csv": out / "comparison.csv", "markdown": out / "comparison.md"}
    images: Dict[str, Path] = {}
    if curves:
        fig = accuracy_figure(next(iter(curves.values())), title=f"online accuracy on {stream}"
                              + (" (mean over seeds, band: +- std)" if bands else ""), others=curves, bands=bands)
        images["Accuracy over time"] = save_figure(fig, out / "accuracy_over_time.png")
    domains = [c for c in mean.columns if c in set().union(*[set(g[0].summary.get("domain_error", {}))
                                                               for g in groups.values()])]
    if domains:
        fig = domain_error_figure(mean[domains], std[domains] if (counts > 1).any() else None,
                                  title=f"online error per domain on {stream}")
        images["Error per domain"] = save_figure(fig, out / "domain_errors.png")
    files.update({"plot": images.get("Accuracy over time"), "bars": images.get("Error per domain")})
    notes = {label: ", ".join(f"{r.path or '-'} (seed {r.seed})" for r in g) for label, g in groups.items()}
    stats = {label: summary_stats(g) for label, g in groups.items()}
    (out / "comparison.json").write_text(json.dumps(stats, indent=2))
    files["json"] = out / "comparison.json"
    files["html"] = comparison_report(out / "comparison.html", title or f"Comparison on {stream}", text, images, notes,
                                      warnings)
    return {k: v for k, v in files.items() if v is not None}
