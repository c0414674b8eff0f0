"""SAR (``sar``): what it adapts, its two entropy filters, the SAM step against a hand-written one, model recovery."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import WithLayer4, adapt_once, make_tiny
from ctta import strategies
from ctta.strategies.sar import is_top_layer


def _ent(z):
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def _affines(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if ".bn" in f".{n}" or n.startswith("bn")}


def test_sar_adapts_only_the_norm_affines_and_returns_the_prediction_before_the_update(images):
    s, out, expected, changed = adapt_once("sar", images, lr=0.05, e_margin=10.0)  # every sample reliable
    assert torch.equal(out, expected)
    assert changed == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    assert isinstance(s.optimizer, torch.optim.SGD)





def test_sar_leaves_the_top_layers_frozen(images):
    s = strategies.create("sar", WithLayer4().eval(), lr=0.05, e_margin=10.0)
    top = {k: v.clone() for k, v in s.model.layer4.state_dict().items()}
    s.adapt(images)
    assert all(torch.equal(v, top[k]) for k, v in s.model.layer4.state_dict().items())
    assert len(s.params) == 2
    assert len(strategies.create("sar", WithLayer4().eval(), freeze_top=False).params) == 4
    assert is_top_layer("net.layer4.0.bn1") and is_top_layer("blocks.10.norm1") and is_top_layer("net.norm")
    assert not is_top_layer("net.layer3.2.bn2") and not is_top_layer("blocks.8.norm1") and not is_top_layer("bn1")
    assert not is_top_layer("stages.0.blocks.1.norm")


def test_sar_step_equals_a_hand_written_sam_step_with_both_filters(images):
    lr, mom, rho, e_margin = 0.1, 0.9, 0.05, 0.978  # the tiny net is unsure: entropies 0.94-0.99 ln C
    s = strategies.create("sar", make_tiny(), lr=lr, momentum=mom, rho=rho, e_margin=e_margin, reset_constant=0.0)
    ref = make_tiny()
    ref.train().requires_grad_(False)
    for bn in (ref.bn1, ref.bn2):
        bn.track_running_stats = False
    params = [ref.bn1.weight, ref.bn1.bias, ref.bn2.weight, ref.bn2.bias]
    for p in params:
        p.requires_grad_(True)
    e0 = e_margin * math.log(4)
    buf = None
    for step in range(3):
        x = images * (1 - 0.2 * step)
        ent = _ent(ref(x))
        s1 = ent.detach() < e0
        g = torch.autograd.grad(ent[s1].mean(), params)
        norm = torch.stack([t.norm() for t in g]).norm()
        with torch.no_grad():
            old = [p.clone() for p in params]
            for p, gi in zip(params, g):
                p.add_(gi * rho / (norm + 1e-12))
        ent2 = _ent(ref(x))[s1]
        s2 = ent2.detach() < e0
        gp = torch.autograd.grad(ent2[s2].mean(), params)
        with torch.no_grad():
            for p, w in zip(params, old):
                p.copy_(w)
            buf = [gi.clone() for gi in gp] if buf is None else [mom * b + gi for b, gi in zip(buf, gp)]
            for p, b in zip(params, buf):
                p.sub_(lr * b)
        s.adapt(x)
        assert 0 < int(s1.sum()) < len(x), "the hand-made batch must exercise the first filter"
        assert s.last_kept == (int(s1.sum()), int(s2.sum()))
        for mine, theirs in zip(s.params, params):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_sar_with_no_reliable_sample_does_not_move_on_the_first_step(images):
    s = strategies.create("sar", make_tiny(), lr=0.1, e_margin=1e-6)
    before = [p.clone() for p in s.params]
    s.adapt(images)
    assert s.last_kept == (0, 0)
    assert all(torch.equal(p, b) for p, b in zip(s.params, before))
    assert not bool(s.recovery.ema_set), "an empty selection leaves the recovery EMA unset"


def test_sar_recovery_resets_the_weights_and_keeps_the_momentum_as_the_code(images):
    for reset_momentum in (False, True):
        s = strategies.create("sar", make_tiny(), lr=0.1, e_margin=10.0, reset_momentum=reset_momentum)
        initial = [p.clone() for p in s.params]
        s.adapt(images)
        assert bool(s.recovery.ema_set) and float(s.recovery.ema) > 0.2 and int(s.recovery.recoveries) == 0
        assert any(not torch.equal(p, p0) for p, p0 in zip(s.params, initial))
        s.recovery.ema.fill_(0.0)  # 0.9 * 0 + 0.1 * loss < 0.2: the next step recovers
        s.adapt(images)
        assert int(s.recovery.recoveries) == 1 and not bool(s.recovery.ema_set)
        assert all(torch.equal(p, p0) for p, p0 in zip(s.params, initial))
        bufs = [s.optimizer.state[p]["momentum_buffer"] for p in s.params]
        assert all(bool((b == 0).all()) for b in bufs) == reset_momentum


def test_sar_is_deterministic_and_resets(images):
    runs = []
    for _ in range(2):
        s = strategies.create("sar", make_tiny(), lr=0.05, e_margin=0.5, seed=3)
        runs.append([s.adapt(images * k) for k in (1.0, 0.7, 1.0)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    first = runs[0][0]
    s.reset()
    assert torch.equal(s.adapt(images), first)


def test_sar_defaults_are_the_reference_cifar10_values():
    s = strategies.create("sar", make_tiny(num_classes=10))
    g = s.optimizer.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"], g["dampening"]) == (1e-3, 0.9, False, 0, 0)
    assert s.rho == 0.05 and s.recovery.reset_constant == 0.2 and s.steps == 1
    assert s.threshold == pytest.approx(0.4 * math.log(10))
