"""Config resolution: packaged paper defaults, experiment files, CLI flags and --set overrides, and their errors."""
from __future__ import annotations

import pytest

from ctta.config import load_yaml, parse_override, resolve, strategy_defaults
from ctta.errors import ConfigError


def test_strategy_defaults_come_from_the_yaml():
    hp = strategy_defaults("cotta")
    assert (hp["lr"], hp["mt"], hp["rst"], hp["ap"], hp["views"]) == (1e-3, 0.999, 0.01, 0.92, 32)
    assert strategy_defaults("tent")["lr"] == 1e-3
    assert strategy_defaults("no_such_strategy") == {}


def test_precedence_defaults_experiment_cli_overrides():
    exp = {"stream": {"name": "cifar10c", "severity": 3}, "strategy": {"name": "cotta", "mt": 0.99}}
    cfg = resolve(exp, {"stream": {"batch_size": 64, "severity": None}}, ["strategy.rst=0.5", "run.device=cpu"])
    assert cfg["stream"]["severity"] == 3 and cfg["stream"]["batch_size"] == 64
    assert cfg["stream"]["corruptions"] == "all"  # from configs/streams/cifar10c.yaml
    assert cfg["strategy"]["mt"] == 0.99 and cfg["strategy"]["rst"] == 0.5 and cfg["strategy"]["lr"] == 1e-3
    assert cfg["run"]["device"] == "cpu"


@pytest.mark.parametrize("bad, message", [
    ("strategy.lr", "must look like section.key=value"),
    ("lr=1", "must start with one of"),
    ("model.lr=1", "must start with one of"),
])
def test_bad_overrides(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_override(bad)


def test_malformed_and_unknown_configs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stream: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown section.*'optim'"):
        resolve({"optim": {"lr": 1}})
    with pytest.raises(ConfigError, match="section 'stream' must be a mapping"):
        resolve({"stream": "cifar10c"})
