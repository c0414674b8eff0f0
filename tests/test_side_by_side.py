"""benchmarks/side_by_side.py: our side on a tiny model for 2 batches (the CLI run, its loop timing and errors), the
summary's ratios, and (slow, with a reference checkout) the reference's side on the same images."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("CTTA_DOEBLER_REFERENCE", "/tmp/refagree/classification"))
STAND_INS = REFERENCE.parent / "stand"


def _script():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("side_by_side", ROOT / "benchmarks" / "side_by_side.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["side_by_side"] = mod
    spec.loader.exec_module(mod)
    return mod


def _source_predictions(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The source tiny_cnn's classes (built as the CLI builds it: torch.manual_seed(seed) first) on images ``x``
    as stored (uint8, /255)."""
    import ctta

    torch.manual_seed(seed)
    model = ctta.backbones.create("tiny_cnn", num_classes=10).eval()
    with torch.no_grad():
        return model((x * 255).round().clamp(0, 255).to(torch.uint8).float().div(255)).argmax(1)


def _domains(tmp_path: Path, sbs, n: int = 8, seed: int = 3):
    """Two tiny domains of random 32 x 32 images in [0, 1], written as the script writes its stream; the first five
    labels of each are the source model's own classes, the others one class off (5 right, 3 wrong)."""
    g = torch.Generator().manual_seed(0)
    doms = []
    for i in range(2):
        x = torch.rand(n, 3, 32, 32, generator=g)
        pred = _source_predictions(x, seed)
        y = torch.where(torch.arange(n) < 5, pred, (pred + 1) % 10)
        doms.append((f"d{i}", x, y))
    return doms, sbs.write_domains(doms, tmp_path / "stream")


def test_ours_side_runs_the_cli_and_reads_back_errors_and_timing(tmp_path):
    sbs = _script()
    doms, files = _domains(tmp_path, sbs)
    import ctta.engine

    meter = ctta.engine.CostMeter
    res = sbs.run_ours(files[:1], "source", tmp_path / "run", backbone="tiny_cnn", batch_size=4, seed=3)
    assert ctta.engine.CostMeter is meter  # the timing patch is undone
    assert res["images"] == 8 and res["batches"] == 2
    assert res["errors"] == {"d0": 3}
    assert res["loop_seconds"] > 0 and res["loop_cpu_seconds"] > 0
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "report.html").is_file()


def test_write_domains_round_trips_uint8(tmp_path):
    sbs = _script()
    doms, files = _domains(tmp_path, sbs)
    x, y = sbs.load_domain(files[1][1])
    assert x.dtype.name == "uint8" and x.shape == (8, 32, 32, 3)
    assert torch.equal(torch.from_numpy(y), doms[1][2])


def test_summary_ratios_and_table():
    sbs = _script()
    rows = []
    for side, wall, loop, err in (("ours", 10.0, 2.0, {"a": 3}), ("ref", 20.0, 4.0, {"a": 3}),
                                  ("ours", 12.0, 2.0, {"a": 3}), ("ref", 20.0, 8.0, {"a": 3})):
        rows.append({"side": side, "method": "bn", "precision": "fp32", "images": 100, "errors": err,
                     "wall_seconds": wall, "cpu_seconds": wall / 2, "loop_seconds": loop, "loop_cpu_seconds": loop,
                     "rss_peak_mb": 500.0})
    summary = sbs.summarise(rows)
    ours = next(s for s in summary if s["side"] == "ours")
    assert ours["runs"] == 2 and ours["whole_ips"] == pytest.approx(100 / 11)
    assert ours["whole_ratio"] == pytest.approx(20 / 11)  # medians: 11 s vs 20 s
    assert ours["loop_ratio"] == pytest.approx(6 / 2)  # medians: 2 s vs 6 s
    assert ours["error"] == pytest.approx(3.0) and ours["error_minus_ref"] == 0
    text = sbs.table(summary)
    assert text.count("\n") == 3 and "| bn | fp32 | ours |" in text


@pytest.mark.slow
@pytest.mark.skipif(not (REFERENCE / "methods").is_dir(), reason="needs the reference checkout")
def test_reference_side_matches_ours_on_the_same_images(tmp_path):
    sbs = _script()
    doms, files = _domains(tmp_path, sbs)
    ours = sbs.run_ours(files, "bn", tmp_path / "run", backbone="tiny_cnn", batch_size=4, seed=3)
    ref = sbs.run_reference(files, "bn", str(REFERENCE), str(STAND_INS), backbone="tiny_cnn", batch_size=4, seed=3)
    assert ref["images"] == ours["images"] == 16 and ref["batches"] == 4
    assert ref["errors"] == ours["errors"]


def test_external_reference_loop_times_a_per_batch_step(tmp_path):
    sbs = _script()
    doms, files = _domains(tmp_path, sbs)
    torch.manual_seed(3)
    import ctta

    model = ctta.backbones.create("tiny_cnn", num_classes=10).eval()
    calls = []

    def step(x, y):
        calls.append((x.shape[0], x.dtype, float(x.max())))
        with torch.no_grad():
            return model(x)

    res = sbs.run_external(files, step, batch_size=3)
    assert res["errors"] == {"d0": 3, "d1": 3} and res["images"] == 16 and res["batches"] == 6
    assert [c[0] for c in calls] == [3, 3, 2] * 2 and all(c[1] == torch.float32 and c[2] <= 1 for c in calls)
    assert res["loop_seconds"] > 0 and res["loop_cpu_seconds"] > 0
    assert set(sbs.EXTERNAL) == {"note", "t3a", "shot"}


def test_ours_setup_matches_the_agreement_runs():
    import argparse

    sbs = _script()
    opts = argparse.Namespace(data_root="/data", source_samples=100, warmup_samples=50, clip_weights="/clip.pt",
                              reference="", stand_ins="")
    assert sbs.ours_setup("rmt", opts) == (None, None, {"source_data": "/data", "source_samples": 100,
                                                         "warmup_samples": 50})
    assert sbs.ours_setup("santa", opts)[2] == {"source_data": "/data", "source_samples": 100}
    assert sbs.ours_setup("shot", opts)[2] == {"bn": "source", "optimizer": "adam", "lr": 1e-4, "cls_par": 0.1,
                                               "threshold": 0.9}
    assert sbs.ours_setup("t3a", opts)[2] == {"filter_k": 100}
    backbone, options, over = sbs.ours_setup("tpt", opts)
    assert backbone == "clip" and options["checkpoint"] == "/clip.pt" and options["keep_text"] and over["n_views"] == 64
    assert sbs.ours_setup("bn", opts) == (None, None, {})
    cfg = sbs.experiment_config([], "tpt", backbone, "ignored.th", 1, 1, "cpu", over, options)
    assert cfg["backbone"]["name"] == "clip" and "weights" not in cfg["backbone"]


def test_step_zero_column_in_the_table():
    sbs = _script()
    rows = [{"side": side, "method": "rmt", "precision": "fp32", "images": 100, "errors": {"a": 3},
             "wall_seconds": 10.0, "cpu_seconds": 5.0, "loop_seconds": 2.0, "loop_cpu_seconds": 2.0,
             "rss_peak_mb": 500.0, "warmup_seconds": w, "warmup_cpu_seconds": w / 2} for side, w in
            (("ours", 3.0), ("ref", 4.0))]
    summary = sbs.summarise(rows)
    assert summary[0]["warmup_s"] == 3.0 and summary[1]["warmup_cpu_s"] == 2.0
    assert "| 3.0 (1.5) |" in sbs.table(summary) and "step 0 on source data" in sbs.table(summary)


CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.mark.slow  # ~30 s: the CIFAR-10 train set is read for the 40 source images
@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10 (RMT's source images)")
def test_step_zero_is_timed_apart_from_the_loop(tmp_path):
    sbs = _script()
    doms, files = _domains(tmp_path, sbs)
    over = {"source_data": str(CIFAR), "source_samples": 40, "source_batch": 20, "warmup_samples": 40}
    res = sbs.run_ours(files[:1], "rmt", tmp_path / "run", backbone="tiny_cnn", batch_size=4, seed=3, overrides=over)
    import ctta.strategies

    assert ctta.strategies.STRATEGIES.get("rmt").ensure_ready.__name__ == "ensure_ready"  # the patch is undone
    assert res["images"] == 8 and res["warmup_seconds"] > 0 and res["warmup_cpu_seconds"] > 0
    assert 0 < res["loop_seconds"] and 0 < res["loop_cpu_seconds"]
