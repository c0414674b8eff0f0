"""Continual-learning baselines: class masking, reservoir buffer, ER / ER-ACE, joint, SimpleCIL, FSA + incremental LDA."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ctta
from conftest import make_tiny, quadrant_data, two_session_stream
from ctta import strategies
from ctta.strategies.common.lda import IncrementalLDA
from ctta.strategies.common.replay import ReservoirBuffer
from ctta.strategies.er import ace_incoming_loss

CL = ["finetune", "er", "er_ace", "joint", "simplecil", "fsa"]


def _data(classes, n_per=12, seed=0):
    return quadrant_data(classes, n_per, seed)


def _ci_stream(batch=8):
    return two_session_stream(_data, n_eval=6, batch=batch)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---- class masking ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["finetune", "er", "er_ace", "joint", "fsa"])
def test_unseen_classes_are_masked_in_prediction(name):
    s = strategies.create(name, make_tiny(num_classes=4))
    x, y = _data([0, 1])
    assert torch.isfinite(s.predict(x)).all()  # nothing learned: full head
    s.learn(x[:8], y[:8])
    out = s.predict(x)
    assert torch.isinf(out[:, 2:]).all() and torch.isfinite(out[:, :2]).all()
    assert set(out.argmax(1).tolist()) <= {0, 1}


# ---- reservoir buffer --------------------------------------------------------------------------------------------

def test_reservoir_never_exceeds_capacity_and_keeps_a_uniform_sample():
    n, cap, trials, batch = 40, 8, 600, 7
    counts = torch.zeros(n)
    for t in range(trials):
        g = torch.Generator().manual_seed(t)
        buf = ReservoirBuffer(cap)
        for i in range(0, n, batch):
            ids = torch.arange(i, min(i + batch, n))
            buf.add(ids.float().view(-1, 1), ids, g)
            assert len(buf) == min(i + len(ids), cap)
        _, held = buf.items()
        assert len(set(held.tolist())) == cap  # no duplicates, full
        counts[held] += 1
    freq = counts / trials
    sigma = math.sqrt(cap / n * (1 - cap / n) / trials)
    assert (freq - cap / n).abs().max() < 5 * sigma  # each item kept with probability capacity / n
    bx, by = buf.sample(5, torch.Generator().manual_seed(0))
    assert bx.shape == (5, 1) and len(set(by.tolist())) == 5 and set(by.tolist()) <= set(held.tolist())


# ---- ER-ACE ----------------------------------------------------------------------------------------------------------

def test_er_ace_incoming_loss_ignores_absent_classes():
    logits = torch.tensor([[2.0, 1.0, 5.0, 0.0], [0.0, 3.0, 9.0, 1.0]])
    y = torch.tensor([0, 1])  # classes 2 and 3 absent from the batch
    expected = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1))) +
                 math.log(math.exp(3) / (math.exp(0) + math.exp(3)))) / 2
    assert abs(ace_incoming_loss(logits, y).item() - expected) < 1e-6
    # the logits of absent classes get no gradient
    z = logits.clone().requires_grad_(True)
    ace_incoming_loss(z, y).backward()
    assert torch.all(z.grad[:, 2:] == 0) and torch.all(z.grad[:, :2] != 0)


def _seg_end(s):
    s.segment_end(type("Seg", (), {"kind": "train"})())


def test_er_ace_forwards_incoming_and_replayed_separately_as_the_official_baseline():
    import copy

    s = strategies.create("er_ace", make_tiny(num_classes=4), replay_batch_size=6)
    x0, y0 = _data([0, 1])
    s.learn(x0[:8], y0[:8])
    _seg_end(s)
    drawn = []
    sample = s.buffer.sample

    def recording(k, generator=None):
        out = sample(k, generator)
        drawn.append(out)
        return out

    s.buffer.sample = recording
    before = copy.deepcopy(s.model).train()
    sizes = []
    hook = s.model.register_forward_pre_hook(lambda mod, a: sizes.append(int(a[0].shape[0])))
    x1, y1 = _data([2, 3], seed=1)
    s.learn(x1[:8], y1[:8])
    hook.remove()
    assert sizes == [8, 6]  # two forwards: incoming, then replayed
    bx, _ = drawn[0]
    sep, cat = copy.deepcopy(before), copy.deepcopy(before)
    with torch.no_grad():
        sep(x1[:8]), sep(bx)
        cat(torch.cat([x1[:8], bx]))
    for name in ("bn1", "bn2"):
        got = getattr(s.model, name)
        assert torch.allclose(got.running_mean, getattr(sep, name).running_mean, atol=1e-6)
        assert torch.allclose(got.running_var, getattr(sep, name).running_var, atol=1e-6)
        assert not torch.allclose(got.running_mean, getattr(cat, name).running_mean, atol=1e-4)


def test_er_ace_incoming_mask_keeps_future_classes_and_the_first_task_uses_all():
    s = strategies.create("er_ace", make_tiny(num_classes=6))
    logits = torch.tensor([[2.0, 1.0, 5.0, 0.0, 1.5, -1.0], [0.0, 3.0, 9.0, 1.0, 0.5, 2.0]])
    y = torch.tensor([0, 1])
    x0, y0 = _data([0, 1])
    s.learn(x0[:8], y0[:8])  # first task: plain cross-entropy over every output, future classes included
    assert torch.allclose(s.loss(logits, y, 2), F.cross_entropy(logits, y))
    z = logits.clone().requires_grad_(True)
    s.loss(z, y, 2).backward()
    assert (z.grad[:, 2:] != 0).all()
    # the first step trained every output: the unseen classes' bias moved too
    assert (s.model.fc.bias[2:] != make_tiny(num_classes=6).fc.bias[2:]).all()
    _seg_end(s)
    x1, y1 = _data([2, 3], seed=1)
    s.learn(x1[:8], y1[:8])  # seen: 0..3; incoming batch with classes 2, 3: 0 and 1 masked, 4 and 5 (future) kept
    ynew = torch.tensor([2, 3])
    keep = [2, 3, 4, 5]
    expected = F.cross_entropy(logits[:, keep], torch.tensor([0, 1]))
    assert torch.allclose(s.loss(logits, ynew, 2), expected, atol=1e-6)
    # with a replayed part: incoming as above plus the replayed cross-entropy over every output
    both = torch.cat([logits, logits.flip(0)])
    yb = torch.cat([ynew, torch.tensor([0, 1])])
    assert torch.allclose(s.loss(both, yb, 2), expected + F.cross_entropy(logits.flip(0), torch.tensor([0, 1])),
                          atol=1e-6)


# ---- incremental LDA ---------------------------------------------------------------------------------------------

def _lda_direct(f, y, num_classes):
    """FSA's official head computed from all features at once (src/utils.py compute_lda_head)."""
    cov = torch.cov(f.T, correction=1) + torch.eye(f.shape[1], dtype=f.dtype)
    chol = torch.linalg.cholesky(cov)
    means = torch.stack([f[y == c].mean(0) for c in range(num_classes)])
    coef = torch.cholesky_solve(means.T, chol)
    return coef.T, -0.5 * (coef * means.T).sum(0)


def test_incremental_lda_equals_lda_on_all_data():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(300, 6, generator=g, dtype=torch.float64) * 2 + 1
    y = torch.arange(300) % 5
    f[torch.arange(300), y] += 3.0
    lda = IncrementalLDA(6, 5)  # FSA defaults: total covariance, ridge 1, ddof 1
    for i in range(0, 300, 37):  # uneven chunks, classes arriving in any order
        lda.update(f[i:i + 37], y[i:i + 37])
    w, b = lda.solve()
    w0, b0 = _lda_direct(f, y, 5)
    assert torch.allclose(w, w0, atol=1e-5) and torch.allclose(b, b0, atol=1e-5)


def test_incremental_lda_matches_sklearn_with_the_same_shrinkage():
    sk = pytest.importorskip("sklearn.discriminant_analysis")
    g = torch.Generator().manual_seed(1)
    f = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = torch.arange(200) % 4
    f[torch.arange(200), y] += 2.0
    lda = IncrementalLDA(5, 4, covariance="within", ridge=0.0, shrinkage=0.3, ddof=0, priors=True)
    for i in range(0, 200, 50):
        lda.update(f[i:i + 50], y[i:i + 50])
    w, b = lda.solve()
    ref = sk.LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.3).fit(f.numpy(), y.numpy())
    assert torch.allclose(w, torch.from_numpy(ref.coef_), atol=1e-5)
    assert torch.allclose(b, torch.from_numpy(ref.intercept_), atol=1e-5)


# ---- every strategy on a 2-session class-incremental stream --------------------------------------------------

@pytest.mark.parametrize("name", CL)
def test_strategy_runs_a_two_session_class_incremental_stream(name):
    torch.manual_seed(0)
    s = strategies.create(name, make_tiny(num_classes=4))
    res = ctta.run(_ci_stream(), s, device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()
    assert s.sessions.session == 1


# ---- frozen parts stay bit-identical ----------------------------------------------------------------------------

def test_simplecil_keeps_the_backbone_and_builds_exact_prototypes():
    model = make_tiny(num_classes=4)
    before = _state(model)
    s = strategies.create("simplecil", model)
    x, y = _data([0, 1, 2, 3])
    for i in range(0, len(y), 10):
        s.learn(x[i:i + 10], y[i:i + 10])
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    with torch.no_grad():
        f = model.forward_features(x)
    protos = torch.stack([f[y == c].mean(0) for c in range(4)])
    assert torch.allclose(s.class_sums / s.class_counts.unsqueeze(1), protos, atol=1e-5)
    expected = F.normalize(f, dim=1) @ F.normalize(protos, dim=1).T
    assert torch.allclose(s.predict(x), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "film"])
def test_fsa_adapts_only_in_the_first_session_then_lda_is_exact(mode):
    torch.manual_seed(0)
    model = make_tiny(num_classes=4)
    source = _state(model)
    s = strategies.create("fsa", model, mode=mode, lr=0.01)
    if mode == "film":  # FiLM after each norm layer + the linear head
        assert sum(p.numel() for p in s.trainable_parameters()) == 2 * (8 + 8) + 8 * 4 + 4
    x0, y0 = _data([0, 1], seed=0)
    x1, y1 = _data([2, 3], seed=1)
    for i in range(0, len(y0), 8):
        s.learn(x0[i:i + 8], y0[i:i + 8])
    body = {k: v for k, v in _state(s.model).items() if "fc." not in k}
    changed = [k for k, v in body.items() if k.replace(".base.", ".") in source
               and not torch.equal(v, source[k.replace(".base.", ".")])]
    assert changed if mode == "full" else all(".bn" not in k and not k.startswith("conv") for k in changed)
    s.predict(x0[:4])  # ends session 0: the body is frozen, the first session's data goes into the LDA
    frozen = _state(s.model)
    assert s.body_frozen and len(s.first) == 0
    for i in range(0, len(y1), 8):
        s.learn(x1[i:i + 8], y1[i:i + 8])
    out = s.predict(x1)
    after = _state(s.model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # bit-identical body (and head) after session 0
    # the LDA equals FSA's head fitted on all training features of the frozen body at once
    with torch.no_grad():
        s.model.eval()
        f = s.model.forward_features(torch.cat([x0, x1])).double()
    w0, b0 = _lda_direct(f, torch.cat([y0, y1]), 4)
    w, b = s.lda.solve()
    assert torch.allclose(w, w0, atol=1e-5) and torch.allclose(b, b0, atol=1e-5)
    with torch.no_grad():
        expected = (s.model.forward_features(x1).double() @ w0.T + b0).float()
    assert torch.allclose(out, expected, atol=1e-3, rtol=1e-5)


def test_er_checkpoint_carries_the_buffer_and_reset_empties_it():
    s = strategies.create("er", make_tiny(num_classes=4), buffer_size=10)
    x, y = _data([0, 1])
    s.learn(x[:8], y[:8])
    s.learn(x[8:16], y[8:16])
    state = s.checkpoint_state()
    t = strategies.create("er", make_tiny(num_classes=4), buffer_size=10)
    t.load_checkpoint_state(state)
    assert len(t.buffer) == 10 and torch.equal(t.buffer.items()[1], s.buffer.items()[1])
    assert t.sessions.session == 0
    s.reset()
    assert len(s.buffer) == 0 and s.sessions.session == -1


@pytest.mark.slow
def test_digits_ci_stream_with_er():
    inc = pytest.importorskip("ctta.streams.incremental")
    pytest.importorskip("sklearn")
    stream = ctta.streams.create("digits_ci", init_classes=5, increment=5, train_per_class=20, test_per_class=10)
    model = ctta.backbones.create("tiny_cnn", num_classes=10, width=8)
    res = ctta.run(stream, strategies.create("er", model, buffer_size=50), device="cpu", progress=False)
    assert (res.segments["kind"] == "eval").sum() == 2 and inc is not None


# ---- joint: retrain from scratch on the union at each session end ---------------------------------------------------

def test_joint_retrain_restarts_from_initial_weights_and_visits_every_stored_sample_once():
    torch.manual_seed(0)
    s = strategies.create("joint", make_tiny(num_classes=4), lr=0.05)
    initial = _state(s.model)
    calls = []
    step = s.sgd_step

    def spy(x, y):
        calls.append((_state(s.model) if not calls else None, y.clone()))
        step(x, y)

    s.sgd_step = spy
    for classes in ([0, 1], [2, 3]):
        x, y = _data(classes)
        for i in range(0, len(y), 8):
            s.learn(x[i:i + 8], y[i:i + 8])
            assert not calls  # retrain mode: nothing trains while the session's batches arrive
        s.close_session()
        first = calls[0][0]
        assert all(torch.equal(first[k], initial[k]) for k in initial)  # from scratch, not from the last model
        seen = torch.cat([c[1] for c in calls])
        assert len(seen) == len(s.store) and all(len(c[1]) <= 8 for c in calls)
        assert sorted(seen.tolist()) == sorted(s.store.items()[1].tolist())  # every stored sample exactly once
        calls.clear()
    assert set(s.store.items()[1].tolist()) == {0, 1, 2, 3}
    t = strategies.create("joint", make_tiny(num_classes=4), passes=3)
    t.sgd_step = lambda x, y: calls.append((None, y.clone()))
    x, y = _data([0, 1])
    t.learn(x, y)
    t.close_session()
    assert sum(len(c[1]) for c in calls) == 3 * len(y)
    with pytest.raises(ctta.errors.ConfigError, match="passes"):
        strategies.create("joint", make_tiny(num_classes=4), passes=0)


def test_joint_streaming_steps_on_each_batch_and_bad_mode_is_refused():
    s = strategies.create("joint", make_tiny(num_classes=4), mode="streaming")
    before = _state(s.model)
    x, y = _data([0, 1])
    s.learn(x[:8], y[:8])
    assert any(not torch.equal(before[k], v) for k, v in _state(s.model).items())
    with pytest.raises(ctta.errors.ConfigError, match="mode"):
        strategies.create("joint", make_tiny(num_classes=4), mode="offline")


# ---- FSA on the EfficientNet-B0 (timm, random weights) -------------------------------------------------------

#: official FilmEfficientNet.get_adaptation_config for B0: stem 32, each block's depthwise channels, head 1280
B0_FILM_MAPS = [32, 32, 96, 144, 144, 240, 240, 480, 480, 480, 672, 672, 672, 1152, 1152, 1152, 1152, 1280]


def test_fsa_film_on_efficientnet_b0_trains_norm_films_and_head_then_freezes():
    torch.manual_seed(0)
    model = ctta.backbones.create("efficientnet_b0", num_classes=4)
    s = strategies.create("fsa", model, mode="film", lr=0.01)
    head = 1280 * 4 + 4
    assert sum(p.numel() for p in s.trainable_parameters()) == 2 * sum(B0_FILM_MAPS) + head
    x0, y0 = _data([0, 1], n_per=4)
    x1, y1 = _data([2, 3], n_per=4, seed=1)
    up = lambda x: F.interpolate(x, size=32)  # noqa: E731  (EfficientNet needs more than 8 x 8 pixels)
    before = _state(s.model)
    s.learn(up(x0), y0)
    changed = {k for k, v in _state(s.model).items() if k in before and not torch.equal(v, before[k])}
    assert changed and all("film" in k or "scale" in k or "shift" in k or "classifier" in k
                           or "running" in k or "num_batches" in k for k in changed)
    s.predict(up(x0[:2]))  # ends session 0
    frozen = _state(s.model)
    s.learn(up(x1), y1)
    out = s.predict(up(x1))
    assert all(torch.equal(frozen[k], v) for k, v in _state(s.model).items())
    assert out.shape == (8, 4) and set(out.argmax(1).tolist()) <= {0, 1, 2, 3}


def test_fsa_film_on_efficientnet_b0_sits_exactly_where_the_official_code_puts_it():
    """Official FilmEfficientNet: FiLM after the stem BN, each block's depthwise-conv BN and the head BN (timm:
    ``bn1``; ``blocks.*.*.bn1`` of DepthwiseSeparableConv, ``bn2`` of InvertedResidual; ``bn2``), nowhere else."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    from ctta.backbones.peft import FiLM

    torch.manual_seed(0)
    model = ctta.backbones.create("efficientnet_b0", num_classes=4)  # random weights, no download
    net = model.net
    want = ["net.bn1"]
    for i, stage in enumerate(net.blocks):
        for j, block in enumerate(stage):
            assert isinstance(block, (DepthwiseSeparableConv, InvertedResidual))
            dw_bn = "bn1" if isinstance(block, DepthwiseSeparableConv) else "bn2"
            assert getattr(block, dw_bn).num_features == block.conv_dw.out_channels  # the BN right after conv_dw
            want.append(f"net.blocks.{i}.{j}.{dw_bn}")
    want.append("net.bn2")
    channels = [model.get_submodule(n).num_features for n in want]
    assert channels == B0_FILM_MAPS
    x = torch.rand(2, 3, 32, 32)
    before = model(x)
    s = strategies.create("fsa", model, mode="film")
    films = {n: m for n, m in s.model.named_modules() if isinstance(m, FiLM)}
    assert sorted(films) == sorted(want) == sorted(s.film_names)
    film_params = sum(p.numel() for m in films.values() for p in m.peft_parameters())
    assert film_params == 2 * sum(channels) == 2 * sum(B0_FILM_MAPS)
    plain = [n for n, m in s.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and n not in want
             and not n.endswith(".base")]
    assert plain and all(not isinstance(s.model.get_submodule(n), FiLM) for n in plain)  # expand/project BNs: none
    torch.testing.assert_close(s.model(x), before)  # identity at init
    # the modulation sits between the BN and its swish (official: swish(film(bn(x)))), not after the activation
    stem = s.model.get_submodule("net.bn1")
    with torch.no_grad():
        stem.scale.fill_(-1.0)
        stem.shift.fill_(0.5)
        h = torch.randn(2, 32, 5, 5)
        bn = torch.nn.functional.batch_norm(h, stem.base.running_mean, stem.base.running_var, stem.base.weight,
                                            stem.base.bias, False, 0.0, stem.base.eps)
        torch.testing.assert_close(stem(h), torch.nn.functional.silu(-bn + 0.5))
    # film_layers='all': every norm layer (the former rule)
    every = strategies.create("fsa", ctta.backbones.create("efficientnet_b0", num_classes=4), mode="film",
                              film_layers="all")
    n_bn = sum(1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and not isinstance(m, FiLM))
    assert len(every.film_names) == n_bn > len(want)


def test_fsa_film_on_other_backbones_goes_after_every_norm_layer_and_says_so(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="ctta.strategies.fsa"):
        s = strategies.create("fsa", make_tiny(num_classes=4), mode="film")
    assert "defined for EfficientNet only" in caplog.text
    assert len(s.film_names) == 2  # the tiny net's two BatchNorms
