"""Divergence and collapse are detected per segment and marked in every table, never silently averaged."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import ctta
from ctta.cli import main
from ctta.errors import ConfigError, DivergedError, NonFiniteInputError
from ctta.evaluation import SegmentAccumulator, load_run, write_comparison_report
from ctta.evaluation.health import collapse_ratio

from conftest import make_tiny, stripe_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(seed: int) -> nn.Module:
    """TinyNet fitted for 40 steps on 4-class stripe images (seed 1: 75% accurate, 2: 100%)."""
    m = make_tiny(seed, 4)
    x, y = stripe_data([0, 1, 2, 3], n_per=16, seed=seed)
    m.train()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(40):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return {1: _trained(1), 2: _trained(2)}


def _stream(seed: int):
    x, y = stripe_data([0, 1, 2, 3], n_per=16, seed=10 + seed)
    return ctta.streams.from_tensors([x, x.flip(-1), x.flip(-2)], [y] * 3, domains=["a", "b", "c"], batch_size=16)


class NaNNet(nn.Module):
    """Outputs NaN logits for every sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 4), float("nan"))


def _segments(out) -> pd.DataFrame:
    return pd.read_csv(out / "segments.csv")


def test_tent_with_a_huge_lr_is_marked_collapsed_everywhere(models, tmp_path):
    res = ctta.run(_stream(1), ctta.strategies.create("tent", copy.deepcopy(models[1]), lr=1e6), device="cpu",
                   out=tmp_path / "tent", progress=False)
    seg = _segments(tmp_path / "tent")
    assert seg.set_index("segment").loc["c", "collapsed"] and seg.loc[2, "collapse_ratio"] < 0.5
    assert (seg["nonfinite"] == 0).all()
    summary = json.loads((tmp_path / "tent" / "summary.json").read_text())
    assert summary["health"] == "collapsed" and not summary["diverged"] and "c" in summary["collapsed_segments"]
    assert summary["collapse_threshold"] == 0.5 and "collapsed_segments" in summary["definitions"]
    assert pd.read_csv(tmp_path / "tent" / "domains.csv")["status"].tolist() == ["collapsed"]
    assert res.table()["status"].tolist() == ["collapsed"]
    assert "collapsed" in (tmp_path / "tent" / "report.html").read_text()
    # the threshold is a setting: 0 never marks
    quiet = ctta.run(_stream(1), ctta.strategies.create("tent", copy.deepcopy(models[1]), lr=1e6), device="cpu",
                     progress=False, collapse_threshold=0.0)
    assert quiet.summary["health"] == "ok"


def test_comparison_and_report_command_name_the_collapsed_run(models, tmp_path, capsys):
    ctta.run(_stream(1), ctta.strategies.create("tent", copy.deepcopy(models[1]), lr=1e6), device="cpu",
             out=tmp_path / "runs" / "tent", progress=False)
    ctta.run(_stream(1), ctta.strategies.create("source", copy.deepcopy(models[1])), device="cpu",
             out=tmp_path / "runs" / "source", progress=False)
    runs = [load_run(tmp_path / "runs" / n) for n in ("tent", "source")]
    files = write_comparison_report(runs, tmp_path / "cmp")
    table = pd.read_csv(files["csv"], index_col=0)
    assert table.loc["tent", "status"] == "collapsed" and table.loc["source", "status"] == "ok"
    md = files["markdown"].read_text()
    tent_row = next(line for line in md.splitlines() if line.startswith("| tent"))
    assert "†" in tent_row and "collapsed" in tent_row
    assert "†" not in next(line for line in md.splitlines() if line.startswith("| source"))
    assert "collapsed" in files["html"].read_text()
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "cmp2"), "-q"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "collapsed:" in line)
    assert line.startswith("tent") and str(tmp_path / "runs" / "tent") in line and "c" in line


def test_nan_model_stops_by_default_after_writing_its_rows(tmp_path):
    with pytest.raises(DivergedError, match=r"diverged on segment 'a' of stream 'custom': 64 of 64 samples"):
        ctta.run(_stream(1), ctta.strategies.create("source", NaNNet()), device="cpu", out=tmp_path / "r",
                 progress=False)
    seg = _segments(tmp_path / "r")
    assert seg["segment"].tolist() == ["a"] and seg.loc[0, "nonfinite"] == 64 and seg.loc[0, "accuracy"] == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["health"] == "diverged" and summary["diverged"] and summary["stopped_at"] == "a"
    assert pd.read_csv(tmp_path / "r" / "domains.csv")["status"].tolist() == ["diverged"]


def test_nan_model_with_on_diverge_mark_finishes_marked(tmp_path):
    res = ctta.run(_stream(1), ctta.strategies.create("source", NaNNet()), device="cpu", out=tmp_path / "r",
                   progress=False, on_diverge="mark")
    assert res.summary["health"] == "diverged" and res.summary["diverged_segments"] == ["a", "b", "c"]
    assert res.summary["nonfinite_samples"] == 3 * 64 and "stopped_at" not in res.summary
    assert (_segments(tmp_path / "r")["nonfinite"] == 64).all()
    assert res.table()["status"].tolist() == ["diverged"]
    files = write_comparison_report([load_run(tmp_path / "r")], tmp_path / "cmp")
    assert "diverged" in files["markdown"].read_text()


def test_on_diverge_from_the_config_and_its_checks(tmp_path, npz_dataset, capsys):
    from ctta.config import RUN_DEFAULTS

    assert RUN_DEFAULTS["on_diverge"] == "stop" and RUN_DEFAULTS["collapse_threshold"] == 0.5
    with pytest.raises(ConfigError, match="on_diverge"):
        ctta.run(_stream(1), ctta.strategies.create("source", NaNNet()), device="cpu", progress=False,
                 on_diverge="ignore")
    code = main(["--stream", "cifar10c", "--strategy", "source", "--backbone", "tiny_cnn", "--data-root",
                 str(npz_dataset), "--corruptions", "contrast", "--num-samples", "10", "--device", "cpu",
                 "--out", str(tmp_path / "r"), "--no-progress", "-q", "--set", "run.collapse_threshold=2"])
    assert code == 2 and "run.collapse_threshold" in capsys.readouterr().err


def test_nan_input_pixel_is_refused_naming_the_segment(models):
    x, y = stripe_data([0, 1, 2, 3], n_per=4, seed=0)
    bad = x.clone()
    bad[3, 1, 2, 2] = float("nan")
    stream = ctta.streams.from_tensors([x, bad], [y, y], domains=["fine", "broken"], name="mine", batch_size=8)
    with pytest.raises(NonFiniteInputError, match=r"segment 'broken' of stream 'mine' holds 1 non-finite"):
        ctta.run(stream, ctta.strategies.create("source", copy.deepcopy(models[2])), device="cpu", progress=False)


def test_healthy_source_run_is_not_marked(models, tmp_path):
    res = ctta.run(_stream(2), ctta.strategies.create("source", copy.deepcopy(models[2])), device="cpu",
                   out=tmp_path / "r", progress=False)
    seg = _segments(tmp_path / "r")
    assert not seg["collapsed"].any() and (seg["nonfinite"] == 0).all() and (seg["collapse_ratio"] > 0.9).all()
    assert res.summary["health"] == "ok" and res.summary["collapsed_segments"] == []
    assert res.table()["status"].tolist() == ["ok"]
    md = write_comparison_report([load_run(tmp_path / "r")], tmp_path / "cmp")["markdown"].read_text()
    assert "†" not in md and "collapsed:" not in md


def test_long_tail_labels_followed_by_predictions_are_not_collapse(models):
    x, y = stripe_data([0, 1, 2, 3], n_per=40, seed=12)
    keep = torch.cat([torch.nonzero(y == c).flatten()[:k] for c, k in enumerate((40, 12, 6, 4))])
    xs, ys = x[keep], y[keep]
    assert np.bincount(ys.numpy()).max() / len(ys) > 0.6  # most labels are one class
    stream = ctta.streams.from_tensors(xs, ys, domains=["longtail"], batch_size=16, shuffle=True)
    res = ctta.run(stream, ctta.strategies.create("source", copy.deepcopy(models[2])), device="cpu", progress=False)
    assert res.segments.loc[0, "accuracy"] > 0.9 and not res.segments.loc[0, "collapsed"]
    assert res.summary["health"] == "ok"


def test_collapse_ratio_edge_cases():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    assert collapse_ratio(labels, labels) == pytest.approx(1.0)
    assert collapse_ratio(np.zeros(200, np.int64), labels) == 0.0
    assert np.isnan(collapse_ratio(labels[:15], labels[:15]))  # too few samples to judge
    one = np.zeros(200, np.int64)
    assert np.isnan(collapse_ratio(one, one))  # one label class: concentrated predictions are no evidence
    assert np.isnan(collapse_ratio(labels, np.full(200, -1)))  # unlabelled


def test_accumulator_counts_nonfinite_without_a_host_read(monkeypatch):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 5, generator=g) for _ in range(3)]
    batches[1][2, 0] = float("nan")
    batches[2][5, 3] = float("inf")
    acc = SegmentAccumulator()

    def refuse(*args, **kwargs):
        raise AssertionError("host read inside the per-batch path")

    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "tolist", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, refuse)
        for b in batches:
            acc.update(b, torch.zeros(8, dtype=torch.long))
    rec = acc.finish()
    assert rec.nonfinite == 2 and rec.predictions[8 + 2] == -1 and rec.predictions[16 + 5] == -1
    assert rec.confusion(5).sum() == 22 and rec.per_class_accuracy(5)[0] == pytest.approx(rec.accuracy)


def test_a_diverged_run_in_a_comparison_lets_the_others_finish(models, monkeypatch, tmp_path):
    """Nothing computed is lost: the other strategies run, the comparison is written and marks the stopped one."""
    import ctta.experiment as ex
    from ctta.config import resolve

    built = iter([NaNNet(), copy.deepcopy(models[2])])
    monkeypatch.setattr(ex, "build_stream", lambda cfg, device="cpu": _stream(1))
    monkeypatch.setattr(ex, "build_model", lambda cfg, k, output_classes=None: next(built))
    cfg = resolve(None, {"stream": {"name": "custom"}, "strategy": {"name": "source,bn"},
                         "backbone": {"name": "resnet20_cifar"},
                         "run": {"device": "cpu", "out": str(tmp_path / "cmp"), "progress": False}})
    with pytest.raises(DivergedError, match=r"1 of 2 runs.*source"):
        ex.run_experiment(cfg)
    assert json.loads((tmp_path / "cmp" / "bn" / "summary.json").read_text())["health"] == "ok"
    assert json.loads((tmp_path / "cmp" / "source" / "summary.json").read_text())["diverged"]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "bn" in table and "diverged" in table


def test_masked_classes_at_minus_infinity_are_not_divergence():
    """Class-incremental learners put -inf on unseen classes; only NaN, +inf or no finite logit is non-finite."""
    acc = SegmentAccumulator()
    logits = torch.randn(6, 4)
    logits[:, 2:] = float("-inf")
    logits[4] = float("-inf")          # nothing finite: no prediction
    logits[5, 0] = float("inf")
    acc.update(logits, torch.zeros(6, dtype=torch.long))
    rec = acc.finish()
    assert rec.nonfinite == 2 and (rec.predictions[4:] == -1).all()
    assert (rec.predictions[:4] >= 0).all() and (rec.predictions[:4] < 2).all()
