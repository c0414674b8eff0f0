"""DER / DER++: logits stored at insertion, the loss on a hand-made case, the reservoir with logits, determinism."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import ctta
from conftest import make_tiny, quadrant_data, two_session_stream
from ctta import strategies
from ctta.strategies.common.replay import ReservoirBuffer


class Lin(nn.Module):
    """A 2-input, 3-class linear model with hand-set weights (no BatchNorm: the loss can be computed by hand)."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _lin_logits(x):
    w, b = [[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]], [0.1, -0.2, 0.3]
    return [[w[c][0] * r[0] + w[c][1] * r[1] + b[c] for c in range(3)] for r in x]


def _ce(z, y, classes):
    """Mean cross-entropy over the columns in ``classes``, by hand."""
    return sum(-(zi[yi] - math.log(sum(math.exp(zi[c]) for c in classes))) for zi, yi in zip(z, y)) / len(y)


def _with_buffer(name, **hp):
    """``name`` on the linear model, classes 0 and 1 seen, a buffer holding two known samples with known logits."""
    s = strategies.create(name, Lin(), buffer_size=2, replay_batch_size=2, **hp)
    bx, by = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.tensor([1, 0])
    bz = torch.tensor([[0.0, 1.0, 2.0], [1.0, -1.0, 0.5]])
    s.buffer.load_state({"seen": 2, "x": bx, "y": by, "t": torch.zeros(2, dtype=torch.long), "z": bz})
    s.seen.update(torch.tensor([0, 1]))  # class 2 unseen: masked in predictions only, in no loss (as Mammoth)
    return s, bx.tolist(), by.tolist(), bz.tolist()


X, Y = torch.tensor([[0.5, -0.5], [2.0, 1.0]]), torch.tensor([0, 1])


def test_der_loss_is_ce_plus_alpha_mse_on_a_hand_made_case():
    s, bx, _, bz = _with_buffer("der", alpha=0.3)
    loss, z = s.objective(X, Y, torch.Generator().manual_seed(0))
    ce = _ce(_lin_logits(X.tolist()), Y.tolist(), [0, 1, 2])  # over every output, the unseen class 2 included
    out = _lin_logits(bx)
    mse = sum((o - t) ** 2 for ro, rt in zip(out, bz) for o, t in zip(ro, rt)) / 6  # every output
    assert loss.item() == pytest.approx(ce + 0.3 * mse, rel=1e-6)
    assert torch.allclose(z, torch.tensor(_lin_logits(X.tolist())))  # raw logits, class 2 not masked
    assert torch.isinf(s.predict(X)[:, 2]).all()  # predictions mask it


def test_derpp_adds_beta_ce_on_the_buffer_labels():
    s, bx, by, bz = _with_buffer("derpp", alpha=0.2, beta=0.5)
    loss, _ = s.objective(X, Y, torch.Generator().manual_seed(0))
    out = _lin_logits(bx)
    mse = sum((o - t) ** 2 for ro, rt in zip(out, bz) for o, t in zip(ro, rt)) / 6
    expected = _ce(_lin_logits(X.tolist()), Y.tolist(), [0, 1, 2]) + 0.2 * mse + 0.5 * _ce(out, by, [0, 1, 2])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["der", "derpp"])
def test_one_step_is_sgd_on_that_loss(name):
    s, *_ = _with_buffer(name)
    ref = copy.deepcopy(s)
    loss, _ = ref.objective(X, Y, torch.Generator().manual_seed(0))
    loss.backward()
    expected = {k: p.detach() - 0.03 * p.grad for k, p in ref.model.named_parameters()}
    s.learn(X, Y)
    for k, p in s.model.named_parameters():
        assert torch.allclose(p, expected[k], atol=1e-7), k


def test_logits_are_stored_at_insertion_and_never_refreshed():
    s = strategies.create("der", make_tiny(num_classes=4), buffer_size=100, replay_batch_size=8)
    x0, y0 = quadrant_data([0, 1], 6, 0)
    before = copy.deepcopy(s.model).train()
    with torch.no_grad():
        expected = before(x0)  # the train-mode forward of the step that inserts them
    s.learn(x0, y0)
    assert torch.allclose(s.buffer.logits(), expected, atol=1e-6)
    stored = s.buffer.logits().clone()
    x1, y1 = quadrant_data([2, 3], 6, 1)
    for _ in range(3):
        s.learn(x1, y1)
    assert len(s.buffer) == 12 + 36  # under capacity: nothing replaced, the first 12 rows are x0's
    assert torch.equal(s.buffer.logits()[:12], stored)
    with torch.no_grad():
        now = s.model.train()(x0)
    s.model.eval()
    assert not torch.allclose(now, expected, atol=1e-3)  # the network moved; the stored logits did not


def test_reservoir_with_logits_keeps_them_aligned_and_uniform():
    n, cap, trials, batch = 40, 8, 300, 7
    counts = torch.zeros(n)
    for t in range(trials):
        g = torch.Generator().manual_seed(t)
        buf = ReservoirBuffer(cap)
        for i in range(0, n, batch):
            ids = torch.arange(i, min(i + batch, n))
            buf.add(ids.float().view(-1, 1), ids, g, logits=torch.stack([ids.float(), -ids.float()], 1))
            assert len(buf) == min(i + len(ids), cap) and buf.logits().shape == (len(buf), 2)
        x, held = buf.items()
        assert torch.equal(buf.logits(), torch.stack([held.float(), -held.float()], 1))  # logits follow samples
        counts[held] += 1
    freq = counts / trials
    sigma = math.sqrt(cap / n * (1 - cap / n) / trials)
    assert (freq - cap / n).abs().max() < 5 * sigma  # each sample kept with probability capacity / n
    bx, by, bz = buf.sample_with_logits(5, torch.Generator().manual_seed(0))
    assert torch.equal(bz[:, 0], by.float()) and torch.equal(bx[:, 0], by.float())


def test_buffer_state_carries_the_logits_and_a_buffer_without_logits_refuses_to_draw_them():
    buf = ReservoirBuffer(4)
    buf.add(torch.rand(3, 2), torch.tensor([0, 1, 2]), logits=torch.rand(3, 5))
    other = ReservoirBuffer(4)
    other.load_state(buf.state())
    assert torch.equal(other.logits(), buf.logits()) and torch.equal(other.items()[0], buf.items()[0])
    plain = ReservoirBuffer(4)
    plain.add(torch.rand(3, 2), torch.tensor([0, 1, 2]))
    assert "z" not in plain.state()
    with pytest.raises(RuntimeError, match="logits"):
        plain.sample_with_logits(2)


def _run(name, seed, **hp):
    torch.manual_seed(0)
    s = strategies.create(name, make_tiny(num_classes=4), buffer_size=10, replay_batch_size=4, seed=seed, **hp)
    x, y = quadrant_data([0, 1, 2, 3], 12, 0)
    for i in range(0, len(y), 8):
        s.learn(x[i:i + 8], y[i:i + 8])
    return s


@pytest.mark.parametrize("name", ["der", "derpp"])
def test_deterministic_under_a_seed(name):
    a, b, c = _run(name, 0), _run(name, 0), _run(name, 1)
    assert torch.equal(a.buffer.items()[0], b.buffer.items()[0]) and torch.equal(a.buffer.logits(), b.buffer.logits())
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert not torch.equal(a.buffer.items()[1], c.buffer.items()[1])  # another seed keeps other samples


def test_derpp_forwards_the_incoming_batch_and_two_separate_buffer_draws():
    s = _run("derpp", 0)
    sizes = []
    hook = s.model.register_forward_pre_hook(lambda mod, a: sizes.append(int(a[0].shape[0])))
    x, y = quadrant_data([2, 3], 6, 1)
    s.learn(x[:8], y[:8])
    hook.remove()
    assert sizes == [8, 4, 4]


def test_reset_restores_the_initial_state_and_checkpoints_carry_the_logits():
    s = _run("der", 0)
    fresh = strategies.create("der", make_tiny(num_classes=4), buffer_size=10, replay_batch_size=4)
    fresh.load_checkpoint_state(copy.deepcopy(s.checkpoint_state()))
    assert torch.equal(fresh.buffer.logits(), s.buffer.logits()) and fresh.buffer.seen == s.buffer.seen
    s.reset()
    assert len(s.buffer) == 0 and s.buffer.logits().numel() == 0


@pytest.mark.parametrize("name", ["der", "derpp"])
def test_runs_a_two_session_class_incremental_stream(name):
    torch.manual_seed(0)
    s = strategies.create(name, make_tiny(num_classes=4))
    res = ctta.run(two_session_stream(lambda c, n_per=12, seed=0: quadrant_data(c, n_per, seed), n_eval=6), s,
                   device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()
    assert s.sessions.session == 1 and len(s.buffer) > 0
