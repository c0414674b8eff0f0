"""EATA (``eata``) and ETA (``eta``): the reliable and the redundancy filters on hand-made logits, the entropy weight,
the source Fisher and its penalty, no step on an empty selection, resets."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_tiny
from ctta import strategies
from ctta.errors import ConfigError

C = 4
E0 = 0.4 * math.log(C)


class LogitsAreInputs(nn.Module):
    """logits = x * gamma + beta with the affine of a LayerNorm (identity at the start): hand-made logits."""

    num_classes = C

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(C)

    def forward(self, x):
        return x * self.norm.weight + self.norm.bias


def _ent(z):
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def _rows(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_reliable_and_non_redundant_selection_on_hand_made_logits():
    s = strategies.create("eta", LogitsAreInputs(), lr=1e-12, d_margin=0.4)
    confident0, confident1, unsure = [8.0, 0, 0, 0], [0, 8.0, 0, 0], [0.0, 0, 0, 0]
    assert _ent(_rows(confident0))[0] < E0 < _ent(_rows(unsure))[0]
    # first batch: m unset -> every reliable sample is kept, m = their mean probability
    x1 = _rows(confident0, unsure, confident0, [6.0, 0, 0, 0])
    s.adapt(x1)
    assert s.last_kept == (3, 3)
    p1 = x1[[0, 2, 3]].softmax(1).mean(0)
    torch.testing.assert_close(s.model_probs, p1)
    # second batch: class-0 predictions are redundant with m (cosine ~1), class-1 ones are not (cosine ~0)
    x2 = _rows(confident0, confident1, unsure, confident1)
    cos = torch.nn.functional.cosine_similarity(p1.unsqueeze(0), x2.softmax(1), dim=1)
    assert cos[0] > 0.4 > cos[1]
    s.adapt(x2)
    assert s.last_kept == (3, 2)
    torch.testing.assert_close(s.model_probs, 0.9 * p1 + 0.1 * x2[[1, 3]].softmax(1).mean(0))


def test_the_step_is_sgd_on_the_entropy_weighted_mean_over_the_selection():
    x = _rows([3.0, 0, 0, 0], [0, 0, 0, 0], [2.5, 1.0, 0, 0], [0, 0, 4.0, 0])
    s = strategies.create("eta", LogitsAreInputs(), optimizer="sgd", lr=1.0, momentum=0.0, nesterov=False)
    ref = LogitsAreInputs()
    z = ref(x)
    ent = _ent(z)
    keep = ent.detach() < E0
    assert 0 < int(keep.sum()) < len(x)
    loss = (ent[keep] / torch.exp(ent[keep].detach() - E0)).mean()
    grads = torch.autograd.grad(loss, [ref.norm.weight, ref.norm.bias])
    out = s.adapt(x)
    torch.testing.assert_close(out, z.detach())  # the prediction before the update
    torch.testing.assert_close(s.model.norm.weight, 1 - grads[0])
    torch.testing.assert_close(s.model.norm.bias, -grads[1])


def test_no_step_when_nothing_is_selected():
    s = strategies.create("eta", LogitsAreInputs(), lr=0.1)
    before = [p.clone() for p in s.params]
    s.adapt(torch.zeros(5, C))  # uniform predictions: none reliable
    assert s.last_kept == (0, 0) and not bool(s.probs_set)
    assert all(torch.equal(p, b) for p, b in zip(s.params, before))
    assert len(s.optimizer.state) == 0, "no optimiser step at all (Adam's moments untouched)"


def _source(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, C, (n,), generator=g)


def test_the_fisher_is_the_mean_squared_gradient_of_the_self_labelled_source_batches(images):
    src = _source()
    s = strategies.create("eata", make_tiny(), source_data=src, source_samples=None, fisher_batch=16)
    order = s.source_images.clone()
    assert sorted(order.flatten().tolist()) == sorted(src[0].flatten().tolist())  # a permutation of the set
    s.adapt(images)
    ref = make_tiny().train()
    for bn in (ref.bn1, ref.bn2):
        bn.track_running_stats = False
    params = dict(ref.named_parameters())
    names = ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]
    sums = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(0, 48, 16):
        z = ref(order[i:i + 16])
        loss = nn.functional.cross_entropy(z, z.argmax(1))
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            sums[n] += g.square()
    assert set(s.fisher) == set(names)
    for n in names:
        torch.testing.assert_close(s.fisher[n], sums[n] / 3)


def test_the_fisher_penalty_adds_its_gradient_towards_the_source_weights():
    g = torch.Generator().manual_seed(3)
    src = (torch.randn(32, C, generator=g) * 3, torch.zeros(32, dtype=torch.long))
    x1, x2 = torch.randn(6, C, generator=g) * 3, torch.randn(6, C, generator=g) * 3
    lr, w = 0.5, 3.0
    s = strategies.create("eata", LogitsAreInputs(), source_data=src, source_samples=None, fisher_batch=16,
                          fisher_weight=w, optimizer="sgd", lr=lr, momentum=0.0, nesterov=False, e_margin=10.0,
                          d_margin=1.0)  # every sample selected
    s.adapt(x1)  # at the source weights the penalty's gradient is zero
    theta1 = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    probs = s.model_probs.clone()
    ref = LogitsAreInputs()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(theta1[n])
    z = ref(x2)
    ent = _ent(z)
    cos = torch.nn.functional.cosine_similarity(probs.unsqueeze(0), z.softmax(1), dim=1)
    keep = cos.detach().abs() < 1.0
    e0 = 10.0 * math.log(C)
    loss = (ent[keep] / torch.exp(ent[keep].detach() - e0)).mean()
    names = ["norm.weight", "norm.bias"]
    grads = torch.autograd.grad(loss, [dict(ref.named_parameters())[n] for n in names])
    source = {"norm.weight": torch.ones(C), "norm.bias": torch.zeros(C)}
    s.adapt(x2)
    for n, gr in zip(names, grads):
        pull = 2 * w * s.fisher[n] * (theta1[n] - source[n])
        assert pull.abs().max() > 1e-4, "the test must exercise the penalty"
        torch.testing.assert_close(dict(s.model.named_parameters())[n], theta1[n] - lr * (gr + pull))


def test_eata_needs_source_data_and_eta_does_not():
    with pytest.raises(ConfigError, match="source data"):
        strategies.create("eata", make_tiny())
    assert strategies.create("eta", make_tiny()).fisher is None
    assert strategies.create("eata", make_tiny(), fisher_weight=0.0).fisher is None  # weight 0: no source read


def test_reset_returns_to_the_start_and_keeps_the_fisher(images):
    s = strategies.create("eata", make_tiny(), source_data=_source(), fisher_batch=16, e_margin=10.0, d_margin=1.0)
    first = s.adapt(images)
    fisher = {k: v.clone() for k, v in s.fisher.items()}
    s.adapt(images * 0.5)
    assert bool(s.probs_set)
    s.reset()
    assert not bool(s.probs_set) and int(s.updates) == 0 and len(s.optimizer.state) == 0
    assert all(torch.equal(s.fisher[k], v) for k, v in fisher.items())
    assert torch.equal(s.adapt(images), first)


def test_eta_is_deterministic(images):
    runs = [[s.adapt(images * k) for k in (1.0, 0.5, 1.0)]
            for s in (strategies.create("eta", make_tiny(), e_margin=10.0, seed=2) for _ in range(2))]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_defaults_are_the_reference_cifar10_values():
    s = strategies.create("eta", make_tiny(num_classes=10))
    g = s.optimizer.param_groups[0]
    assert isinstance(s.optimizer, torch.optim.Adam) and (g["lr"], g["betas"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 0)
    assert s.e0 == pytest.approx(0.4 * math.log(10)) and s.d_margin == 0.4 and s.reset_every == 0
    hp = strategies.check_hparams("eata", {})
    assert (hp["fisher_weight"], hp["d_margin"], hp["source_samples"], hp["fisher_batch"]) == (1.0, 0.4, 2000, 200)
    sgd = strategies.create("eta", make_tiny(), optimizer="sgd", lr=2.5e-4).optimizer.param_groups[0]
    assert (sgd["momentum"], sgd["nesterov"]) == (0.9, True)  # the reference's ImageNet optimiser
