"""Optional trackers mirror the run folder's rows (tested with the real libraries, offline; skipped without them)."""
from __future__ import annotations

import pytest

import ctta
from ctta import strategies
from ctta.errors import ConfigError
from ctta.loggers import check_loggers

from conftest import make_tiny


def _run(out, loggers):
    s = ctta.streams.create("digits_c", corruptions="gaussian_noise", batch_size=32, num_samples=64)
    return ctta.run(s, strategies.create("bn", make_tiny(num_classes=10)), device="cpu", progress=False, out=out,
                    loggers=loggers)


def test_logger_names_are_checked_before_any_work():
    assert check_loggers("tensorboard, wandb") == ["tensorboard", "wandb"] and check_loggers(None) == []
    with pytest.raises(ConfigError, match="unknown logger 'comet'"):
        check_loggers(["comet"])


def test_tensorboard_gets_every_step_and_the_summary(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = _run(tmp_path / "run", "tensorboard")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    steps = acc.Scalars("online/accuracy")
    assert [e.step for e in steps] == res.steps["step"].tolist()
    assert [round(e.value, 5) for e in steps] == [round(v, 5) for v in res.steps["accuracy"]]
    assert acc.Scalars("summary/mean_error")[0].value == pytest.approx(res.summary["mean_error"])


def test_wandb_runs_offline_with_the_summary(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path / "run", ["wandb"])
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_mlflow_writes_a_local_store_with_every_step(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    res = _run(tmp_path / "run", ["mlflow"])
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    history = client.get_metric_history(run.info.run_id, "online_accuracy")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == res.steps["step"].tolist()
    assert run.data.metrics["summary.mean_error"] == pytest.approx(res.summary["mean_error"])
    assert run.data.params["strategy.name"] == "bn"
