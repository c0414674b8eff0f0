"""CMF (``cmf``): the filter's gain and its parameter-space update by hand, what it updates and never touches, its
defaults, the consistency view's draws, reset and determinism."""
from __future__ import annotations

import math

import torch

from conftest import make_tiny
from ctta import strategies
from ctta.strategies.cmf import Q_REFERENCE_PARAMS, filter_gain
from ctta.strategies.common.augment import AugmentConfig, TTAAugment

N_TINY = 2 * (8 + 8)  # the tiny model's adapted scalars: bn1 and bn2, weight and bias, 8 channels each


def test_filter_gain_is_the_kalman_update_of_a_scalar_variance_clipped_as_the_reference():
    q, a = 0.01, 0.99
    beta, var = filter_gain(0.05, q, a, 0.89, 0.9999)
    p = a * a * 0.05 + q  # predict
    gain = p / (p + (1 - q))  # K = P / (P + R), R = 1 - q
    assert 0.89 < beta < 0.9999 and math.isclose(beta, 1 - gain, rel_tol=1e-12)
    assert math.isclose(var, (1 - gain) * p, rel_tol=1e-12)
    beta, var = filter_gain(100.0, q, a, 0.89, 0.9999)  # a large variance: beta clipped below
    assert beta == 0.89 and math.isclose(var, 0.89 * (a * a * 100.0 + q))
    beta, var = filter_gain(0.0, 1e-5, a, 0.89, 0.9999)  # beta = 1 - 1e-5 >= 0.9999: set to 1
    assert beta == 1.0 and var == 1e-5
    # the first steps on ResNet-20's 1376 adapted scalars: beta = 1 - q, then falling towards its fixed point
    q = 0.005 * 1376 / 38400
    betas, v = [], 0.0
    for _ in range(400):
        b, v = filter_gain(v, q, a, 0.89, 0.9999)
        betas.append(b)
    assert math.isclose(betas[0], 1 - q) and all(x > y for x, y in zip(betas[:50], betas[1:51]))
    p_fixed = q / (1 - a * a)  # P = a^2 P + q at the fixed point of the prediction (before the update shrinks it)
    assert 1 - p_fixed < betas[-1] < 1 - q


def test_defaults_are_the_reference_ones_and_q_scales_with_the_adapted_scalars():
    s = strategies.create("cmf", make_tiny())
    assert (s.alpha, s.gamma, s.beta_min, s.beta_max) == (0.99, 0.99, 0.89, 0.9999)
    assert s.num_adapted == N_TINY and s.q == 0.005 * (N_TINY / Q_REFERENCE_PARAMS)
    assert s.use_weighting and s.use_consistency and s.use_prior_correction and s.steps == 1
    assert s.optimizer.defaults["lr"] == 1e-3 and s.optimizer.defaults["betas"] == (0.9, 0.999)
    assert s.variance == 0.0 and all(torch.equal(h, p) for h, p in zip(s.hidden, s.source_params))


def test_merge_on_a_hand_made_case_is_predict_update_ensemble():
    s = strategies.create("cmf", make_tiny(), alpha=0.9, gamma=0.8, q=0.5)
    g = torch.Generator().manual_seed(3)
    theta = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in s.params]
    hidden = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in s.params]
    source = [p.double() for p in s.source_params]
    with torch.no_grad():
        for p, h, t, v in zip(s.params, s.hidden, theta, hidden):
            p.copy_(t), h.copy_(v)
    s.variance = 0.02
    s._merge()
    q = 0.5 * N_TINY / 38400
    p_pred = 0.81 * 0.02 + q
    beta = (1 - q) / (p_pred + 1 - q)  # 0.966: inside [0.89, 0.9999)
    assert 0.89 < beta < 0.9999 and math.isclose(s.last_beta, beta, rel_tol=1e-12)
    assert math.isclose(s.variance, beta * p_pred, rel_tol=1e-12)
    for p, h, t, v, src in zip(s.params, s.hidden, theta, hidden, source):
        h_pred = 0.9 * v + 0.1 * src  # 2. the hidden model drifts to the source
        h_new = beta * h_pred + (1 - beta) * t  # 3. corrected by the student
        torch.testing.assert_close(h.double(), h_new, rtol=0, atol=1e-6)
        torch.testing.assert_close(p.detach().double(), 0.8 * t + 0.2 * h_new, rtol=0, atol=1e-6)  # 4.
    assert all(torch.equal(a, b.float()) for a, b in zip(s.source_params, source)), "the source never moves"


def test_one_step_is_roids_step_then_the_filter(images):
    # without the (random) consistency view, CMF's optimiser step is ROID's; the filter then acts on its result
    roid = strategies.create("roid", make_tiny(), lr=0.05, use_consistency=False, momentum_src=1.0)
    cmf = strategies.create("cmf", make_tiny(), lr=0.05, use_consistency=False, q=1.0)
    out_roid, out_cmf = roid.adapt(images), cmf.adapt(images)
    assert torch.equal(out_roid, out_cmf), "the same prediction, made before the update"
    q = N_TINY / 38400
    beta = (1 - q) / (q + 1 - q)  # P = 0 + q at the first step
    assert math.isclose(cmf.last_beta, beta) and beta < 0.9999
    for p, t, src in zip(cmf.params, roid.params, cmf.source_params):
        h_new = beta * src + (1 - beta) * t.detach()  # alpha theta_s + (1 - alpha) theta_s = theta_s
        torch.testing.assert_close(p.detach(), 0.99 * t.detach() + 0.01 * h_new, rtol=0, atol=1e-6)
    for h, t, src in zip(cmf.hidden, roid.params, cmf.source_params):
        torch.testing.assert_close(h, beta * src + (1 - beta) * t.detach(), rtol=0, atol=1e-6)


def test_updates_the_norm_affines_and_hidden_model_only(images):
    model = make_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = strategies.create("cmf", model, lr=0.05, q=1.0)
    source = [p.clone() for p in s.source_params]
    hidden0 = [h.clone() for h in s.hidden]
    for _ in range(3):
        s.adapt(images)
    changed = {k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert changed == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    for name in ("conv1.weight", "conv2.weight", "fc.weight", "fc.bias"):
        assert torch.equal(model.state_dict()[name], before[name]), f"{name} is frozen"
    assert all(not torch.equal(h, h0) for h, h0 in zip(s.hidden, hidden0)), "the hidden model follows the student"
    assert all(torch.equal(a, b) for a, b in zip(s.source_params, source)), "the source weights never move"
    assert not any(h.requires_grad for h in s.hidden)
    assert {id(p) for p in s.trainable_parameters()} == {id(p) for p in s.params}
    assert 0 < s.variance and s.last_beta < 1


def test_the_consistency_view_is_drawn_in_torchvisions_order_from_the_seed(images):
    s = strategies.create("cmf", make_tiny(), seed=7)
    assert s.augment.draw_order == "torchvision" and s.augment.seed == 7
    assert s.augment.cfg == AugmentConfig(padding="reflect", blur=False, noise_std=0.0)
    twin = TTAAugment(AugmentConfig(padding="reflect", blur=False, noise_std=0.0), seed=7, draw_order="torchvision")
    assert torch.equal(s.augment(images, 1), twin(images, 1))
    drawn = TTAAugment(twin.cfg, seed=7, draw_order="torchvision").sample(1, tuple(images.shape))
    torch.manual_seed(7)  # the reference's get_tta_transforms draws from the global generator: colour order first
    order = torch.randperm(5).tolist()
    first = torch.empty(1).uniform_(*((0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3))[order[0]])
    assert drawn.orders[0] == order and drawn.colour[0][order[0]] == float(first)


def test_reset_restores_the_initial_state_and_runs_are_deterministic(images):
    a, b = strategies.create("cmf", make_tiny(), lr=0.05, q=1.0), strategies.create("cmf", make_tiny(), lr=0.05, q=1.0)
    initial = {k: v.clone() for k, v in a.state_dict().items()}
    outs_a = [a.adapt(images) for _ in range(3)]
    outs_b = [b.adapt(images) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(outs_a, outs_b))
    assert all(torch.equal(u, v) for u, v in zip(a.hidden, b.hidden)) and a.variance == b.variance
    assert not torch.equal(outs_a[0], outs_a[2])
    a.reset()
    assert all(torch.equal(v, initial[k]) for k, v in a.state_dict().items())
    assert a.variance == 0.0 and a.last_beta == 1.0 and not a.optimizer.state
    assert torch.equal(a.class_probs, torch.full((4,), 0.25))
    assert all(torch.equal(u, a.adapt(images)) for u in outs_a), "the same run again, view draws included"
    c = strategies.create("cmf", make_tiny(), lr=0.05, q=1.0, seed=5)
    [c.adapt(images) for _ in range(2)]
    assert not torch.equal(c.adapt(images), outs_a[2]), "the augmentation follows the seed"
