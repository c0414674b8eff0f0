"""The offline default end to end: the real digits experiment (about 20 s on an idle 2-core CPU)."""
from __future__ import annotations

import json
from pathlib import Path

from ctta.cli import main


def test_offline_default_runs_and_adaptation_helps(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--no-progress", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "Online error (%) per domain on digits_c" in printed and str(out) in printed
    summaries = {s: json.loads((out / s / "summary.json").read_text()) for s in ("source", "bn", "tent", "cotta")}
    assert summaries["source"]["clean_accuracy_start"] > 0.9  # the cached source model learned the clean digits
    src = summaries["source"]["mean_error"]
    for s in ("bn", "tent", "cotta"):
        assert summaries[s]["mean_error"] < src - 0.1, (s, summaries[s]["mean_error"], src)
    assert (out / "comparison.csv").is_file() and (out / "accuracy_over_time.png").is_file()
    # the last lines name the pages as they are on disk: each run's report.html, the comparison at the root
    pages = printed.split("Reports (open in a browser):")[1].split()
    pages = [p for p in pages if p.endswith(".html")]
    assert pages == [str(out / s / "report.html") for s in ("source", "bn", "tent", "cotta")] + \
        [str(out / "comparison.html")]
    assert all(Path(p).is_file() for p in pages)
