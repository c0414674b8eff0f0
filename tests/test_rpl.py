"""RPL (``rpl``): the generalised cross-entropy by hand, what it adapts, its step against a hand-derived gradient,
the optimiser choice, reset and determinism."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import adapt_once, make_tiny
from ctta import strategies
from ctta.errors import ConfigError
from ctta.strategies.common import generalized_cross_entropy


def test_gce_hand_computed_and_its_limits():
    z = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])  # softmax: [1/4, 3/4] and [4/5, 1/5]
    y = torch.tensor([1, 1])
    torch.testing.assert_close(generalized_cross_entropy(z, y, 0.5),
                               torch.tensor([(1 - 0.75 ** 0.5) / 0.5, (1 - 0.2 ** 0.5) / 0.5]))
    torch.testing.assert_close(generalized_cross_entropy(z, y, 1.0), torch.tensor([0.25, 0.8]))  # q = 1: MAE
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(generalized_cross_entropy(z.double(), y, 1e-7), ce.double(), atol=1e-6, rtol=1e-6)
    assert generalized_cross_entropy(z, torch.tensor([0, 0]), 0.8)[1] < generalized_cross_entropy(z, y, 0.8)[1]


def test_rpl_adapts_only_the_norm_affines_and_returns_the_prediction_before_the_update(images):
    s, out, expected, changed = adapt_once("rpl", images, lr=0.05)
    assert torch.equal(out, expected)
    assert changed == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    assert isinstance(s.optimizer, torch.optim.Adam) and s.optimizer.defaults["lr"] == 0.05
    assert not s.model.training, "eval mode (no dropout), BatchNorm on batch statistics"


def test_rpl_step_equals_a_hand_derived_gce_gradient_step(images):
    """d GCE / dz = -p_y^q (onehot(y) - p): the step's gradients are those of that logit gradient, with y = argmax z
    treated as a constant, and the update is Adam's."""
    q, lr = 0.8, 0.05
    s = strategies.create("rpl", make_tiny(), q=q, lr=lr)
    ref = make_tiny()
    ref.eval().requires_grad_(False)
    for bn in (ref.bn1, ref.bn2):
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    params = [ref.bn1.weight, ref.bn1.bias, ref.bn2.weight, ref.bn2.bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    for step in range(3):
        x = images * (1 - 0.2 * step)
        z = ref(x)
        p = z.detach().softmax(1)
        y = p.argmax(1)
        onehot = torch.nn.functional.one_hot(y, p.shape[1]).float()
        dz = -(p.gather(1, y[:, None]) ** q) * (onehot - p) / len(x)
        z.backward(dz)
        opt.step()
        opt.zero_grad()
        out = s.adapt(x)
        torch.testing.assert_close(out, z.detach(), atol=1e-5, rtol=1e-5)
        for mine, theirs in zip(s.params, params):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_rpl_lowers_its_loss_and_confirms_its_pseudo_labels(images):
    s = strategies.create("rpl", make_tiny(), lr=0.05)
    first = s.adapt(images)
    for _ in range(10):
        s.adapt(images)
    last = s.predict(images)
    loss = lambda z: generalized_cross_entropy(z, z.argmax(1), 0.8).mean()  # noqa: E731
    assert loss(last) < loss(first)


def test_rpl_sgd_option_q_range_reset_and_determinism(images):
    s = strategies.create("rpl", make_tiny(), optimizer="sgd", lr=5e-4)
    assert isinstance(s.optimizer, torch.optim.SGD)
    assert s.optimizer.defaults["nesterov"] and s.optimizer.defaults["momentum"] == 0.9
    with pytest.raises(ConfigError):
        strategies.create("rpl", make_tiny(), q=1.5)
    with pytest.raises(ConfigError):
        strategies.create("rpl", make_tiny(), q=0.0)
    a, b = strategies.create("rpl", make_tiny(), lr=0.05), strategies.create("rpl", make_tiny(), lr=0.05)
    initial = [p.clone() for p in a.params]
    outs_a = [a.adapt(images) for _ in range(3)]
    outs_b = [b.adapt(images) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0], outs_a[2])
    a.reset()
    assert all(torch.equal(p, p0) for p, p0 in zip(a.params, initial))
    assert not a.optimizer.state, "reset clears Adam's moments"
    assert torch.equal(a.adapt(images), outs_a[0])
