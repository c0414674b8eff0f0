"""ROID (``roid``): its loss, weights and prior correction by hand, what it adapts, the weight ensembling, the
class-distribution average, the consistency view, reset and determinism."""
from __future__ import annotations

import math

import torch
import torchvision.transforms.functional as TF

from conftest import make_tiny
from ctta import strategies
from ctta.strategies.common import soft_likelihood_ratio
from ctta.strategies.common.augment import AugmentConfig, TTAAugment, ViewParams
from ctta.strategies.roid import diversity_certainty_weights, prior_corrected


def test_soft_likelihood_ratio_by_hand_and_its_clip():
    z = torch.tensor([[math.log(2.0), 0.0, 0.0]]).log_softmax(1)  # p = [1/2, 1/4, 1/4]
    expected = -(0.5 * math.log(1 + 1e-5) + 2 * 0.25 * math.log(1 / 3 + 1e-5))
    torch.testing.assert_close(soft_likelihood_ratio(z), torch.tensor([expected]))
    sure = torch.tensor([[20.0, 0.0]])  # p_0 ~ 1 - 2e-9, clipped to 0.99
    p1 = torch.tensor(1.0 / (1 + math.exp(20.0)))
    expected = -(0.99 * math.log(0.99 / 0.01 + 1e-5) + p1 * torch.log(p1 / (1 - p1) + 1e-5))
    torch.testing.assert_close(soft_likelihood_ratio(sure), expected.view(1))
    g = torch.tensor([[20.0, 0.0]], requires_grad=True)
    soft_likelihood_ratio(g).sum().backward()
    assert g.grad.abs().max() < 1e-6, "a clipped probability gives no gradient"


def test_weights_on_a_hand_made_batch():
    m = torch.full((3,), 1 / 3)
    # sample 0 repeats the uniform average (d = 0), 1 is confident, 2 in between
    logits = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    w, keep = diversity_certainty_weights(logits, m, 1 / 3)
    p = logits.softmax(1)
    d = 1 - torch.nn.functional.cosine_similarity(m[None], p, dim=1)
    d = (d - d.min()) / (d.max() - d.min())
    h = -(p * p.log()).sum(1)
    c = (-h - (-h).min()) / ((-h).max() - (-h).min())
    assert keep.tolist() == (d >= d.mean()).tolist() == [False, True, True]
    torch.testing.assert_close(w, torch.where(keep, torch.exp(3 * d * c), torch.zeros(3)))
    assert math.isclose(float(w[1]), math.exp(3.0), rel_tol=1e-6)  # the most diverse is also the most certain: d = c = 1
    w, keep = diversity_certainty_weights(torch.zeros(4, 3), m, 1 / 3)  # constant: zeros, not NaN
    assert keep.all() and torch.equal(w, torch.ones(4))


def test_prior_correction_by_hand():
    z = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    prior = z.softmax(1).mean(0)
    s = max(1 / 2, 1 / 2) / float(prior.max())
    torch.testing.assert_close(prior_corrected(z), z * (prior + s) / (1 + 2 * s))


def _bn_only(x):
    m = make_tiny().eval()
    for bn in (m.bn1, m.bn2):
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    with torch.no_grad():
        return m(x)


def test_roid_adapts_the_norm_affines_and_returns_the_corrected_prediction_before_the_update(images):
    model = make_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = strategies.create("roid", model, lr=0.05)
    z = _bn_only(images)
    out = s.adapt(images)
    torch.testing.assert_close(out, prior_corrected(z))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    # the class-distribution average moved once, towards the batch's mean prediction
    torch.testing.assert_close(s.class_probs, 0.9 * torch.full((4,), 0.25) + 0.1 * z.softmax(1).mean(0))
    assert 0 < s.last_kept < len(images)
    plain = strategies.create("roid", make_tiny(), use_prior_correction=False)
    torch.testing.assert_close(plain.adapt(images), z)


def test_weight_ensembling_pulls_towards_the_source(images):
    s = strategies.create("roid", make_tiny(), lr=0.05, momentum_src=0.0)  # all the way back after every step
    source = [p.clone() for p in s.params]
    for _ in range(3):
        s.adapt(images)
        assert all(torch.equal(p, p0) for p, p0 in zip(s.params, source))
    a = strategies.create("roid", make_tiny(), lr=0.05, momentum_src=1.0)  # no ensembling
    b = strategies.create("roid", make_tiny(), lr=0.05, momentum_src=0.5)
    for _ in range(3):
        a.adapt(images), b.adapt(images)
    dist = lambda t: sum(float((p.detach() - p0).norm()) for p, p0 in zip(t.params, source))  # noqa: E731
    assert 0 < dist(b) < dist(a)


def test_the_consistency_view_is_reflect_padded_affine_without_blur_or_noise_as_torchvision():
    aug = TTAAugment(AugmentConfig(padding="reflect", blur=False, noise_std=0.0, hflip_p=0.0))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    u = torch.tensor([[0.9, 0.2, 0.8, 0.3, 0.5, 0.5, 0.9]])  # angle 12, scale 0.94, translate (2, -2)
    ours = aug.apply(x, ViewParams([[1.0, 1.0, 1.0, 0.0, 1.0]], [[0, 1, 2, 3, 4]], u), 0, 1)
    ref = TF.affine(TF.pad(x, 16, padding_mode="reflect"), angle=12.0, translate=[2, -2], scale=0.94, shear=[0.0, 0.0],
                    interpolation=TF.InterpolationMode.BILINEAR, fill=0)
    torch.testing.assert_close(ours, TF.center_crop(ref, 32).clamp(0, 1), atol=1e-5, rtol=0)


def test_roid_without_weighting_and_consistency_is_plain_slr(images):
    s = strategies.create("roid", make_tiny(), lr=0.05, use_weighting=False, use_consistency=False,
                          use_prior_correction=False, momentum_src=1.0)
    ref = make_tiny().eval().requires_grad_(False)
    for bn in (ref.bn1, ref.bn2):
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    params = [ref.bn1.weight, ref.bn1.bias, ref.bn2.weight, ref.bn2.bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(2):
        soft_likelihood_ratio(ref(images)).mean().backward()
        opt.step()
        opt.zero_grad()
        s.adapt(images)
    for mine, theirs in zip(s.params, params):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_roid_reset_and_determinism(images):
    a, b = strategies.create("roid", make_tiny(), lr=0.05), strategies.create("roid", make_tiny(), lr=0.05)
    outs_a = [a.adapt(images) for _ in range(3)]
    outs_b = [b.adapt(images) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0], outs_a[2])
    a.reset()
    assert torch.equal(a.class_probs, torch.full((4,), 0.25)) and not a.optimizer.state
    assert torch.equal(a.adapt(images), outs_a[0]) and torch.equal(a.adapt(images), outs_a[1])
    c = strategies.create("roid", make_tiny(), lr=0.05, seed=5)
    [c.adapt(images) for _ in range(2)]
    assert not torch.equal(c.adapt(images), outs_a[2]), "the augmentation follows the seed"
