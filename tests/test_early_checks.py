"""Cheap facts are checked before any data is read, and numbers arrive as numbers in every spelling."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny
from ctta import strategies
from ctta.config import parse_override, resolve, yaml_load
from ctta.errors import CheckpointError, ConfigError, UnknownNameError


def _no_stream(monkeypatch):
    """Make building a stream fail loudly: a check that comes after it would show as an AssertionError."""
    import ctta.experiment as ex

    def boom(cfg):
        raise AssertionError("the stream was built before the cheap checks")

    monkeypatch.setattr(ex, "build_stream", boom)
    return ex


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("-1.5e+3", -1500.0), ("5e3", 5000.0),
                                         (".5", 0.5), ("1.0e-3", 1e-3), ("10", 10), ("abc", "abc")])
def test_yaml_reads_every_spelling_of_a_number(text, value):
    assert yaml_load(f"lr: {text}") == {"lr": value}
    assert parse_override(f"strategy.lr={text}") == (["strategy", "lr"], value)


def test_numbers_from_a_config_file_and_overrides_are_numbers(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("strategy:\n  name: tent\n  lr: 1e-4\n")
    from ctta.config import load_yaml

    cfg = resolve(load_yaml(f), overrides=["strategy.weight_decay=1e-5"])
    assert cfg["strategy"]["lr"] == 1e-4 and cfg["strategy"]["weight_decay"] == 1e-5


@pytest.mark.parametrize("backbone, error", [({"name": "resnet20_cifr"}, UnknownNameError),
                                             ({"name": "resnet20_cifar", "weights": "/nonexistent/w.th"},
                                              CheckpointError)])
def test_backbone_errors_come_before_the_stream_is_read(monkeypatch, backbone, error):
    ex = _no_stream(monkeypatch)
    cfg = resolve(None, {"stream": {"name": "cifar10c"}, "strategy": {"name": "tent"}, "backbone": backbone})
    with pytest.raises(error):
        ex.run_experiment(cfg)


def test_hyperparameter_errors_come_before_the_stream_is_read(monkeypatch):
    ex = _no_stream(monkeypatch)
    cfg = resolve(None, {"stream": {"name": "cifar10c"}, "strategy": {"name": "source,tent"},
                         "backbone": {"name": "resnet20_cifar"}}, ["strategy.lr=-1"])
    with pytest.raises(ConfigError, match=r"'tent'.*lr=-1"):
        ex.run_experiment(cfg)


def test_tent_with_several_steps_returns_the_last_steps_prediction(images):
    """The official forward_and_adapt returns each step's output before its update; the caller keeps the last."""
    model = make_tiny()
    tent = strategies.create("tent", copy.deepcopy(model), lr=1e-1, steps=2)
    ref = strategies.create("tent", copy.deepcopy(model), lr=1e-1, steps=1)
    ref.adapt(images)                      # step 1
    expected = ref.predict(images)         # what step 2 sees before its update
    got = tent.adapt(images)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, strategies.create("tent", copy.deepcopy(model)).predict(images))
