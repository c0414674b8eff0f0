"""SLCA: slow backbone / fast head SGD per session, class Gaussians stored once per class, classifier alignment of
the head on features sampled from them (logit-normalised), prediction with the aligned head."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.distributions.multivariate_normal import MultivariateNormal

import ctta
from conftest import stripe_data, tiny_vit, two_session_stream
from ctta import strategies
from ctta.strategies.common.gaussians import ClassGaussians
from ctta.strategies.slca import session_logits, session_norm_logits


_vit = tiny_vit


def _data(classes, n_per=8, seed=0):
    return stripe_data(classes, n_per, seed, size=16)


def _slca(**hp):
    return strategies.create("slca", _vit(), **{"ca_epochs": 2, "ca_samples": 16, **hp})


def _session(s, x, y, batch=8, close=True):
    for i in range(0, len(y), batch):
        s.learn(x[i:i + batch], y[i:i + batch])
    if close:
        s.close_session()


def _backbone(s):
    return {n: p.detach().clone() for n, p in s.model.named_parameters() if n not in s.head_names}


def test_backbone_learns_at_the_slow_rate_and_the_head_at_the_fast_one():
    s = _slca()
    backbone, head = s.optimizer.param_groups
    assert backbone["lr"] == pytest.approx(1e-4) and head["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in head["params"]} == {id(s.head_weight), id(s.head_bias)}
    assert {id(p) for p in backbone["params"]} == {id(p) for n, p in s.model.named_parameters()
                                                    if n not in s.head_names}
    assert all(g["weight_decay"] == 5e-4 and g["momentum"] == 0.9 for g in s.optimizer.param_groups)
    # MultiStepLR over the session's epochs (from the engine's segment): decayed from milestone 1 on
    m = _slca(milestones=[1])
    m.segment_start(SimpleNamespace(kind="train", num_samples=32, meta={"epochs": 2, "classes": [0, 1]}))
    x, y = _data([0, 1])
    lrs = []
    for i in range(0, 32, 8):
        m.learn(x.repeat(2, 1, 1, 1)[i:i + 8], y.repeat(2)[i:i + 8])
        lrs.append([g["lr"] for g in m.optimizer.param_groups])
    assert lrs[1] == pytest.approx([1e-4, 1e-2]) and lrs[2] == pytest.approx([1e-5, 1e-3])
    frozen = _slca(backbone_lr_scale=0.0)  # the reference's fix_bcb: only the head learns
    before = _backbone(frozen)
    _session(frozen, *_data([0, 1]))
    assert len(frozen.optimizer.param_groups) == 1
    assert all(torch.equal(before[n], p) for n, p in _backbone(frozen).items())


def test_training_moves_the_backbone_and_only_the_sessions_head_rows():
    s = _slca()
    w0, b0, bb0 = s.head_weight.detach().clone(), s.head_bias.detach().clone(), _backbone(s)
    assert 0.01 < float(w0.std()) < 0.03 and torch.equal(b0, torch.zeros(4))  # the reference's new-head init
    _session(s, *_data([0, 1]), close=False)
    assert not torch.equal(s.head_weight[:2], w0[:2])
    assert torch.equal(s.head_weight[2:], w0[2:]) and torch.equal(s.head_bias[2:], b0[2:])  # held despite decay
    assert any(not torch.equal(bb0[n], p) for n, p in _backbone(s).items())
    s.close_session()
    w1 = s.head_weight.detach().clone()
    _session(s, *_data([2, 3], seed=1))
    assert torch.equal(s.head_weight[:2], w1[:2]) and not torch.equal(s.head_weight[2:], w1[2:])


def test_stored_gaussians_are_the_class_means_and_covariances_of_the_session_features():
    s = _slca(ca_epochs=0)
    x, y = _data([0, 1])
    _session(s, x, y)
    f = s.features(x).double()
    for c in (0, 1):
        fc = f[y == c]
        torch.testing.assert_close(s.stats.means[c], fc.mean(0))
        cov = (fc - fc.mean(0)).T @ (fc - fc.mean(0)) / (len(fc) - 1) + 1e-4 * torch.eye(16, dtype=torch.float64)
        torch.testing.assert_close(s.stats.covs[c], cov.float())
    means, covs = s.stats.means[:2].clone(), s.stats.covs[:2].clone()
    _session(s, *_data([2, 3], seed=1))  # the backbone moves, the old classes keep their session's statistics
    assert torch.equal(s.stats.means[:2], means) and torch.equal(s.stats.covs[:2], covs)
    assert s.stats.present().tolist() == [True] * 4 and s.class_session.tolist() == [0, 0, 1, 1]


def test_class_gaussian_draws_are_multivariate_normal_draws_of_the_same_generator_state():
    st = ClassGaussians(2, 6)
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(20, 6, generator=g), torch.tensor([0, 1]).repeat(10)
    st.fit(f, y)
    ours = st.sample(1, 64, torch.Generator().manual_seed(7), mean_scale=0.95)
    torch.manual_seed(7)
    ref = MultivariateNormal((st.means[1] * 0.95).float(), st.covs[1].float()).sample((64,))
    assert torch.equal(ours, ref)


def test_logit_normalisation_matches_a_hand_computed_case():
    logits = torch.tensor([[3.0, 4.0, 1.0, 0.0, 0.0]])
    sessions = torch.tensor([0, 0, 1, 1, 1])
    norm = (5.0 + 1e-7 + 1.0 + 1e-7) / 2  # mean of the per-session L2 norms
    torch.testing.assert_close(session_norm_logits(logits, sessions, 0.1), logits / norm / 0.1)
    w, b, f = torch.randn(5, 3), torch.randn(5), torch.randn(4, 3)
    torch.testing.assert_close(session_logits(f, w, b, sessions), F.linear(f, w, b))


def test_alignment_changes_only_the_head_and_prediction_uses_the_aligned_one():
    s = _slca()
    _session(s, *_data([0, 1]))
    assert s.aligned_weight.numel() == 0  # no alignment after the first session
    x, y = _data([2, 3], seed=1)
    _session(s, x, y, close=False)
    bb, w, b = _backbone(s), s.head_weight.detach().clone(), s.head_bias.detach().clone()
    s.close_session()  # statistics of classes 2, 3, then the alignment
    assert all(torch.equal(bb[n], p) for n, p in _backbone(s).items())
    assert torch.equal(s.head_weight, w) and torch.equal(s.head_bias, b)  # the trained head is kept for later
    assert not torch.allclose(s.aligned_weight, w)
    xt, _ = _data([0, 1, 2, 3], n_per=2, seed=5)
    f = s.features(xt)
    torch.testing.assert_close(s.predict(xt), F.linear(f, s.aligned_weight, s.aligned_bias))
    # with a third class group unseen, its rows stay as trained and are masked
    t = strategies.create("slca", _vit(6), ca_epochs=1, ca_samples=8)
    _session(t, *_data([0, 1]))
    _session(t, *_data([2, 3], seed=1))
    assert torch.equal(t.aligned_weight[4:], t.head_weight[4:].detach())
    assert torch.isinf(t.predict(xt)[:, 4:]).all()


def test_deterministic_under_a_seed_and_the_alignment_draws_depend_on_it():
    runs = []
    for seed in (0, 0, 1):
        s = strategies.create("slca", _vit(), ca_epochs=2, ca_samples=16, head_init="keep", seed=seed)
        _session(s, *_data([0, 1]))
        _session(s, *_data([2, 3], seed=1))
        runs.append(s)
    assert torch.equal(runs[0].aligned_weight, runs[1].aligned_weight)
    assert torch.equal(runs[0].head_weight, runs[2].head_weight)  # training draws nothing
    assert not torch.equal(runs[0].aligned_weight, runs[2].aligned_weight)


def test_checkpoint_round_trip_restores_the_aligned_head_and_statistics():
    s = _slca()
    _session(s, *_data([0, 1]))
    _session(s, *_data([2, 3], seed=1))
    state = s.checkpoint_state()
    fresh = _slca()
    fresh.load_checkpoint_state(state)
    xt, _ = _data([0, 1, 2, 3], n_per=2, seed=5)
    assert torch.equal(fresh.predict(xt), s.predict(xt))
    assert torch.equal(fresh.stats.covs, s.stats.covs) and fresh.class_order == s.class_order == [0, 1, 2, 3]
    fresh.reset()
    assert fresh.aligned_weight.numel() == 0 and not fresh.stats.present().any()


def test_slca_runs_a_two_session_class_incremental_stream():
    s = _slca()
    res = ctta.run(two_session_stream(_data), s, device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()
    assert s.sessions.session == 1 and s.class_order == [0, 1, 2, 3] and s.aligned_weight.shape == (4, 16)
