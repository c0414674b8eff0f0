"""Realtime evaluation (Alfarra et al. 2023): a method k times slower than the stream adapts on every k-th batch and
predicts the others with its current state."""
from __future__ import annotations

import time

import pytest
import torch

import ctta
from ctta import strategies
from ctta.config import resolve
from ctta.errors import ConfigError
from ctta.experiment import run_experiment

from conftest import make_tiny


def _stream():
    return ctta.streams.create("digits_c", corruptions="gaussian_noise,contrast", batch_size=16, num_samples=80)


def _record(strategy):
    """Log which call each adapt-segment batch got: 'adapt' or 'predict'."""
    calls, adapt, predict = [], strategy.adapt, strategy.predict

    def a(x):
        calls.append("adapt")
        return adapt(x)

    def p(x):
        calls.append("predict")
        return predict(x)

    strategy.adapt, strategy.predict = a, p
    return calls


def test_a_fixed_relative_cost_adapts_on_exactly_every_kth_batch_across_domains():
    s = strategies.create("tent", make_tiny(num_classes=10))
    calls = _record(s)
    res = ctta.run(_stream(), s, device="cpu", progress=False, realtime={"relative_cost": 3})
    # clean@start (5 predict batches), 2 domains x 5 batches, clean@end (5): the adapt segments' 10 batches
    online = calls[5:15]
    assert online == ["adapt", "predict", "predict"] * 3 + ["adapt"]  # the busy count runs on across domains
    rt = res.summary["realtime"]
    assert rt["adapted_batches"] == 4 and rt["predicted_batches"] == 6 and rt["relative_cost"] == 3
    assert res.summary["protocol"] == "realtime"


def test_source_has_the_same_error_in_realtime_as_offline():
    offline = ctta.run(_stream(), strategies.create("source", make_tiny(num_classes=10)), device="cpu",
                       progress=False)
    rt = ctta.run(_stream(), strategies.create("source", make_tiny(num_classes=10)), device="cpu", progress=False,
                  realtime={"relative_cost": 4})
    assert rt.summary["domain_error"] == offline.summary["domain_error"]
    assert rt.summary["realtime"]["predicted_batches"] > 0


def test_measured_cost_makes_a_slow_method_skip_batches():
    s = strategies.create("tent", make_tiny(num_classes=10))
    adapt = s.adapt

    def slow(x):
        time.sleep(0.05)  # far slower than one forward of the tiny model
        return adapt(x)

    s.adapt = slow
    res = ctta.run(_stream(), s, device="cpu", progress=False, realtime={})
    rt = res.summary["realtime"]
    assert rt["measured"] and rt["relative_cost"] > 2 and rt["predicted_batches"] > rt["adapted_batches"]
    assert rt["reference_ms"] > 0


def test_protocol_both_puts_offline_and_realtime_side_by_side(tmp_path):
    cfg = resolve(None, {"stream": {"name": "digits_c", "corruptions": "gaussian_noise", "num_samples": 64,
                                    "batch_size": 16},
                         "strategy": {"name": "bn,tent"}, "backbone": {"name": "tiny_cnn"},
                         "run": {"device": "cpu", "out": str(tmp_path / "cmp"), "progress": False,
                                 "protocol": "both", "relative_cost": 2}})
    results = run_experiment(cfg)
    assert set(results) == {"bn", "bn@realtime", "tent", "tent@realtime"}
    assert results["tent@realtime"].summary["realtime"]["adapted_share"] == pytest.approx(0.5)
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "tent@realtime" in table and "rel. cost" in table
    assert (tmp_path / "cmp" / "tent@realtime" / "summary.json").is_file()


@pytest.mark.parametrize("run,word", [({"protocol": "later"}, "run.protocol"), ({"relative_cost": 0}, "relative_cost"),
                                      ({"relative_cost": 2, "stream_rate": 10}, "not both")])
def test_bad_realtime_settings_are_one_line_errors(run, word, tmp_path):
    cfg = resolve(None, {"stream": {"name": "digits_c"}, "strategy": {"name": "tent"},
                         "backbone": {"name": "tiny_cnn"}, "run": {"device": "cpu", "out": str(tmp_path), **run}})
    with pytest.raises(ConfigError, match=word):
        run_experiment(cfg)
