"""Online EWC: the Fisher on a hand-computed case and its online decay, the penalty (zero at the anchor, its
gradient in a step), BatchNorm during the Fisher pass, determinism and reset."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ctta
from conftest import make_tiny, quadrant_data, two_session_stream
from ctta import strategies
from ctta.streams.base import tensor_segment

W = [[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]]
B = [0.1, -0.2, 0.3]


class Lin(nn.Module):
    """A 2-input, 3-class linear model with hand-set weights (no BatchNorm: the Fisher can be computed by hand)."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(W))
            self.fc.bias.copy_(torch.tensor(B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


X = [[0.5, -0.5], [2.0, 1.0], [-1.0, 0.5], [0.0, 1.5]]
Y = [0, 1, 2, 1]


def _hand_fisher(xs, ys, weighted=True):
    """mean_i w_i (d log p(y_i|x_i) / d theta)**2 for the linear softmax model: d/dW_c = (1[c=y] - p_c) x."""
    fw = [[0.0, 0.0] for _ in range(3)]
    fb = [0.0] * 3
    for x, y in zip(xs, ys):
        z = [W[c][0] * x[0] + W[c][1] * x[1] + B[c] for c in range(3)]
        s = sum(math.exp(v) for v in z)
        p = [math.exp(v) / s for v in z]
        w = p[y] if weighted else 1.0
        for c in range(3):
            g = (1.0 if c == y else 0.0) - p[c]
            fb[c] += w * g * g
            for j in range(2):
                fw[c][j] += w * (g * x[j]) ** 2
    n = len(xs)
    return torch.tensor(fw) / n, torch.tensor(fb) / n


def _segment(xs, ys, batch=2):
    return tensor_segment("session-0", "train", torch.tensor(xs), torch.tensor(ys), batch, role="session")


def _consolidated(weighted=True, **hp):
    s = strategies.create("ewc", Lin(), lr=1e-9, likelihood_weighted=weighted, **hp)
    s.seen.update(torch.tensor([0, 1, 2]))
    s.sessions.on_learn()
    s.segment_end(_segment(X, Y))
    return s


@pytest.mark.parametrize("weighted", [True, False])
def test_fisher_is_the_mean_weighted_squared_gradient_of_the_log_likelihood(weighted):
    s = _consolidated(weighted)
    fw, fb = _hand_fisher(X, Y, weighted)
    f = s.fisher()
    assert torch.allclose(f["fc.weight"], fw, atol=1e-7) and torch.allclose(f["fc.bias"], fb, atol=1e-7)
    assert torch.equal(s.anchor()["fc.weight"], torch.tensor(W))
    assert all(p.grad is None for p in s.model.parameters())


def test_a_partial_last_batch_divides_by_batches_times_batch_size_as_the_reference():
    s = strategies.create("ewc", Lin())
    s.seen.update(torch.tensor([0, 1, 2]))
    s.sessions.on_learn()
    s.segment_end(_segment(X[:3], Y[:3], batch=2))  # 2 batches of 2: divisor 4, three images
    fw, _ = _hand_fisher(X[:3], Y[:3])
    assert torch.allclose(s.fisher()["fc.weight"], fw * 3 / 4, atol=1e-7)


def test_fisher_accumulates_online_with_decay_gamma():
    s = _consolidated(gamma=0.5)
    first = {k: v.clone() for k, v in s.fisher().items()}
    s.sessions.on_learn()
    xs2, ys2 = [[1.0, 1.0], [-0.5, -2.0]], [2, 0]
    s.segment_end(_segment(xs2, ys2))
    fw2, fb2 = _hand_fisher(xs2, ys2)
    assert torch.allclose(s.fisher()["fc.weight"], 0.5 * first["fc.weight"] + fw2, atol=1e-7)
    assert torch.allclose(s.fisher()["fc.bias"], 0.5 * first["fc.bias"] + fb2, atol=1e-7)


def test_penalty_is_zero_at_the_anchor_and_lambda_half_weighted_squares_away_from_it():
    s = _consolidated(ewc_lambda=3.0)
    pen = s.penalty()
    assert pen.item() == 0.0
    grads = torch.autograd.grad(pen, [s.model.fc.weight, s.model.fc.bias])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    delta = torch.tensor([[0.1, -0.2], [0.3, 0.0], [0.0, 0.5]])
    with torch.no_grad():
        s.model.fc.weight.add_(delta)
    expected = 1.5 * (s.fisher()["fc.weight"] * delta.square()).sum()
    assert s.penalty().item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_step_after_consolidation_is_sgd_on_ce_plus_the_penalty():
    s = _consolidated(ewc_lambda=20.0)
    for g in s.optimizer.param_groups:
        g["lr"] = 0.1
    with torch.no_grad():
        s.model.fc.weight.add_(0.05)  # away from the anchor, so the penalty pulls back
    ref = copy.deepcopy(s.model)
    x, y = torch.tensor(X[:2]), torch.tensor(Y[:2])
    F.cross_entropy(ref(x), y).backward()
    f, a = s.fisher(), s.anchor()
    expected = {k: p.detach() - 0.1 * (p.grad + 20.0 * f[k] * (p.detach() - a[k])) for k, p in ref.named_parameters()}
    s.learn(x, y)
    for k, p in s.model.named_parameters():
        assert torch.allclose(p, expected[k], atol=1e-7), k


def test_no_penalty_before_the_first_session_ends_and_the_loss_covers_unseen_outputs_too():
    s = strategies.create("ewc", Lin())
    ref = copy.deepcopy(s.model)
    x, y = torch.tensor(X[:2]), torch.tensor(Y[:2])  # classes 0, 1: class 2 unseen, still in the loss (reference)
    F.cross_entropy(ref(x), y).backward()
    out = s.learn(x, y)
    assert torch.isinf(out[:, 2]).all()  # the returned prediction is masked
    for k, p in ref.named_parameters():
        assert torch.allclose(dict(s.model.named_parameters())[k], p.detach() - 0.1 * p.grad, atol=1e-7)


def test_fisher_covers_every_output_with_unseen_classes():
    s = strategies.create("ewc", Lin())
    s.seen.update(torch.tensor([0, 1]))
    s.sessions.on_learn()
    s.segment_end(_segment(X[:2], Y[:2]))
    fw, fb = _hand_fisher(X[:2], Y[:2])  # softmax over the three outputs
    assert torch.allclose(s.fisher()["fc.weight"], fw, atol=1e-7) and torch.allclose(s.fisher()["fc.bias"], fb)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fisher_pass_updates_batchnorm_statistics_image_by_image_only_in_train_mode(mode):
    torch.manual_seed(0)
    s = strategies.create("ewc", make_tiny(num_classes=4), fisher_mode=mode)
    x, y = quadrant_data([0, 1], 3, 0)
    s.seen.update(y)
    s.sessions.on_learn()
    expected = copy.deepcopy(s.model)
    if mode == "train":
        expected.train()
        with torch.no_grad():
            for i in range(len(x)):
                expected(x[i:i + 1])  # each image alone, as the reference's end_task
    before = copy.deepcopy(s.model.state_dict())
    s.segment_end(tensor_segment("s", "train", x, y, 4, role="session"))
    for k, v in expected.state_dict().items():
        assert torch.allclose(s.model.state_dict()[k], v, atol=1e-6), k
    changed = not torch.equal(s.model.bn1.running_mean, before["bn1.running_mean"])
    assert changed == (mode == "train")
    assert not s.model.training


def _run(seed, **hp):
    torch.manual_seed(0)
    s = strategies.create("ewc", make_tiny(num_classes=4), seed=seed, **hp)
    res = ctta.run(two_session_stream(lambda c, n_per=12, seed=0: quadrant_data(c, n_per, seed), n_eval=6), s,
                   device="cpu", progress=False)
    return s, res


def test_deterministic_and_runs_a_two_session_stream():
    (a, res), (b, _) = _run(0), _run(0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert bool(a.consolidated) and a.sessions.session == 1
    assert all(v.abs().sum() > 0 for v in a.fisher().values())
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()


def test_reset_restores_the_initial_state_and_checkpoints_carry_the_fisher():
    s, _ = _run(0)
    fresh = strategies.create("ewc", make_tiny(num_classes=4))
    fresh.load_checkpoint_state(copy.deepcopy(s.checkpoint_state()))
    assert fresh._consolidated and all(torch.equal(fresh.fisher()[k], v) for k, v in s.fisher().items())
    s.reset()
    assert not s._consolidated and all(v.abs().sum() == 0 for v in s.fisher().values())
