"""Self-contained HTML pages (images embedded as base64 PNG): one per run and one per comparison."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import pandas as pd

from .health import health_note
from .report import metrics_table

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f2f2f2}img{max-width:100%}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
dt{font-weight:bold;margin-top:4px}dd{margin-left:1.5em}"""


def embed_png(path: Path) -> str:
    """An <img> tag holding the PNG at ``path`` as base64 (the page needs no other file)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _table_html(table: pd.DataFrame, fmt: str = "{:.1f}") -> str:
    def f(v: Any) -> str:
        return fmt.format(v) if isinstance(v, float) else html.escape(str(v))
    return table.to_html(escape=True, formatters={c: f for c in table.columns}, na_rep="–")


def page(title: str, sections: Sequence[tuple]) -> str:
    """An HTML page from (heading, inner html) sections."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{inner}\n" for h, inner in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}</body></html>")


def _sources_html(sources: Mapping[str, Mapping[str, Any]]) -> str:
    """Where each domain's images came from: a -C file (its path) or the corruption engine (generated)."""
    rows = [{"domain": d, "source": s.get("source", ""),
             "detail": s.get("path") or ", ".join(f"{k}={v}" for k, v in s.items()
                                                  if k not in ("source", "path", "corruption", "severity"))}
            for d, s in sources.items()]
    return pd.DataFrame(rows).to_html(index=False, escape=True, na_rep="–")


def run_report(out: Path, summary: Mapping[str, Any], table: pd.DataFrame, images: Mapping[str, Path],
               config_text: Optional[str] = None) -> Path:
    """``report.html`` of one run: the paper-style table, the scalar metrics, plots, definitions and config."""
    defs = summary.get("definitions", {})
    sections = [("Online error (%) per domain", _table_html(table))]
    note = health_note(str(summary.get("strategy")), dict(summary))
    if note:
        sections.append((f"Health: {summary.get('health')}", _health_html([note])))
    sections.append(("Metrics (accuracy and error in %, forgetting in % points; summary.json keeps the fractions)",
                     _table_html(metrics_table(summary))))
    sections += [(name, embed_png(p)) for name, p in images.items() if Path(p).is_file()]
    sections.append(("Definitions", "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                                      for k, v in defs.items()) + "</dl>"))
    sections.append(("Stream spec", f"<pre>{html.escape(json.dumps(summary.get('stream_spec', {}), indent=2, default=str))}</pre>"))
    if summary.get("data_sources"):
        sections.append(("Data sources", _sources_html(summary["data_sources"])))
    if config_text:
        sections.append(("Resolved config (config.yaml)", f"<pre>{html.escape(config_text)}</pre>"))
    path = Path(out) / "report.html"
    path.write_text(page(f"{summary.get('strategy')} on {summary.get('stream')}", sections))
    return path


def _health_html(lines: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li><b>{html.escape(line)}</b></li>" for line in lines) + "</ul>"


def comparison_report(path: Path, title: str, table_md: pd.DataFrame, images: Mapping[str, Path],
                      notes: Dict[str, str], warnings: Sequence[str] = ()) -> Path:
    """The comparison page: table of mean +- std, the runs that diverged or collapsed (``warnings``), overlaid
    curves, error bars and which runs were grouped."""
    sections = [("Table (mean +- std over seeds)", _table_html(table_md))]
    if warnings:
        sections.append(("Health: runs that are not ok", _health_html(warnings)))
    sections += [(name, embed_png(p)) for name, p in images.items() if Path(p).is_file()]
    sections.append(("Runs", "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                               for k, v in notes.items()) + "</dl>"))
    Path(path).write_text(page(title, sections))
    return Path(path)
