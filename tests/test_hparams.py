"""Hyperparameters declared in the constructors' signatures: every strategy declares all of them, the paper's values
pass their own declarations, what users write is coerced, and a bad value is a one-line error before any work."""
from __future__ import annotations

import inspect

import pytest

import ctta.experiment
from conftest import make_tiny
from ctta import strategies
from ctta.cli import main
from ctta.config import load_yaml, resolve, strategy_defaults
from ctta.errors import ConfigError
from ctta.hparams import check_call, declarations, undeclared
from ctta.strategies.compose import PLUGINS, Composite

#: every registered strategy class built from a file (composites PLUGIN+HOST are classes made at registration)
CLASSES = {name: strategies.STRATEGIES.get(name) for name in strategies.list_strategies()
           if not issubclass(strategies.STRATEGIES.get(name), Composite)}
#: the constructors whose signatures are the declarations: strategies and plug-ins
CONSTRUCTORS = {**{n: c.__init__ for n, c in CLASSES.items()}, **{n: p.__init__ for n, p in PLUGINS.items()}}


def test_the_strategy_list_is_covered():
    assert {"tent", "cotta", "psmt", "lame", "aad", "vilaad", "er_ace", "mamba_fscil", "coso"} <= set(CLASSES)
    assert "lsa" in CONSTRUCTORS and all("+" not in n for n in CLASSES)


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_every_hyperparameter_is_declared(name):
    assert undeclared(CONSTRUCTORS[name]) == [], f"{name}: give these parameters a type (ctta.hparams)"


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_the_papers_values_and_the_signature_defaults_pass_their_declarations(name):
    fn = CONSTRUCTORS[name]
    packaged = strategy_defaults(name)
    assert check_call(fn, packaged, name) == packaged  # each YAML value fits (and keeps its value)
    signature = {k: d for k, (_, d) in declarations(fn).items() if d is not inspect.Parameter.empty}
    assert check_call(fn, signature, name) == signature


@pytest.mark.parametrize("name", sorted(strategies.list_strategies()))
def test_check_hparams_accepts_every_packaged_default(name):
    strategies.check_hparams(name, {})  # composites too: each part against its own declarations


def test_user_strings_become_the_declared_types():
    got = strategies.check_hparams("tent", {"lr": "1e-4", "steps": "2", "weight_decay": 0})
    assert got["lr"] == 1e-4 and type(got["lr"]) is float
    assert got["steps"] == 2 and type(got["steps"]) is int
    assert type(got["weight_decay"]) is float
    got = strategies.check_hparams("cotta", {"views_per_chunk": "auto", "hflip_p": None, "soft_augment": "true"})
    assert got["views_per_chunk"] == "auto" and got["hflip_p"] is None and got["soft_augment"] is True
    assert strategies.check_hparams("cotta", {"views_per_chunk": "4"})["views_per_chunk"] == 4
    # a string reaches the strategy as a float
    tent = strategies.create("tent", make_tiny(), lr="1e-4")
    assert tent.optimizer.param_groups[0]["lr"] == 1e-4
    # composites: per part, nested or flat
    got = strategies.check_hparams("lsa+tent", {"tent": {"lr": "1e-4"}, "ema": "0.5"})
    assert got["tent"]["lr"] == 1e-4 and got["lsa"]["ema"] == 0.5


BAD = [
    ("tent", "lr", "abc"),
    ("tent", "lr", -1),
    ("tent", "steps", -1),
    ("tent", "steps", "two"),
    ("cotta", "views", 0),
    ("cotta", "rst", "high"),
    ("cotta", "views_per_chunk", 0),
    ("lame", "affinity", "cosine"),
    ("psmt", "anchor", "previous"),
    ("rsgs", "rho", 0.0),
    ("coso", "threshold", 0.0),
    ("lae", "ema_decay", 1.5),
    ("mamba_fscil", "inc_grad_clip", 0.0),
    ("joint", "passes", 1.5),
]


@pytest.mark.parametrize("name, key, value", BAD)
def test_a_bad_value_is_one_line_naming_key_and_value(name, key, value):
    with pytest.raises(ConfigError) as e:
        strategies.check_hparams(name, {key: value})
    msg = str(e.value)
    assert "\n" not in msg and f"{key}={value!r}" in msg and "expected" in msg


def test_a_bad_lsa_value_is_refused_in_a_composite():
    with pytest.raises(ConfigError, match=r"\(lsa\): hyperparameter ema=1"):
        strategies.check_hparams("lsa+tent", {"lsa": {"ema": 1}})


@pytest.fixture
def no_stream(monkeypatch):
    """A stream (or a model) built before the hyperparameters are checked fails the test loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("a stream or model was built before the hyperparameters were checked")

    monkeypatch.setattr(ctta.experiment, "build_stream", refuse)
    monkeypatch.setattr(ctta.experiment, "build_model", refuse)


@pytest.mark.parametrize("name, key, value", BAD[:6])
def test_bad_values_fail_before_any_stream_is_built(no_stream, tmp_path, name, key, value):
    cfg = resolve({"stream": {"name": "cifar10c"}, "strategy": {"name": name, key: value},
                   "backbone": {"name": "tiny_cnn"}, "run": {"device": "cpu", "out": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match=f"strategy '{name}': hyperparameter {key}="):
        ctta.experiment.run_experiment(cfg, progress=False)


@pytest.mark.parametrize("override, shown", [
    ("strategy.lr=abc", "lr='abc'"),
    ("strategy.lr=-1", "lr=-1"),
    ("strategy.steps=-1", "steps=-1"),
    ("strategy.steps=two", "steps='two'"),
])
def test_the_cli_refuses_a_bad_value_in_one_line(no_stream, tmp_path, capsys, override, shown):
    code = main(["--stream", "cifar10c", "--strategy", "tent", "--backbone", "tiny_cnn", "--device", "cpu",
                 "--out", str(tmp_path / "run"), "--no-progress", "-q", "--set", override])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("ctta-bench: error:")]
    assert len(lines) == 1 and shown in lines[0] and "strategy 'tent'" in lines[0]


@pytest.mark.parametrize("strategy, override, shown", [
    ("cotta", "strategy.views=0", "views=0"),
    ("cotta", "strategy.rst=high", "rst='high'"),
])
def test_the_cli_refuses_cotta_values(no_stream, tmp_path, capsys, strategy, override, shown):
    code = main(["--stream", "cifar10c", "--strategy", strategy, "--backbone", "tiny_cnn", "--device", "cpu",
                 "--out", str(tmp_path / "run"), "--no-progress", "-q", "--set", override])
    assert code == 2 and shown in capsys.readouterr().err


def test_yaml_file_and_set_override_both_give_a_float(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("stream: {name: cifar10c}\nstrategy:\n  name: tent\n  lr: 1e-4\n")
    from_file = resolve(load_yaml(exp))
    from_set = resolve(None, {"strategy": {"name": "tent"}}, ["strategy.lr=1e-4"])
    for cfg in (from_file, from_set):
        hp = strategies.check_hparams("tent", {k: v for k, v in cfg["strategy"].items() if k != "name"})
        assert hp["lr"] == 1e-4 and type(hp["lr"]) is float
        tent = strategies.create("tent", make_tiny(), **hp)
        assert tent.optimizer.param_groups[0]["lr"] == 1e-4
