"""Sweeps: a grid expands into ordinary runs, finished runs are skipped, failures are reported, reports are written;
the Ray path (slow: starting a local cluster takes ~10 s) gives the numbers of the in-process loop."""
from __future__ import annotations

import json
import logging

import pytest
import yaml

from ctta import sweep as sw
from ctta.cli import main
from ctta.errors import ConfigError

TINY_STREAM = {"name": "digits_c", "num_samples": 16, "batch_size": 8, "corruptions": "brightness,contrast",
               "clean_eval": False}


def _grid(out, strategies=("source", "tent"), seeds=(1, 2), **extra):
    return {"streams": [dict(TINY_STREAM)], "strategies": list(strategies), "backbones": [{"name": "tiny_cnn"}],
            "seeds": list(seeds), "out": str(out), "resources": {"num_gpus": 1, "num_cpus": 1},
            "overrides": {"run": {"device": "cpu"}}, **extra}


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_sweep_runs_grid_writes_report_then_skips_and_resumes(tmp_path, capsys):
    out = tmp_path / "sw"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(_grid(out)))
    code = main(["sweep", str(grid_file), "--local", "--no-progress", "-q"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    runs = sorted(p.parent for p in out.rglob("summary.json"))
    assert [str(p.relative_to(out)) for p in runs] == [f"digits_c/tiny_cnn/{s}/seed-{k}" for s in ("source", "tent")
                                                       for k in (1, 2)]
    for r in runs:  # each a normal run folder
        for f in ("steps.csv", "segments.csv", "domains.csv", "config.yaml", "accuracy_over_time.png"):
            assert (r / f).is_file(), (r, f)
    assert _summary(runs[0])["stream_spec"]["seed"] == 1 and _summary(runs[1])["stream_spec"]["seed"] == 2
    report = out / "digits_c" / "tiny_cnn"
    md = (report / "comparison.md").read_text()
    assert "source" in md and "tent" in md and "±" in md and "img/s" in md
    assert (report / "comparison.csv").is_file() and (report / "comparison.html").is_file()
    assert "4 ran, 0 skipped" in stdout and "tent" in stdout
    index = json.loads((out / "sweep.json").read_text())
    assert index["counts"] == {"done": 4, "skipped": 0, "failed": 0}
    first = {r["id"]: r["mean_error"] for r in index["runs"]}

    # re-submission: everything finished, nothing runs again
    stamps = {r: (r / "summary.json").stat().st_mtime_ns for r in runs}
    again = sw.sweep(grid_file, backend="local", progress=False)
    assert again.counts() == {"done": 0, "skipped": 4, "failed": 0}
    assert {r: (r / "summary.json").stat().st_mtime_ns for r in runs} == stamps
    assert {r.id: r.mean_error for r in again.runs} == first

    # interrupted after its last checkpoint: no summary, a checkpoint -> resumes through the engine
    (runs[3] / "summary.json").unlink()
    assert sw.run_state(sw.expand(grid_file)[3].cfg) == "interrupted"
    resumed = sw.sweep(grid_file, backend="local", progress=False, report=False)
    assert resumed.counts() == {"done": 1, "skipped": 3, "failed": 0}
    assert resumed.runs[3].resumed and resumed.runs[3].mean_error == pytest.approx(first[resumed.runs[3].id])

    # a changed hyperparameter makes the affected runs new, the others stay finished
    states = [sw.run_state(s.cfg) for s in sw.expand(grid_file, overrides=["strategy.lr=0.5"])]
    assert states == ["finished", "finished", "new", "new"]


def test_failed_run_is_reported_and_others_finish_without_ray(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sw, "ray_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="ctta.sweep"):
        result = sw.sweep(_grid(tmp_path / "sw", strategies=("finetune", "source"), seeds=(1,)), progress=False)
    assert result.backend == "local"
    assert "Ray is not installed" in caplog.text and "one after another" in caplog.text
    assert "1/2 done" in caplog.text or "0/2 done, 0 running, 1 failed" in caplog.text
    failed, ok = result.runs
    assert failed.status == "failed" and "cannot run stream" in failed.error and "UnsupportedError" in failed.error
    assert ok.status == "done" and (tmp_path / "sw/digits_c/tiny_cnn/source/seed-1/summary.json").is_file()
    md = result.reports["digits_c/tiny_cnn"].read_text()
    assert "source" in md and "finetune" not in md
    index = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert index["counts"]["failed"] == 1 and "cannot run stream" in index["runs"][0]["error"]
    assert "FAILED digits_c/tiny_cnn/finetune/seed-1" in sw.format_result(result)


def test_expand_grid_axes_overrides_and_labels(tmp_path):
    grid = _grid(tmp_path, strategies=("source", {"name": "tent", "lr": 0.01, "label": "tent lr=0.01"}, "tent"),
                 seeds=(1, 2, 3))
    grid["streams"].append({**TINY_STREAM, "severity": 3, "label": "digits-s3"})
    grid["overrides"] = {"run": {"device": "cpu"}, "strategy": {"steps": 2}}
    specs = sw.expand(grid, overrides=["backbone.width=8"])
    assert len(specs) == 2 * 3 * 3
    assert specs[0].id == "digits_c/tiny_cnn/source/seed-1" and specs[0].out == tmp_path / specs[0].id
    assert {s.id.split("/")[2] for s in specs} == {"source", "tent-lr=0.01", "tent"}
    tent_lr, src, tent = specs[3].cfg, specs[0].cfg, specs[6].cfg
    assert tent_lr["strategy"]["lr"] == 0.01 and tent["strategy"]["lr"] != 0.01
    assert tent["strategy"]["steps"] == 2 and "steps" not in src["strategy"]  # applied where it fits
    assert src["backbone"] == {"name": "tiny_cnn", "width": 8} and src["run"]["device"] == "cpu"
    assert [s.cfg["stream"]["seed"] for s in specs[:3]] == [1, 2, 3]
    assert specs[-1].cfg["stream"]["severity"] == 3 and specs[-1].group == "digits-s3/tiny_cnn"
    json.dumps([s.cfg for s in specs])  # plain data, as a Ray task receives it
    # precedence: grid overrides (mapping or list) < axis entries < command-line --set
    grid["overrides"] = ["strategy.lr=0.5", "stream.severity=4", "run.device=cpu"]
    specs = sw.expand(grid)
    assert [specs[i].cfg["strategy"]["lr"] for i in (3, 6)] == [0.01, 0.5]
    assert specs[0].cfg["stream"]["severity"] == 4 and specs[-1].cfg["stream"]["severity"] == 3
    specs = sw.expand(grid, overrides=["strategy.lr=0.2", "stream.severity=2"])
    assert [specs[i].cfg["strategy"]["lr"] for i in (3, 6)] == [0.2, 0.2] and "lr" not in specs[0].cfg["strategy"]
    assert {s.cfg["stream"]["severity"] for s in specs} == {2}
    for name in ("digits_quick", "cifar10c_table"):  # the packaged examples
        assert sw.expand(name, out=tmp_path / name)


@pytest.mark.parametrize("change, message", [
    ({"strategy": ["tent"]}, "unknown key(s) 'strategy'"),
    ({"strategies": ["tnet"]}, "unknown strategy 'tnet'"),
    ({"streams": ["digits_x"]}, "unknown stream 'digits_x'"),
    ({"strategies": []}, "'strategies' must be a non-empty list"),
    ({"overrides": {"strategy": {"momentm": 1}}}, "none of the strategies source, tent has a hyperparameter"),
    ({"overrides": ["lr=1"]}, "the key must start with one of stream"),
    ({"resources": {"num_gpus": -1}}, "resources.num_gpus must be a non-negative number"),
    ({"seeds": [1, 1]}, "repeats a seed"),
])
def test_bad_grid_is_one_line(tmp_path, capsys, change, message):
    grid = {**_grid(tmp_path / "sw"), **change}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    code = main(["sweep", str(tmp_path / "g.yaml"), "--local", "--dry-run", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_dry_run_lists_runs(tmp_path, capsys):
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(_grid(tmp_path / "sw")))
    assert main(["sweep", str(tmp_path / "g.yaml"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("new") for line in lines)
    assert not (tmp_path / "sw").exists()


def test_unreachable_address_or_no_ray_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="cannot reach a Ray cluster at '127.0.0.1:1'"):
        sw._check_reachable("127.0.0.1:1", timeout=2)
    sw._check_reachable("auto")  # left to Ray
    monkeypatch.setattr(sw, "ray_available", lambda: False)
    with pytest.raises(ConfigError, match="needs Ray"):
        sw.sweep(_grid(tmp_path / "sw"), address="10.0.0.1:6379")
    with pytest.raises(ConfigError, match="Ray is not installed"):
        sw.sweep(_grid(tmp_path / "sw"), backend="ray")


@pytest.mark.slow
def test_ray_path_matches_sequential(tmp_path):
    pytest.importorskip("ray")
    grid = _grid(tmp_path / "unused", strategies=("source", "tent", "finetune"))
    on_ray = sw.sweep(grid, out=tmp_path / "ray", backend="ray", progress=False)
    local = sw.sweep(grid, out=tmp_path / "local", backend="local", progress=False)
    assert on_ray.backend == "ray" and on_ray.counts() == local.counts() == {"done": 4, "skipped": 0, "failed": 2}
    for a, b in zip(on_ray.runs, local.runs):
        assert a.id == b.id and a.status == b.status
        if a.status == "done":
            sa, sb = _summary(tmp_path / "ray" / a.id), _summary(tmp_path / "local" / b.id)
            assert sa["domain_error"] == pytest.approx(sb["domain_error"], abs=1e-9), a.id
        else:
            assert "cannot run stream" in a.error
    assert (tmp_path / "ray/digits_c/tiny_cnn/comparison.md").is_file()
    # re-submitted on Ray: all skipped
    assert sw.sweep(grid, out=tmp_path / "ray", backend="ray", progress=False).counts()["skipped"] == 4
