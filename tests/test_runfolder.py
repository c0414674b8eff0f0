"""Run folders are never mixed, lost or silently rewritten: one writer at a time, no overwrite without --force,
resume only with the saved config, cost accumulated across an interruption, a finished run left as it is."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
import yaml

import ctta
from ctta import runfolder, strategies
from ctta.cli import main
from ctta.errors import CttaError, RunFolderError, RunFolderLockedError
from ctta.streams import Stream, tensor_segment

from conftest import interrupt_at, make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(n_domains: int = 3, n: int = 24, bs: int = 8) -> Stream:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % 4
    segs = [tensor_segment("clean@start", "eval", x, y, bs, role="probe")]
    segs += [tensor_segment(f"d{d}", "adapt", (x * (0.5 + 0.2 * d)).clamp(0, 1), y, bs) for d in range(n_domains)]
    segs.append(tensor_segment("clean@end", "eval", x, y, bs, role="probe"))
    return Stream(name="toy", segments=segs, num_classes=4, spec={"name": "toy", "n": n})


def _run(out, name="tent", **kw):
    return ctta.run(_stream(), strategies.create(name, make_tiny()), device="cpu", out=out, progress=False, **kw)


def _interrupted(out, at_call: int = 5):
    """A tent run that raises KeyboardInterrupt at its ``at_call``-th adapt call (inside d1, the second domain)."""
    s = interrupt_at(strategies.create("tent", make_tiny()), at_call)
    with pytest.raises(KeyboardInterrupt):
        ctta.run(_stream(), s, device="cpu", out=out, progress=False)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- one writer at a time

HOLDER = textwrap.dedent("""
    import sys, time
    from ctta.runfolder import RunLock
    RunLock(sys.argv[1], command="holder-of-the-lock --out x").acquire()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
""")


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(RunFolderLockedError, match=rf"in use by pid {proc.pid} on .*holder-of-the-lock"):
            _run(out)
        assert not (out / "segments.csv").exists()  # refused before writing anything
        code = main(["--stream", "toy", "--strategy", "tent", "--out", str(out), "-q"])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {proc.pid}" in err and len(err.strip().splitlines()) == 1
    finally:
        proc.kill()  # dies holding the lock: its .lock file stays behind, the OS drops the flock
        proc.wait()
    assert json.loads((out / runfolder.LOCK).read_text())["pid"] == proc.pid
    with caplog.at_level("WARNING", logger="ctta.runfolder"):
        res = _run(out)
    assert "taking over the lock" in caplog.text and str(proc.pid) in caplog.text
    assert len(res.segments) == 5 and not (out / runfolder.LOCK).exists()  # released at the end


def test_lock_is_reentrant_in_one_process_and_exclusive_across_open_files(tmp_path):
    with runfolder.lock(tmp_path / "r") as held, runfolder.lock(tmp_path / "r"):
        assert (tmp_path / "r" / runfolder.LOCK).is_file()
        with pytest.raises(RunFolderLockedError, match=f"pid {os.getpid()}"):
            runfolder.RunLock(tmp_path / "r").acquire()  # another open file, even in this process
        assert held is not None
    assert not (tmp_path / "r").exists()  # created for the lock, left empty: removed


# ---------------------------------------------------------------- no silent overwrite

def test_finished_folder_is_refused_without_force_and_overwritten_with_it(tmp_path):
    _run(tmp_path)
    before = (tmp_path / "summary.json").read_bytes()
    with pytest.raises(RunFolderError, match=r"holds a finished run of 'tent' on 'toy'.*--resume.*--force"):
        _run(tmp_path)
    assert (tmp_path / "summary.json").read_bytes() == before
    res = _run(tmp_path, force=True)
    assert len(pd.read_csv(tmp_path / "segments.csv")) == 5 and res.summary["adaptation_steps"] == 9


def test_unfinished_folder_is_refused_without_resume(tmp_path):
    _interrupted(tmp_path)
    with pytest.raises(RunFolderError, match=r"unfinished run .*2 segment\(s\) done.*--resume.*--force"):
        _run(tmp_path)
    with pytest.raises(CttaError, match="exclude each other"):
        _run(tmp_path, resume=True, force=True)


def test_cli_rerun_of_several_runs_is_refused_at_once_then_forced(tmp_path, npz_dataset, capsys):
    args = ["--stream", "cifar10c", "--strategy", "source,bn", "--backbone", "tiny_cnn", "--data-root",
            str(npz_dataset), "--corruptions", "contrast", "--num-samples", "20", "--batch-size", "10", "--device",
            "cpu", "--out", str(tmp_path / "r"), "--no-progress", "-q"]
    assert main(args) == 0
    saved = _files(tmp_path / "r")
    assert "config.yaml" in saved and yaml.safe_load(saved["config.yaml"])["strategy"]["name"] == "source,bn"
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert _files(tmp_path / "r") == saved
    assert main(args + ["--force"]) == 0


# ------------------------------------------------------- resume: the same run, or a refusal naming what differs

CLI = ["--stream", "cifar10c", "--strategy", "tent", "--backbone", "tiny_cnn", "--corruptions",
       "contrast,gaussian_noise", "--num-samples", "20", "--batch-size", "10", "--device", "cpu", "--no-progress", "-q"]


def _cli_interrupted(tmp_path, npz_dataset, monkeypatch, at_call=3):
    """A CLI tent run interrupted inside its second domain (adapt call ``at_call``); returns its args and folder."""
    out = tmp_path / "r"
    args = CLI + ["--data-root", str(npz_dataset), "--out", str(out)]
    cls = strategies.STRATEGIES.get("tent")
    original, calls = cls.adapt, {"n": 0}

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(cls, "adapt", flaky)
    assert main(args) == 130
    monkeypatch.setattr(cls, "adapt", original)
    return args, out


def test_cli_resume_with_a_changed_hyperparameter_or_strategy_is_refused_naming_it(tmp_path, npz_dataset, capsys,
                                                                                   monkeypatch):
    args, out = _cli_interrupted(tmp_path, npz_dataset, monkeypatch)
    saved = _files(out)
    capsys.readouterr()
    assert main(args + ["--resume", "--set", "strategy.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "strategy.lr 0.001 -> 0.01" in err and "another stream" not in err and len(err.strip().splitlines()) == 1
    assert main(["--resume", "--out", str(out), "--strategy", "bn"]) == 2
    err = capsys.readouterr().err
    assert "strategy.name 'tent' -> 'bn'" in err and "another stream" not in err
    assert _files(out) == saved  # nothing written, config.yaml still the old one
    assert main(["--resume", "--out", str(out), "--device", "cpu", "-q"]) == 0  # how-to-run keys may differ


def test_api_resume_with_another_strategy_names_it(tmp_path):
    _interrupted(tmp_path)
    with pytest.raises(RunFolderError, match=r"cannot resume .*strategy.name 'tent' -> 'source'"):
        _run(tmp_path, name="source", resume=True)


def test_cli_resume_from_the_folder_alone(tmp_path, npz_dataset, capsys, monkeypatch):
    full = tmp_path / "full"
    assert main(CLI + ["--data-root", str(npz_dataset), "--out", str(full)]) == 0
    _, out = _cli_interrupted(tmp_path, npz_dataset, monkeypatch)
    assert len(pd.read_csv(out / "segments.csv")) == 2  # clean@start and the first domain
    capsys.readouterr()
    assert main(["--resume", "--out", str(out), "--no-progress", "-q"]) == 0
    assert "contrast" in capsys.readouterr().out
    resumed, uninterrupted = (json.loads((d / "summary.json").read_text()) for d in (out, full))
    assert resumed["domain_error"] == uninterrupted["domain_error"]
    assert resumed["adaptation_steps"] == uninterrupted["adaptation_steps"] == 4
    # several runs: the root's config.yaml resumes them all
    root = tmp_path / "many"
    assert main(CLI[:3] + ["source,bn"] + CLI[4:] + ["--data-root", str(npz_dataset), "--out", str(root)]) == 0
    (root / "bn" / "summary.json").unlink()  # bn interrupted after its last checkpoint
    kept = (root / "source" / "summary.json").read_bytes()
    assert main(["--resume", "--out", str(root), "-q"]) == 0
    assert (root / "bn" / "summary.json").is_file() and (root / "source" / "summary.json").read_bytes() == kept
    assert main(["--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_cost_accumulates_across_an_interruption(tmp_path):
    full = _run(tmp_path / "full").summary
    _interrupted(tmp_path / "cut")  # in segment 2 (d1), the first time
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ckpt["cost"]["steps"]["adapt"] == 3 and ckpt["cost"]["images"]["eval"] == 24
    resumed = _run(tmp_path / "cut", resume=True).summary
    assert resumed["adaptation_steps"] == full["adaptation_steps"] == 9
    for key in ("adapt_images_per_s", "adapt_ms_per_step", "eval_images_per_s", "peak_memory_mb"):
        assert resumed[key] > 0, key
    assert resumed["peak_memory_mb"] >= ckpt["cost"]["peak_memory_mb"]
    assert resumed["domain_error"] == full["domain_error"]


def test_resume_of_a_finished_run_leaves_it_as_it_is(tmp_path, caplog):
    first = _run(tmp_path)
    before = _files(tmp_path)
    with caplog.at_level("INFO", logger="ctta.engine"):
        again = _run(tmp_path, resume=True)
    assert "finished run" in caplog.text and "nothing is rerun" in caplog.text
    assert _files(tmp_path) == before  # summary.json byte-identical, nothing added or removed
    assert again.summary == json.loads(before["summary.json"])
    assert again.summary["adaptation_steps"] == 9 and "adapt_images_per_s" in again.summary
    assert again.steps["correct"].tolist() == first.steps["correct"].tolist()
    assert list(again.table().columns[:3]) == ["d0", "d1", "d2"] and again.files["summary"].is_file()


def test_api_run_folder_has_a_config(tmp_path):
    _run(tmp_path, name="tent")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# written by ctta.run")
    cfg = yaml.safe_load(text)
    assert cfg["stream"] == {"name": "toy", "n": 24}
    assert cfg["strategy"]["name"] == "tent" and cfg["strategy"]["seed"] == 0
    assert cfg["run"]["device"] == "cpu" and cfg["backbone"] == {"class": "TinyNet"}


# ---------------------------------------------------------------- sweeps: skip finished, overwrite a changed cell

def test_sweep_skips_finished_and_reruns_a_changed_cell(tmp_path, caplog):
    from ctta import sweep as sw

    grid = {"streams": [{"name": "digits_c", "num_samples": 16, "batch_size": 8, "corruptions": "contrast",
                         "clean_eval": False}], "strategies": ["tent"], "backbones": [{"name": "tiny_cnn"}],
            "seeds": [1], "out": str(tmp_path / "sw"), "overrides": {"run": {"device": "cpu"}}}
    assert sw.sweep(grid, backend="local", progress=False, report=False).counts()["done"] == 1
    assert sw.sweep(grid, backend="local", progress=False, report=False).counts()["skipped"] == 1
    with caplog.at_level("WARNING", logger="ctta.sweep"):
        changed = sw.sweep(grid, overrides=["strategy.lr=0.01"], backend="local", progress=False, report=False)
    assert changed.counts() == {"done": 1, "skipped": 0, "failed": 0}, changed.runs
    assert "strategy.lr 0.001 -> 0.01" in caplog.text and "overwriting" in caplog.text
