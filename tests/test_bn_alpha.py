"""BN-alpha (``bn_alpha``) and BN-EMA (``bn_ema``): hand-computed statistics, what changes and what never does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny
from ctta import strategies
from ctta.errors import ConfigError


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _forward_with(ref, x, stats):
    """The tiny net with BatchNorm layer i normalised by ``stats(i, h)`` -> (mean, var)."""
    h = ref.conv1(x)
    mu, var = stats(0, h)
    h = torch.relu(F.batch_norm(h, mu, var, ref.bn1.weight, ref.bn1.bias, False, 0.0, ref.bn1.eps))
    h = ref.conv2(h)
    mu, var = stats(1, h)
    h = torch.relu(F.batch_norm(h, mu, var, ref.bn2.weight, ref.bn2.bias, False, 0.0, ref.bn2.eps))
    return ref.fc(h.mean(dim=(2, 3)))


def _test_stats(h):
    return h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=True)


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.75])
def test_bn_alpha_mixes_source_and_unbiased_test_statistics(images, alpha):
    s = strategies.create("bn_alpha", make_tiny(), alpha=alpha)
    ref = make_tiny().requires_grad_(False)
    bns = (ref.bn1, ref.bn2)

    def mixed(i, h):
        mu_t, var_t = _test_stats(h)
        return ((1 - alpha) * bns[i].running_mean + alpha * mu_t, (1 - alpha) * bns[i].running_var + alpha * var_t)

    torch.testing.assert_close(s.adapt(images), _forward_with(ref, images, mixed), atol=1e-5, rtol=1e-5)


def test_bn_alpha_ends_are_source_and_test_statistics(images):
    source = make_tiny()
    with torch.no_grad():
        torch.testing.assert_close(strategies.create("bn_alpha", make_tiny(), alpha=0.0).adapt(images),
                                   source(images), atol=1e-6, rtol=1e-6)
        full = strategies.create("bn_alpha", make_tiny(), alpha=1.0).adapt(images)
    ref = make_tiny().requires_grad_(False)
    torch.testing.assert_close(full, _forward_with(ref, images, lambda i, h: _test_stats(h)), atol=1e-5, rtol=1e-5)
    biased = strategies.create("bn", make_tiny()).adapt(images)  # bn: the biased batch variance
    assert not torch.equal(full, biased) and torch.allclose(full, biased, atol=1e-2)


def test_bn_alpha_keeps_no_state_between_batches(images):
    model = make_tiny()
    before = _state(model)
    s = strategies.create("bn_alpha", model, alpha=0.3)
    first = s.adapt(images)
    s.adapt(images * 0.5 + 0.3)
    assert torch.equal(s.adapt(images), first)
    assert torch.equal(s.predict(images), first)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "no parameter or buffer may change"
    assert not any(p.requires_grad for p in model.parameters())
    assert s.adapt(images[:1]).shape == (1, 4)  # a batch of one: the spatial positions give the statistics


def test_bn_alpha_and_bn_ema_need_batchnorm():
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    for name in ("bn_alpha", "bn_ema"):
        with pytest.raises(ConfigError, match="BatchNorm"):
            strategies.create(name, lin)


def test_bn_alpha_reference_value():
    assert strategies.create("bn_alpha", make_tiny()).alpha == 0.1
    with pytest.raises(ConfigError):
        strategies.create("bn_alpha", make_tiny(), alpha=1.5)


# --- bn_ema ------------------------------------------------------------------------------------------------------
def test_bn_ema_statistics_pass_then_prediction_on_the_updated_estimates(images):
    m = 0.25
    s = strategies.create("bn_ema", make_tiny(), momentum=m)
    out = s.adapt(images)
    ref = make_tiny().requires_grad_(False)
    src = [(b.running_mean.clone(), b.running_var.clone()) for b in (ref.bn1, ref.bn2)]
    # pass 1: each layer's batch statistics, with earlier layers on batch statistics too
    seen = []

    def batch_stats(i, h):
        seen.append(_test_stats(h))
        mu, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
        return mu, var

    _forward_with(ref, images, batch_stats)
    expected = [((1 - m) * sm + m * bm, (1 - m) * sv + m * bv) for (sm, sv), (bm, bv) in zip(src, seen)]
    for bn, (mu, var) in zip((s.model.bn1, s.model.bn2), expected):
        torch.testing.assert_close(bn.running_mean, mu, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(bn.running_var, var, atol=1e-6, rtol=1e-6)
    # pass 2: the prediction uses the updated estimates
    torch.testing.assert_close(out, _forward_with(ref, images, lambda i, h: expected[i]), atol=1e-5, rtol=1e-5)


def test_bn_ema_accumulates_and_predict_changes_nothing(images):
    model = make_tiny()
    params = {k: v.clone() for k, v in model.named_parameters()}
    s = strategies.create("bn_ema", model, momentum=0.1)
    a = s.adapt(images)
    b = s.adapt(images)
    assert not torch.equal(a, b), "the running estimates move towards the test statistics batch after batch"
    state = _state(model)
    p1, p2 = s.predict(images), s.predict(images)
    assert torch.equal(p1, p2) and all(torch.equal(state[k], v) for k, v in _state(model).items())
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters()), "no parameter may change"
    assert int(model.bn1.num_batches_tracked) == 2
    s.reset()
    torch.testing.assert_close(model.bn1.running_mean, make_tiny().bn1.running_mean)


def test_bn_ema_momentum_one_is_the_last_batch_and_zero_the_source(images):
    with torch.no_grad():
        zero = strategies.create("bn_ema", make_tiny(), momentum=0.0).adapt(images)
        torch.testing.assert_close(zero, make_tiny()(images))
        s = strategies.create("bn_ema", make_tiny(), momentum=1.0)
        s.adapt(images * 0.3)
        last = s.adapt(images)
    ref = make_tiny().requires_grad_(False)
    seen = []

    def batch_stats(i, h):
        seen.append(_test_stats(h))
        return h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)

    _forward_with(ref, images, batch_stats)
    torch.testing.assert_close(last, _forward_with(ref, images, lambda i, h: seen[i]), atol=1e-5, rtol=1e-5)


def test_bn_ema_is_deterministic(images):
    runs = [[strategies.create("bn_ema", make_tiny()).adapt(images * k) for k in (1.0, 0.5)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
