"""MEMO and the batched AugMix views: the marginal entropy against a hand computation, every image starts from the
source model (episodic), the update is one SGD step on the views' marginal entropy, the BN prior, the AugMix
operations against their PIL definitions on hand-made images, shapes and determinism under a seed."""
from __future__ import annotations

import math

import pytest
import torch

from ctta import strategies
from ctta.strategies.common import augmix as A
from ctta.strategies.memo import marginal_entropy

from conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_marginal_entropy_is_the_entropy_of_the_mean_softmax():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)], [0.0, 0.0]])
    mean = logits.softmax(1).mean(0)
    want = -(mean * mean.log()).sum()
    torch.testing.assert_close(marginal_entropy(logits), want)


def test_memo_is_episodic_and_its_update_is_one_sgd_step_on_the_views():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8)
    model = make_tiny()
    s = strategies.create("memo", model, n_views=4, lr=0.05, momentum=0.0, seed=3)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    out = s.adapt(x)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())  # back to the source each time
    assert not model.training
    # image 1 alone, by hand: the same views (same generator state), one SGD step, then predict
    s2 = strategies.create("memo", make_tiny(), n_views=4, lr=0.05, momentum=0.0, seed=3)
    g = s2.generator(x.device)
    A.augmix_views(x[0:1], 4, g)  # image 0's draws
    views = A.augmix_views(x[1:2], 4, g)
    twin = s2.model
    marginal_entropy(twin(views)).backward()
    with torch.no_grad():
        for p in twin.parameters():
            p -= 0.05 * p.grad
        want = twin(x[1:2])
    torch.testing.assert_close(out[1:2], want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[1:2], strategies.create("bn_alpha", make_tiny()).adapt(x[1:2]))


def test_memo_is_deterministic_under_a_seed_and_changes_with_it():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a = strategies.create("memo", make_tiny(), n_views=4, lr=0.1, seed=5).adapt(x)
    b = strategies.create("memo", make_tiny(), n_views=4, lr=0.1, seed=5).adapt(x)
    c = strategies.create("memo", make_tiny(), n_views=4, lr=0.1, seed=6).adapt(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _levels(n: int, v: float) -> torch.Tensor:
    return torch.full((n,), v)


def test_augmix_point_operations_follow_their_pil_definitions():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([10.0, 100.0, 200.0, 250.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    # autocontrast: per channel min -> 0, max -> 255, int(v * scale + offset)
    want = torch.floor((x - 10) * 255 / 240)
    torch.testing.assert_close(A.autocontrast(x, _levels(1, 0.5), g), want)
    # posterize at any level of severity 1 keeps 4 bits: 4 - int(level * 4 / 10) = 4
    torch.testing.assert_close(A.posterize(x, _levels(1, 0.99), g), (x.long() & 0xF0).float())
    # solarize at level 0.5: threshold 256 - int(12.8) = 244; values >= 244 inverted
    torch.testing.assert_close(A.solarize(x, _levels(1, 0.5), g), torch.where(x < 244, x, 255 - x))


def test_augmix_geometric_operations():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 3, 32, 32, generator=g) * 255).round()
    # translation: int(level * (32 / 3) / 10) pixels; 0 below level 0.9375, 1 above
    torch.testing.assert_close(A.translate_x(x, _levels(4, 0.5), g), x)
    shifted = A.translate_x(x, _levels(4, 0.99), g)
    for i in range(4):
        left, right = torch.equal(shifted[i, :, :, :-1], x[i, :, :, 1:]), torch.equal(shifted[i, :, :, 1:], x[i, :, :, :-1])
        assert left or right
    # rotation by int(3 * level) degrees: 0 below level 1/3
    torch.testing.assert_close(A.rotate(x, _levels(4, 0.3), g), x)
    assert not torch.equal(A.rotate(x, _levels(4, 0.9), g), x)


def test_augmix_views_shape_range_and_determinism():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = A.augmix_views(x, 5, torch.Generator().manual_seed(1))
    b = A.augmix_views(x, 5, torch.Generator().manual_seed(1))
    assert a.shape == (10, 3, 32, 32) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    big = A.augmix_views(torch.rand(1, 3, 64, 64), 3, torch.Generator().manual_seed(1))  # RandomResizedCrop path
    assert big.shape == (3, 3, 64, 64) and float(big.min()) >= 0 and float(big.max()) <= 1
