"""RanPAC: random ReLU projection of frozen features, Gram / cross statistics accumulated over sessions, ridge head
with lambda chosen on the session's held-out 20 %, optional first-session adapters."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import stripe_data, tiny_vit
from ctta import strategies
from strategies.common.lda import ridge_solution, select_ridge


_vit = tiny_vit


def _data(classes, seed=0, n_per=8):
    return stripe_data(classes, n_per, seed, size=16)


def _ranpac(**hp):
    hp = {"M": 24, "first_session": "none", "dtype": "float64", **hp}
    return strategies.create("ranpac", _vit(), **hp)


def _session(s, x, y, batch=8):
    for i in range(0, len(y), batch):
        s.learn(x[i:i + batch], y[i:i + batch])
    s.close_session()


def test_head_is_the_closed_form_ridge_solution():
    s = _ranpac(ridges=[0.5])
    x, y = _data([0, 1])
    _session(s, x, y)
    h = F.relu(s.features(x) @ s.W_rand).double()
    yy = F.one_hot(y, 4).double()
    w = (torch.linalg.inv(h.T @ h + 0.5 * torch.eye(24, dtype=torch.float64)) @ h.T @ yy).T
    assert s.chosen == [0.5]
    torch.testing.assert_close(s.weight.double(), w, rtol=1e-5, atol=1e-6)
    # cosine head (PILOT): cos(H, W_c); linear (official RanPAC): H W^T; unseen classes masked
    f = s.features(x[:3])
    hh = F.relu(f @ s.W_rand)
    cos = F.normalize(hh, dim=1) @ F.normalize(s.weight, dim=1).T
    torch.testing.assert_close(s.predict(x[:3])[:, :2], cos[:, :2])
    assert torch.isinf(s.predict(x[:3])[:, 2:]).all()
    lin = _ranpac(ridges=[0.5], head="linear")
    _session(lin, x, y)
    torch.testing.assert_close(lin.predict(x[:3])[:, :2], (hh @ s.weight.T)[:, :2], rtol=1e-5, atol=1e-6)


def test_gram_and_cross_accumulate_over_sessions_in_any_order():
    (x1, y1), (x2, y2) = _data([0, 1], 0), _data([2, 3], 1)
    a, b = _ranpac(ridges=[1.0]), _ranpac(ridges=[1.0])
    _session(a, x1, y1)
    g1 = a.stats.second_moment.clone()
    _session(a, x2, y2)
    _session(b, x2, y2)
    _session(b, x1, y1)
    assert torch.equal(a.W_rand, b.W_rand)  # drawn from the seed, not from the data
    h1, h2 = (F.relu(a.features(x) @ a.W_rand).double() for x in (x1, x2))
    torch.testing.assert_close(g1, h1.T @ h1)
    torch.testing.assert_close(a.stats.second_moment, h1.T @ h1 + h2.T @ h2)
    q = h1.T @ F.one_hot(y1, 4).double() + h2.T @ F.one_hot(y2, 4).double()
    torch.testing.assert_close(a.stats.class_sums.T, q)
    torch.testing.assert_close(b.stats.second_moment, a.stats.second_moment)
    torch.testing.assert_close(b.stats.class_sums, a.stats.class_sums)
    torch.testing.assert_close(b.weight, a.weight)  # the head depends on the union only (lambda fixed)
    assert a.stats.second_moment.shape == (24, 24)  # G is M x M


def test_lambda_selection_picks_the_validation_minimiser():
    g = torch.Generator().manual_seed(0)
    ridges = [1e-8, 1e-2, 1.0, 1e2, 1e8]
    h = torch.randn(50, 4, generator=g, dtype=torch.float64)
    # noise-free linear targets: the least-regularised fit is best on the held-out rows
    exact = h @ torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert select_ridge(h, exact, ridges)[0] == 1e-8
    # targets unrelated to the features: shrinking the weights to 0 is best
    noise = torch.randn(50, 3, generator=g, dtype=torch.float64)
    lam, losses = select_ridge(h, noise, ridges)
    # the errors are those of the closed form fitted on the first int(0.8 N) = 40 rows, tested on the last 10
    for r, loss in zip(ridges, losses):
        w = torch.linalg.inv(h[:40].T @ h[:40] + r * torch.eye(4, dtype=torch.float64)) @ h[:40].T @ noise[:40]
        torch.testing.assert_close(loss, ((h[40:] @ w - noise[40:]) ** 2).mean())
    assert lam == ridges[int(losses.argmin())]
    # ties: the first candidate (np.argmin): a zero block of features predicts 0 whatever lambda
    assert select_ridge(torch.zeros(10, 2, dtype=torch.float64), noise[:10], ridges)[0] == 1e-8
    torch.testing.assert_close(ridge_solution(h.T @ h, h.T @ exact, 0.0), torch.linalg.solve(h.T @ h, h.T @ exact))


def test_strategy_uses_the_session_split_and_chosen_lambda():
    s = _ranpac()
    x, y = _data([0, 1])
    _session(s, x, y)
    h = F.relu(s.features(x) @ s.W_rand).double()
    lam, _ = select_ridge(h, F.one_hot(y, 4).double(), [10.0 ** k for k in range(-8, 9)])
    assert s.chosen == [lam]
    torch.testing.assert_close(s.weight.double(), s.stats.ridge_weights(lam).double())


def test_backbone_never_changes_after_the_first_session():
    s = strategies.create("ranpac", _vit(), M=24, first_session="adapter", lr=0.5)
    base0 = {n: p.detach().clone() for n, p in s.model.named_parameters() if ".down." not in n and ".up." not in n}
    x, y = _data([0, 1])
    torch.testing.assert_close(s.features(x), _vit().forward_features(x))  # adapters start as the identity
    _session(s, x, y)
    named = dict(s.model.named_parameters())
    adapters = [n for n in named if ".down." in n or ".up." in n]
    assert adapters and not any(p.requires_grad for p in s.model.parameters())
    assert any(not torch.equal(named[n], torch.zeros_like(named[n])) for n in adapters if ".up." in n)  # trained
    for n, p in named.items():  # the pretrained weights did not move in the first session either
        if n in base0:
            assert torch.equal(p, base0[n]), n
    after0 = {n: p.detach().clone() for n, p in named.items()}
    x2, y2 = _data([2, 3], 1)
    _session(s, x2, y2)
    s.predict(x2)
    for n, p in s.model.named_parameters():
        assert torch.equal(p, after0[n]), n
    assert s.trainable_parameters() == []
    s.reset()
    assert s.adapting and s.weight.numel() == 0 and s.W_rand.numel() == 0
    assert any(p.requires_grad for p in s.model.parameters())


def test_later_epochs_of_a_session_are_not_counted_twice():
    x, y = _data([0, 1])
    one, two = _ranpac(), _ranpac()
    _session(one, x, y)
    two.segment_start(SimpleNamespace(kind="train", num_samples=2 * len(y), meta={"epochs": 2}))
    _session(two, torch.cat([x, x.flip(0)]), torch.cat([y, y.flip(0)]))
    torch.testing.assert_close(two.stats.second_moment, one.stats.second_moment)
    assert two.chosen == one.chosen


def test_deterministic_under_a_seed():
    x, y = _data([0, 1])
    runs = []
    for seed in (3, 3, 4):
        s = _ranpac(seed=seed, dtype="float32")
        _session(s, x, y)
        runs.append((s.W_rand.clone(), s.predict(x)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    g = torch.Generator().manual_seed(__import__("ctta.strategies.ranpac", fromlist=["x"]).projection_seed(3))
    assert torch.equal(runs[0][0], torch.randn(runs[0][0].shape, generator=g))  # N(0, 1), D x M


@pytest.mark.parametrize("M", [0, 24])
def test_checkpoint_round_trip(M):
    x, y = _data([0, 1])
    s = _ranpac(M=M)
    _session(s, x, y)
    state = s.checkpoint_state()
    t = _ranpac(M=M)
    t.load_checkpoint_state(state)
    assert torch.equal(t.predict(x), s.predict(x))
    assert t.weight.shape == (4, 24 if M else 16)


def test_first_session_adapter_reads_the_stream_beside_the_mlp():
    from strategies.ranpac import add_ffn_adapters

    model, plain = _vit(), _vit()
    add_ffn_adapters(model, bottleneck=3, scale=0.1, dropout=0.1)
    block, ref = model.net.blocks[0], plain.net.blocks[0]
    ad = block.mlp
    torch.nn.init.normal_(ad.up.weight)
    model.eval()
    z = torch.randn(2, 5, 16)
    after_attn = z + ref.attn(ref.norm1(z))
    expected = after_attn + ref.mlp(ref.norm2(after_attn)) + 0.1 * ad.up(torch.relu(ad.down(after_attn)))
    torch.testing.assert_close(block(z), expected)  # AdaptFormer parallel: the adapter sees x, not norm2(x)


def test_dense_statistics_equal_the_per_class_sums():
    from strategies.common.lda import IncrementalLDA

    g = torch.Generator().manual_seed(1)
    h, y = torch.rand(30, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (30,), generator=g)
    a, b = IncrementalLDA(None, 4), IncrementalLDA(None, 4)
    a.update(h, y)
    b.update_dense(h, F.one_hot(y, 4))
    for name in ("second_moment", "class_sums", "class_counts"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name))
    torch.testing.assert_close(b.ridge_weights(0.1), a.ridge_weights(0.1))
