"""Report files: written, parseable, plots with the expected lines, HTML self-contained; comparing runs (seeds
grouped as mean +- std) and refusing runs of different streams."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import ctta
from ctta import strategies
from ctta.cli import main
from ctta.errors import ConfigError
from ctta.evaluation import RunData, accuracy_figure, find_runs, load_run, write_comparison_report
from ctta.streams import Stream, tensor_segment

from conftest import make_tiny


def _stream(seed: int = 0, n: int = 24) -> Stream:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % 4
    segs = [tensor_segment("clean@start", "eval", x, y, 8, role="probe")]
    segs += [tensor_segment(f"d{d}", "adapt", (x * (0.5 + 0.2 * d)).clamp(0, 1), y, 8) for d in range(2)]
    segs.append(tensor_segment("clean@end", "eval", x, y, 8, role="probe"))
    return Stream(name="toy", segments=segs, num_classes=4, spec={"name": "toy", "n": n, "seed": seed})


def _runs(tmp_path, seeds=(1, 2), names=("source", "bn")):
    for name in names:
        for s in seeds:
            ctta.run(_stream(s), strategies.create(name, make_tiny(s)), device="cpu",
                     out=tmp_path / name / f"seed-{s}", progress=False, config={"strategy": {"name": name, "seed": s}})
    return tmp_path


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory):
    """source and tent, seeds 1 and 2: written once for the tests of this file."""
    return _runs(tmp_path_factory.mktemp("runs"), seeds=(1, 2), names=("source", "tent"))


def test_run_folder_files_parse(four_runs):
    d = four_runs / "tent" / "seed-1"
    steps = pd.read_csv(d / "steps.csv")
    assert len(steps) == 12 and {"cumulative_accuracy", "rolling_accuracy"} <= set(steps.columns)
    online = steps[steps["kind"] == "adapt"]
    assert online["cumulative_accuracy"].iloc[-1] == pytest.approx(online["correct"].sum() / online["n"].sum())
    assert len(pd.read_csv(d / "segments.csv")) == 4 and len(pd.read_csv(d / "domains.csv")) == 1
    s = json.loads((d / "summary.json").read_text())
    for key in ("domain_error", "mean_error", "ece", "online_accuracy", "adapt_ms_per_step", "peak_memory_mb"):
        assert key in s and key in s["definitions"], key
    html = (d / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "mean_error" in html and "<table" in html
    assert (d / "domain_errors.png").is_file() and (d / "accuracy_over_time.png").is_file()


def test_accuracy_figure_has_a_line_per_curve_and_boundary(four_runs):
    runs = [load_run(p) for p in find_runs([four_runs / "source", four_runs / "tent" / "seed-1"])]
    fig = accuracy_figure(runs[0].steps, others={"a": runs[0].steps, "b": runs[1].steps})
    ax = fig.axes[0]
    # 2 curves x (per-step + rolling) + 1 boundary between the two domains
    assert len(ax.lines) == 2 * 2 + 1
    assert ax.get_xlabel() and "%" in ax.get_ylabel() and len(ax.get_legend().get_texts()) == 2


def test_comparison_groups_seeds_mean_std(four_runs, tmp_path):
    root = four_runs
    runs = [load_run(p) for p in find_runs([root])]
    assert len(runs) == 4
    files = write_comparison_report(runs, tmp_path / "cmp")  # the streams differ by seed only: same spec
    table = pd.read_csv(files["csv"], index_col=0)
    assert list(table.index) == ["source", "tent"] and (table["seeds"] == 2).all()
    d0 = [json.loads((root / "tent" / f"seed-{s}" / "summary.json").read_text())["domain_error"]["d0"] for s in (1, 2)]
    assert table.loc["tent", "d0"] == pytest.approx(100 * sum(d0) / 2)
    assert table.loc["tent", "d0 std"] == pytest.approx(100 * abs(d0[0] - d0[1]) / 2 ** 0.5)
    assert "±" in files["markdown"].read_text() and "base64" in files["html"].read_text()


def test_different_streams_are_refused(tmp_path, capsys):
    ctta.run(_stream(1), strategies.create("source", make_tiny()), device="cpu", out=tmp_path / "a", progress=False)
    ctta.run(_stream(1, n=16), strategies.create("source", make_tiny()), device="cpu", out=tmp_path / "b",
             progress=False)
    runs = [load_run(tmp_path / "a"), load_run(tmp_path / "b")]
    with pytest.raises(ConfigError, match="different streams.*differ in n.*--force"):
        write_comparison_report(runs, tmp_path / "cmp")
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "different streams" in err and len(err.strip().splitlines()) == 1
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp"), "--force"]) == 0
    assert (tmp_path / "cmp" / "comparison.html").is_file()


def test_cli_seed_list_runs_every_seed(tmp_path, npz_dataset, capsys):
    out = tmp_path / "r"
    assert main(["--stream", "cifar10c", "--strategy", "source,bn", "--backbone", "tiny_cnn", "--data-root",
                 str(npz_dataset), "--corruptions", "contrast", "--num-samples", "10", "--batch-size", "10",
                 "--device", "cpu", "--out", str(out), "--no-progress", "-q", "--seed", "1,2"]) == 0
    assert "±" in capsys.readouterr().out
    for name in ("source", "bn"):
        for s in (1, 2):
            summary = json.loads((out / name / f"seed-{s}" / "summary.json").read_text())
            assert summary["stream_spec"]["seed"] == s
    table = pd.read_csv(out / "comparison.csv", index_col=0)
    assert (table["seeds"] == 2).all() and "contrast-5 std" in table.columns
    assert main(["report", str(out)]) == 0  # the same runs compare again from their folders (same stream spec)
    assert pd.read_csv(out / "comparison.csv", index_col=0)["seeds"].tolist() == [2, 2]


def test_report_of_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_comparison_from_in_memory_runs(tmp_path):
    res = ctta.run(_stream(), strategies.create("source", make_tiny()), device="cpu", progress=False)
    files = write_comparison_report([RunData(res.summary, res.steps)], tmp_path)
    assert pd.read_csv(files["csv"], index_col=0).loc["source", "seeds"] == 1
