"""A strategies x scenarios comparison: one table and one heat map over the runs of a scenario sweep.

The sweep machinery (:mod:`ctta.sweep`) writes one comparison report per stream entry; a scenario grid such as
``configs/sweeps/unitta36.yaml`` has 36 stream entries (one per UniTTA scenario), so this module adds the view
across them: the error of every strategy on every scenario (mean +- std over seeds), written as
``scenario_grid.{csv,md,png}`` in the sweep folder. It reads run folders only (``summary.json``); the sweep
runner at the bottom (:func:`scenario_sweep`, ``python -m ctta.evaluation.scenario_grid GRID``) calls
:func:`ctta.sweep.sweep` unchanged, then this report.

The error is over all samples of the stream (``100 - online accuracy``), the UniTTA measure: with imbalanced
domains a per-domain mean would weight a tail domain like the head one. ``domain-mean error`` (the mean of the
per-domain errors) is in the CSV too.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ctta.errors import ConfigError

log = logging.getLogger(__name__)
FILES = ("scenario_grid.csv", "scenario_grid.md", "scenario_grid.png")



def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per run under a sweep folder ``<root>/<stream>/<backbone>/<strategy>/seed-<s>/summary.json``:
    scenario (the stream spec's ``scenario``, else the folder label), UniTTA code, strategy label, seed, error."""
    root = Path(root)
    rows: List[Dict[str, Any]] = []
    for path in sorted(root.glob("*/*/*/seed-*/summary.json")):
        run = path.parent
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("scenario grid: skipping %s (%s)", run, e)
            continue
        spec = summary.get("stream_spec") or {}
        acc = summary.get("online_accuracy")
        err = 100.0 * (1.0 - float(acc)) if acc is not None else summary.get("mean_error")
        rows.append({"scenario": spec.get("scenario") or run.parents[2].name, "code": spec.get("unitta_code"),
                     "backbone": run.parents[1].name, "strategy": run.parent.name,
                     "seed": run.name.split("-", 1)[1], "error": err, "domain_mean_error": summary.get("mean_error"),
                     "num_samples": spec.get("num_samples"), "run": str(run)})
    if not rows:
        raise ConfigError(f"no run found under {str(root)!r} (<stream>/<backbone>/<strategy>/seed-<s>/summary.json)")
    return pd.DataFrame(rows)


def _order(values: Iterable[str], preferred: Sequence[str]) -> List[str]:
    vals = list(dict.fromkeys(values))
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(vals, key=lambda v: (rank.get(v, len(rank)), vals.index(v)))


def scenario_table(runs: pd.DataFrame, strategies: Optional[Sequence[str]] = None,
                   scenarios: Optional[Sequence[str]] = None):
    """Mean and std over seeds of the error: two DataFrames, strategies (rows) x scenarios (columns, in the order
    of ``scenarios``, e.g. the grid's, else as found)."""
    g = runs.groupby(["strategy", "scenario"])["error"]
    mean, std = g.mean().unstack("scenario"), g.std(ddof=0).unstack("scenario")
    cols = _order(runs["scenario"], list(scenarios or []))
    rows = _order(runs["strategy"], list(strategies or []))
    return mean.reindex(index=rows, columns=cols), std.reindex(index=rows, columns=cols)


def heatmap_figure(mean: pd.DataFrame, codes: Optional[Dict[str, str]] = None, title: str = ""):
    """The strategies x scenarios error (%) as an annotated heat map (darker = lower error)."""
    from .report import _plt, annotate_cells

    plt = _plt()
    e = mean.to_numpy(dtype=float)
    labels = [f"{codes.get(c) or ''} {c}".strip() if codes else str(c) for c in mean.columns]
    fig, ax = plt.subplots(figsize=(2.5 + 0.36 * max(len(mean.columns), 4), 2.8 + 0.45 * max(len(mean), 2)))
    finite = e[np.isfinite(e)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    im = ax.imshow(e, cmap="viridis_r", aspect="auto", vmin=lo, vmax=hi if hi > lo else lo + 1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(mean.index)), [str(r) for r in mean.index], fontsize=8)
    mid = (lo + hi) / 2
    annotate_cells(ax, e, white=lambda v: v > mid, fontsize=6, max_cells=600)
    ax.set_xlabel("scenario")
    ax.set_ylabel("strategy")
    ax.set_title(title or "error (%) per strategy and scenario")
    fig.colorbar(im, ax=ax, label="error (%)")
    fig.tight_layout()
    return fig


def markdown_table(mean: pd.DataFrame, std: pd.DataFrame, codes: Dict[str, str], seeds: int,
                   sizes: Optional[Dict[str, Any]] = None) -> str:
    """Scenarios as rows (36 columns would not read), strategies as columns, the best of each row in bold;
    ``sizes`` (scenario -> samples in its stream) adds a column N."""
    strategies = list(mean.index)
    sizes = sizes or {}
    head = "| scenario | UniTTA | N | " + " | ".join(strategies) + " |"
    lines = [head, "| --- | --- | ---: | " + " | ".join("---:" for _ in strategies) + " |"]
    for sc in mean.columns:
        col = mean[sc]
        best = col.min() if col.notna().any() else None
        cells = []
        for st in strategies:
            v = col[st]
            if pd.isna(v):
                cells.append("–")
                continue
            txt = f"{v:.1f}" + (f" ± {std.loc[st, sc]:.1f}" if seeds > 1 and pd.notna(std.loc[st, sc]) else "")
            cells.append(f"**{txt}**" if best is not None and np.isclose(v, best) else txt)
        n = sizes.get(sc)
        lines.append(f"| {sc} | {codes.get(sc) or ''} | {'' if n is None or pd.isna(n) else int(n)} | "
                     + " | ".join(cells) + " |")
    means = [f"{mean.loc[st].mean():.1f}" for st in strategies]
    lines.append("| **mean over scenarios** | | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def write_scenario_grid(root: str | Path, out: Optional[str | Path] = None,
                        strategies: Optional[Sequence[str]] = None, title: str = "",
                        scenarios: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """Write ``scenario_grid.csv`` (every run), ``.md`` (the table) and ``.png`` (the heat map) for the sweep
    folder ``root`` (into ``out``, default ``root``); returns the paths by kind."""
    from .report import save_figure

    runs = collect_runs(root)
    folder = Path(out or root)
    folder.mkdir(parents=True, exist_ok=True)
    mean, std = scenario_table(runs, strategies, scenarios)
    codes = {r.scenario: r.code for r in runs.itertuples() if isinstance(r.code, str)}
    seeds = int(runs.groupby(["strategy", "scenario"])["seed"].nunique().max())
    csv = folder / FILES[0]
    runs.drop(columns=["run"]).to_csv(csv, index=False)
    md = folder / FILES[1]
    note = (f"{len(mean.columns)} scenarios x {len(mean.index)} strategies; error (%) over all samples of each "
            f"stream{', mean ± std over ' + str(seeds) + ' seeds' if seeds > 1 else ''}; best per scenario in bold.")
    sizes = runs.groupby("scenario")["num_samples"].first().to_dict()
    md.write_text(f"# {title or 'Scenario grid'}\n\n{note} N: samples in the scenario's stream.\n\n"
                  f"{markdown_table(mean, std, codes, seeds, sizes)}\n")
    png = save_figure(heatmap_figure(mean, codes, title), folder / FILES[2])
    return {"csv": csv, "markdown": md, "heatmap": Path(png)}


# ---------------------------------------------------------------- the sweep path

def scenario_sweep(grid: Any, out: Optional[str | Path] = None, overrides: Iterable[str] = (),
                   backend: str = "auto", progress: bool = True, report: bool = True):
    """:func:`ctta.sweep.sweep` over a scenario grid, then :func:`write_scenario_grid` into the sweep folder.
    Returns the sweep result and the grid report's files."""
    from ctta import sweep as sw

    g = sw.load_grid(grid)
    result = sw.sweep(g, out=out, overrides=overrides, backend=backend, progress=progress, report=report)
    return result, grid_report(g, result)


def scenario_names(grid: Mapping[str, Any]) -> List[str]:
    """The scenarios of a grid's streams in grid order (entries with a ``scenario``); empty when it has none."""
    return [str(s.get("label") or s["scenario"]) for s in grid.get("streams") or []
            if isinstance(s, Mapping) and s.get("scenario")]


def grid_report(grid: Mapping[str, Any], result: Any) -> Dict[str, Path]:
    """The strategies x scenarios report of a finished sweep over a scenario grid ({} when it is not one)."""
    scenarios = scenario_names(grid)
    if not scenarios or not any(r.status != "failed" for r in result.runs):
        return {}
    names = [s if isinstance(s, str) else s.get("label") or s.get("name") for s in grid.get("strategies") or []]
    return write_scenario_grid(result.out, strategies=names, title="Scenario grid", scenarios=scenarios)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctta.evaluation.scenario_grid",
                                description="run a scenario sweep grid, then its strategies x scenarios report "
                                            "(or, with --report-only, only the report of a finished sweep folder)")
    p.add_argument("grid", help="sweep grid (YAML file or packaged name, e.g. unitta36), or with --report-only the "
                                "sweep folder")
    p.add_argument("--out", help="sweep folder (default: the grid's out)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every run")
    p.add_argument("--local", action="store_true", help="no Ray: one run after another in this process")
    p.add_argument("--no-reports", action="store_true", help="skip the per-scenario comparison reports")
    p.add_argument("--report-only", action="store_true", help="GRID is a finished sweep folder: write its report")
    p.add_argument("--strategies", help="row order of the report, comma-separated (default: the grid's, or as found)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.report_only:
            files = write_scenario_grid(a.grid, a.out, strategies=a.strategies.split(",") if a.strategies else None)
        else:
            from ctta.sweep import format_result

            result, files = scenario_sweep(a.grid, a.out, a.set, "local" if a.local else "auto",
                                           progress=not a.no_progress, report=not a.no_reports)
            c = result.counts()
            print(f"Sweep of {len(result.runs)} runs ({result.seconds:.1f} s): {c['done']} ran, {c['skipped']} "
                  f"skipped, {c['failed']} failed" + "".join(f"\n  FAILED {r.id}: {r.error}" for r in result.failed))
            if a.no_reports is False and result.reports:
                log.debug(format_result(result))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if files:
        print(files["markdown"].read_text())
        print(f"(heat map: {files['heatmap']}; every run: {files['csv']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
