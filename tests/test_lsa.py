"""LSA (label-shift adapter) and PLUGIN+HOST composition: identity at the source prior, composition and refusals,
the online label-distribution estimate, determinism, checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ctta import strategies
from ctta.config import resolve, strategy_defaults
from ctta.errors import CheckpointError, ConfigError, CttaError, UnsupportedError
from ctta.strategies.compose import composable_hosts
from ctta.strategies.lsa import LabelShiftModel, load_adapter, sample_priors, train_adapter

from conftest import make_tiny

K = 4


def _source(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % K


FAST = dict(train_steps=10, train_batch=64, priors_per_step=4, hidden=16)


def _lsa(host: str = "tent", seed: int = 0, **hp):
    return strategies.create(f"lsa+{host}", make_tiny(num_classes=K), source_data=_source(), seed=seed,
                             **{**FAST, **hp})


def test_adapter_is_identity_at_the_source_distribution_after_training():
    model = make_tiny(num_classes=K)
    x, y = _source()
    adapter = train_adapter(model, x, y, steps=40, batch_size=64, priors_per_step=4, hidden=16, lr=1e-2)
    # the adapter learned something (the last layer starts at zero)
    assert adapter.net[-1].weight.abs().sum() > 0
    gamma, beta, delta = adapter(adapter.source_prior)
    assert torch.equal(gamma, torch.ones_like(gamma)) and not beta.any() and not delta.any()
    wrapped = LabelShiftModel(model, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x), rtol=0, atol=1e-6)
        # a shifted prior changes the output, and moves it towards the boosted class
        wrapped.estimate.copy_(torch.tensor([0.7, 0.1, 0.1, 0.1]))
        shifted = wrapped(x)
    assert (shifted.softmax(1)[:, 0] > model(x).softmax(1)[:, 0]).float().mean() > 0.9


def test_sampled_priors_are_distributions():
    p = sample_priors(64, 10, 100.0, torch.Generator().manual_seed(0))
    assert p.shape == (64, 10) and (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(64))


def test_lsa_source_matches_source_until_the_estimate_moves(images):
    x, y = _source()
    s = strategies.create("lsa+source", make_tiny(num_classes=K), source_data=(x, y), **FAST)
    ref = make_tiny(num_classes=K)
    assert s.name == "lsa+source"
    torch.testing.assert_close(s.predict(images), ref(images), rtol=0, atol=1e-6)
    first = s.adapt(images)
    torch.testing.assert_close(first, ref(images), rtol=0, atol=1e-6)
    assert not torch.allclose(s.predict(images), ref(images)), "the estimate moved, so the adapter acts"


def test_composition_with_every_composable_host(images):
    hosts = composable_hosts("lsa")
    assert {"source", "bn", "tent"} <= set(hosts)
    built = []
    for host in hosts:
        try:
            s = _lsa(host)
        except UnsupportedError as e:  # a host whose build shows it cannot carry the adapter
            assert "\n" not in str(e) and "refused" in str(e)
            continue
        assert s.name == f"lsa+{host}" and s.step_kinds == strategies.STRATEGIES.get(host).step_kinds
        out = s.adapt(images)
        assert out.shape == (16, K) and torch.isfinite(out).all()
        assert s.host.model is s.model and isinstance(s.model, LabelShiftModel)
        built.append(host)
    assert {"source", "bn", "tent"} <= set(built)


def test_lsa_tent_adapts_norm_affines_only_and_the_estimate(images):
    s = _lsa("tent", lr=1e-2)
    adapter_before = {k: v.clone() for k, v in s.model.adapter.state_dict().items()}
    est0 = s.model.estimate.clone()
    for _ in range(3):
        s.adapt(images)
    assert all(torch.equal(v, s.model.adapter.state_dict()[k]) for k, v in adapter_before.items())
    assert not torch.equal(est0, s.model.estimate)
    names = {n for n, p in s.model.named_parameters() if any(p is q for q in s.trainable_parameters())}
    assert names == {"model.bn1.weight", "model.bn1.bias", "model.bn2.weight", "model.bn2.bias"}
    assert strategies.create("lsa", make_tiny(num_classes=K), source_data=_source(), **FAST).name == "lsa+tent"


@pytest.mark.parametrize("name, error, message", [
    ("lsa+finetune", UnsupportedError, "not a test-time strategy"),
    ("lsa+cotta", UnsupportedError, "keeps its own copies of the model"),
    ("lsa+lsa", UnsupportedError, "is a plug-in, not a host"),
    ("lsa+nosuch", CttaError, "unknown strategy 'nosuch'"),
    ("tent+bn", ConfigError, "'tent' is not a plug-in"),
    ("lsa+tent+bn", ConfigError, r"must look like PLUGIN\+HOST"),
])
def test_refused_compositions_are_one_line_errors(name, error, message):
    with pytest.raises(error, match=message) as e:
        strategies.create(name, make_tiny(num_classes=K), source_data=_source(), **FAST)
    assert "\n" not in str(e.value)


def test_refusal_before_any_work_by_name():
    with pytest.raises(UnsupportedError, match="not a test-time strategy"):
        strategies.check_name("lsa+finetune")
    strategies.check_name("lsa+tent")


def test_missing_adapter_and_data_is_a_config_error():
    with pytest.raises(ConfigError, match="lsa needs a trained adapter"):
        strategies.create("lsa+tent", make_tiny(num_classes=K))


def test_estimate_converges_to_the_true_marginal_with_a_perfect_classifier():
    class Perfect(nn.Module):
        """Inputs are scaled one-hot labels; features = inputs, head = identity: a perfect, confident classifier."""

        num_classes = K

        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(K, K)
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(K))
                self.head.bias.zero_()

        def forward_features(self, x):
            return x.flatten(1)

        def forward_head(self, f):
            return self.head(f)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    def onehot(y):
        return 20.0 * torch.nn.functional.one_hot(y, K).float().view(-1, K, 1, 1)

    ys = torch.arange(200) % K
    s = strategies.create("lsa+source", Perfect(), source_data=(onehot(ys), ys), ema=0.95, **FAST)
    marginal = torch.tensor([0.55, 0.25, 0.15, 0.05])
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        y = torch.multinomial(marginal, 64, replacement=True, generator=g)
        assert torch.equal(s.adapt(onehot(y)).argmax(1), y)
    torch.testing.assert_close(s.model.estimate, marginal, rtol=0, atol=0.03)


def test_same_seed_same_adapter_and_predictions(images):
    a, b, c = _lsa(seed=3), _lsa(seed=3), _lsa(seed=4)
    for k, v in a.model.adapter.state_dict().items():
        assert torch.equal(v, b.model.adapter.state_dict()[k])
    assert not torch.equal(a.model.adapter.net[0].weight, c.model.adapter.net[0].weight)
    for _ in range(3):
        assert torch.equal(a.adapt(images), b.adapt(images))
    assert torch.equal(a.model.estimate, b.model.estimate)


def test_checkpoint_resume_and_reset_keep_the_estimate(images):
    s = _lsa(seed=1)
    for _ in range(2):
        s.adapt(images)
    state = copy.deepcopy(s.checkpoint_state())  # as the engine's torch.save / torch.load round trip
    est = s.model.estimate.clone()
    resumed = _lsa(seed=1)
    resumed.load_checkpoint_state(state)
    assert torch.equal(resumed.model.estimate, est)
    for _ in range(2):
        assert torch.equal(s.adapt(images), resumed.adapt(images))
    s.reset()
    assert torch.equal(s.model.estimate, s.model.adapter.source_prior)


def test_adapter_checkpoint_written_then_loaded(tmp_path, images):
    path = tmp_path / "adapter.pt"
    first = strategies.create("lsa+bn", make_tiny(num_classes=K), source_data=_source(), adapter=str(path), **FAST)
    assert path.is_file()
    again = strategies.create("lsa+bn", make_tiny(num_classes=K), adapter=str(path))
    for k, v in first.model.adapter.state_dict().items():
        assert torch.equal(v, again.model.adapter.state_dict()[k])
    assert torch.equal(first.adapt(images), again.adapt(images))
    assert load_adapter(path).num_classes == K
    bad = tmp_path / "bad.pt"
    torch.save({"x": 1}, bad)
    with pytest.raises(CheckpointError, match="not an lsa adapter"):
        strategies.create("lsa+bn", make_tiny(num_classes=K), adapter=str(bad))


def test_composite_hyperparameters_nested_flat_and_config():
    d = strategy_defaults("lsa+tent")
    assert d["tent"]["lr"] == 1e-3 and d["lsa"]["ema"] == 0.9
    cfg = resolve({"strategy": {"name": "lsa+tent"}}, None, ["strategy.lsa.ema=0.5", "strategy.tent.lr=1.0e-4"])
    assert cfg["strategy"]["lsa"]["ema"] == 0.5 and cfg["strategy"]["tent"]["lr"] == 1e-4
    assert cfg["strategy"]["lsa"]["hidden"] == 128 and cfg["strategy"]["tent"]["steps"] == 1
    hp = {k: v for k, v in cfg["strategy"].items() if k != "name"}
    hp["lsa"].update(FAST, source_data=_source())
    s = strategies.create("lsa+tent", make_tiny(num_classes=K), **hp)
    assert s.plugin.ema == 0.5 and s.host.optimizer.param_groups[0]["lr"] == 1e-4
    flat = _lsa(ema=0.7, lr=5e-4)
    assert flat.plugin.ema == 0.7 and flat.host.optimizer.param_groups[0]["lr"] == 5e-4
    with pytest.raises(ConfigError, match="has no hyperparameter 'nope'"):
        _lsa(nope=1)
    with pytest.raises(ConfigError, match="lsa has no hyperparameter 'lr'"):
        strategies.create("lsa+tent", make_tiny(num_classes=K), lsa={"lr": 1})


def test_trained_adapter_is_cached_by_its_inputs_and_loaded_on_the_next_build(tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.setenv("CTTA_BENCH_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="ctta")

    def build(seed=0, **hp):
        torch.manual_seed(123)
        s = _lsa(seed=seed, **hp)
        return s, torch.rand(3)  # the global random numbers a run would go on with

    first, after_training = build()
    assert "training the label-shift adapter" in caplog.text and "adapter steps" in caplog.text
    assert "lsa adapter: about" in caplog.text  # the measured estimate of the training time
    cached = list((tmp_path / "cache" / "lsa").glob("adapter-*.pt"))
    assert len(cached) == 1
    caplog.clear()
    again, after_loading = build()
    assert "loaded the adapter trained earlier" in caplog.text and str(cached[0]) in caplog.text
    assert "training the label-shift adapter" not in caplog.text
    for k, v in first.model.adapter.state_dict().items():
        assert torch.equal(v, again.model.adapter.state_dict()[k])
    assert torch.equal(after_training, after_loading), "a cache hit leaves the run's random numbers as training does"
    # any input that changes the adapter is in the key: the seed, a hyperparameter, the backbone's weights
    caplog.clear()
    build(seed=1)
    build(hidden=8)
    torch.manual_seed(5)
    strategies.create("lsa+tent", make_tiny(seed=7, num_classes=K), source_data=_source(), **FAST)
    assert caplog.text.count("training the label-shift adapter") == 3
    assert len(list((tmp_path / "cache" / "lsa").glob("adapter-*.pt"))) == 4


def test_adapter_cache_key_follows_a_source_file_size_and_mtime(tmp_path, monkeypatch, npz_dataset, caplog):
    import logging
    import os

    from ctta.strategies.lsa import adapter_cache_path

    def tiny10():
        m = make_tiny(num_classes=10)
        m.num_classes = 10  # as ctta.backbones models say, so a path is read as CIFAR-10
        return m

    monkeypatch.setenv("CTTA_BENCH_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="ctta")
    model, hp = tiny10(), {"steps": 10}
    key = adapter_cache_path(model, str(npz_dataset), hp)
    assert key is not None and key.parent == tmp_path / "cache" / "lsa"
    assert adapter_cache_path(tiny10(), str(npz_dataset), hp) == key
    assert adapter_cache_path(model, str(npz_dataset.parent), hp) != key  # the folder: another identity
    first = strategies.create("lsa+bn", tiny10(), source_data=str(npz_dataset), **FAST)
    again = strategies.create("lsa+bn", tiny10(), source_data=str(npz_dataset), **FAST)
    assert caplog.text.count("training the label-shift adapter") == 1 and "loaded the adapter" in caplog.text
    assert torch.equal(first.model.adapter.net[0].weight, again.model.adapter.net[0].weight)
    st = npz_dataset.stat()
    os.utime(npz_dataset, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert adapter_cache_path(model, str(npz_dataset), hp) != key  # a changed file is trained on again
