"""DeYO (``deyo``): the object-destroying views by hand, PLPD and the entropy filter on a hand-made batch, the
reweighting by hand, what it adapts, determinism under a seed, reset."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T
from torch import nn

from conftest import WithLayer4, adapt_once, make_tiny
from ctta import strategies
from ctta.errors import ConfigError
from ctta.strategies.deyo import _resize, deyo_weights, occlude, patch_shuffle, pixel_shuffle, plpd


def _ent(z):
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def test_patch_shuffle_moves_whole_tiles_as_the_permutation_says():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    u = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])  # argsort: [1, 3, 2, 0] and the identity
    out = patch_shuffle(x, 2, u)

    def tile(img, k):  # tile k of a 2 x 2 grid, row-major
        r, c = divmod(k, 2)
        return img[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4]

    for k, src in enumerate([1, 3, 2, 0]):
        assert torch.equal(tile(out[0], k), tile(x[0], src))
    assert torch.equal(out[1], x[1])
    # 32 px, patch_len 4: 16 tiles of 8 x 8; no resize, so every value is moved, none changed
    y = torch.rand(3, 3, 32, 32)
    shuffled = patch_shuffle(y, 4, torch.rand(3, 16))
    assert shuffled.shape == y.shape
    assert torch.equal(shuffled.flatten(1).sort(1).values, y.flatten(1).sort(1).values)


def test_a_side_not_divisible_by_the_grid_is_resized_as_torchvision_does():
    x = torch.rand(2, 3, 10, 10)
    torch.testing.assert_close(_resize(x, (8, 8)), T.Resize((8, 8))(x), atol=1e-6, rtol=0)
    assert _resize(x, (10, 10)) is x, "same size: untouched (torchvision returns the image itself too)"
    assert patch_shuffle(x, 4, torch.rand(2, 16)).shape == x.shape
    with pytest.raises(ConfigError):
        patch_shuffle(torch.rand(1, 3, 3, 3), 4, torch.rand(1, 16))


def test_pixel_shuffle_and_occlusion_by_hand():
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 1, 2, 2)
    out = pixel_shuffle(x, torch.tensor([3, 0, 2, 1]))
    assert out[0, 0].tolist() == [[3.0, 0.0], [2.0, 1.0]] and out[1, 0].tolist() == [[7.0, 4.0], [6.0, 5.0]]
    y = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    occ = occlude(y, 2, 1, 1)
    assert torch.equal(occ[0, 0, 1:3, 1:3], torch.full((2, 2), 7.5))  # the image's mean
    occ[0, 0, 1:3, 1:3] = y[0, 0, 1:3, 1:3]
    assert torch.equal(occ, y), "only the window changes; the input is not modified"
    assert torch.equal(occlude(y, 112, 56, 56), y), "a window outside the image leaves it (ImageNet's 112 at 32 px)"


def test_plpd_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    q = torch.tensor([[0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])
    torch.testing.assert_close(plpd(p, q), torch.tensor([0.4, -0.2]))  # the pseudo-label is argmax p, not argmax q


def test_reweighting_by_hand():
    e, d, e0 = torch.tensor([0.5, 1.0]), torch.tensor([0.3, 0.6]), 0.9
    both = torch.tensor([math.exp(0.4) + math.exp(0.3), math.exp(-0.1) + math.exp(0.6)])
    torch.testing.assert_close(deyo_weights(e, d, e0, True, True), both)
    torch.testing.assert_close(deyo_weights(e, d, e0, True, False), torch.tensor([math.exp(0.4), math.exp(-0.1)]))
    torch.testing.assert_close(deyo_weights(e, d, e0, False, True), torch.tensor([math.exp(0.3), math.exp(0.6)]))
    assert deyo_weights(e, d, e0, False, False) is None


class _Lookup(nn.Module):
    """Logits from a table by the id in pixel (0, 0) of channel 0; the destroyed view (pixel (0, 1) set) reads a
    second table. ``gn`` only holds the norm affine DeYO adapts: logits = table * weight + bias."""

    def __init__(self, table: torch.Tensor, destroyed: torch.Tensor) -> None:
        super().__init__()
        self.num_classes = table.shape[1]
        self.register_buffer("table", table)
        self.register_buffer("destroyed", destroyed)
        self.gn = nn.GroupNorm(1, 1)

    def forward(self, x):
        ids = x[:, 0, 0, 0].long()
        rows = torch.where((x[:, 0, 0, 1] > 0.5)[:, None], self.destroyed[ids], self.table[ids])
        return rows * self.gn.weight + self.gn.bias


def _hand_batch():
    table = torch.tensor([[4.0, 0, 0, 0],   # 0: confident, its destroyed view uniform: kept
                          [4.0, 0, 0, 0],   # 1: confident, still confident destroyed (PLPD 0.03): dropped by PLPD
                          [0.5, 0, 0, 0],   # 2: uncertain: dropped by the entropy filter
                          [0, 0, 3.0, 0],   # 3: confident, PLPD 0.27: kept
                          [0, 4.0, 0, 0]])  # 4: more confident destroyed (PLPD < 0): dropped by PLPD
    destroyed = torch.tensor([[0.0, 0, 0, 0], [3.5, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 1.5, 0], [0, 6.0, 0, 0]])
    x = torch.zeros(5, 1, 4, 4)
    x[:, 0, 0, 0] = torch.arange(5, dtype=torch.float32)
    return table, destroyed, x


def test_entropy_and_plpd_filters_and_the_weighted_loss_on_a_hand_made_batch():
    table, destroyed, x = _hand_batch()
    s = strategies.create("deyo", _Lookup(table, destroyed), lr=0.1)
    seen = []

    def destroy(kept):
        seen.append(kept[:, 0, 0, 0].long().tolist())
        out = kept.clone()
        out[:, 0, 0, 1] = 1.0
        return out

    s.destroy = destroy
    grads = []
    s.model.gn.weight.register_hook(lambda g: grads.append(g.clone()))
    out = s.adapt(x)
    assert torch.equal(out, table)
    margin, e0 = 0.5 * math.log(4), 0.4 * math.log(4)
    ent = _ent(table)
    assert (ent < margin).tolist() == [True, True, False, True, True]
    assert seen == [[0, 1, 3, 4]], "only the entropy-kept samples are destroyed and forwarded"
    d = plpd(table.softmax(1), destroyed.softmax(1))
    assert (d > 0.2).tolist() == [True, False, True, True, False]  # sample 2 passes PLPD but not the entropy filter
    assert s.last_kept == (4, 2)
    # loss(w) = mean over {0, 3} of alpha E(w z), alpha = exp(E0 - E) + exp(PLPD) at w = 1, held constant
    kept = torch.tensor([0, 3])
    alpha = 1 / torch.exp(ent[kept] - e0) + 1 / torch.exp(-d[kept])
    w = torch.ones(1, requires_grad=True)
    (alpha * _ent(table[kept] * w)).mean().backward()
    torch.testing.assert_close(grads[0], w.grad)
    assert s.optimizer.state, "a step was made"


def test_no_step_when_a_filter_keeps_nothing():
    table, destroyed, x = _hand_batch()
    s = strategies.create("deyo", _Lookup(table, destroyed), lr=0.1, margin=0.01)  # entropy filter: nothing
    before = [p.clone() for p in s.params]
    s.adapt(x)
    assert s.last_kept == (0, 0) and not s.optimizer.state
    assert all(torch.equal(p, q) for p, q in zip(s.params, before))
    s = strategies.create("deyo", _Lookup(table, destroyed), lr=0.1, plpd_threshold=0.99)  # PLPD: nothing
    s.adapt(x)
    assert s.last_kept[1] == 0 and not s.optimizer.state


def test_deyo_adapts_only_the_norm_affines_below_the_top_layers(images):
    s, out, expected, changed = adapt_once("deyo", images, lr=0.05, margin=10.0,
                                           plpd_threshold=-1.0)  # every sample kept
    assert torch.equal(out, expected), "the prediction is the one before the update"
    assert s.last_kept == (16, 16)
    assert changed == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    assert isinstance(s.optimizer, torch.optim.Adam) and not s.model.training

    s = strategies.create("deyo", WithLayer4().eval(), lr=0.05, margin=10.0, plpd_threshold=-1.0)
    top = {k: v.clone() for k, v in s.model.layer4.state_dict().items()}
    s.adapt(images)
    assert all(torch.equal(v, top[k]) for k, v in s.model.layer4.state_dict().items()) and len(s.params) == 2
    assert len(strategies.create("deyo", WithLayer4().eval(), freeze_top=False).params) == 4
    sgd = strategies.create("deyo", make_tiny(), optimizer="sgd", lr=2.5e-4)
    assert isinstance(sgd.optimizer, torch.optim.SGD) and sgd.optimizer.defaults["nesterov"]


def test_the_tile_draws_are_torch_rand_under_the_seed_and_runs_are_deterministic(images):
    s = strategies.create("deyo", make_tiny(), seed=3)
    torch.manual_seed(3)  # the reference's draw: torch.rand on the global generator seeded with the run's seed
    expected = patch_shuffle(images, 4, torch.rand(16, 16))
    assert torch.equal(s.destroy(images), expected)
    kw = dict(lr=0.05, margin=10.0, plpd_threshold=-1.0, seed=5)
    a, b = strategies.create("deyo", make_tiny(), **kw), strategies.create("deyo", make_tiny(), **kw)
    outs_a = [a.adapt(images) for _ in range(3)]
    outs_b = [b.adapt(images) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0], outs_a[2])
    other = strategies.create("deyo", make_tiny(), lr=0.05, margin=10.0, seed=6)
    assert not torch.equal(other.destroy(images), strategies.create("deyo", make_tiny(), **kw).destroy(images))


def test_reset_returns_weights_optimiser_and_draws(images):
    s = strategies.create("deyo", make_tiny(), lr=0.05, margin=10.0, plpd_threshold=-1.0)
    initial = [p.clone() for p in s.params]
    first = [s.adapt(images) for _ in range(2)]
    assert s.optimizer.state
    s.reset()
    assert all(torch.equal(p, p0) for p, p0 in zip(s.params, initial))
    assert not s.optimizer.state, "reset clears Adam's moments"
    again = [s.adapt(images) for _ in range(2)]
    assert all(torch.equal(u, v) for u, v in zip(first, again)), "the same tile draws after the reset"
