"""T3A: the model never changes, the support filter keeps the k lowest-entropy supports per pseudo-class, templates
and outputs equal a plain list-based computation of the paper's rule over several batches, predict adds nothing,
reset and determinism."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctta import strategies
from ctta.errors import UnsupportedError
from ctta.strategies.t3a import keep_lowest_entropy

from conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearOnInputs(nn.Module):
    """Penultimate features are the (flat) inputs; the head is one linear layer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)
    return -(p * p.log()).sum(1)


def plain_t3a(head: nn.Linear, batches, k: int):
    """The paper's rule on Python lists: supports start as the head rows; per batch add, keep k per class, score."""
    supports = [(w, int(head(w).argmax()), float(entropy(head(w)[None])[0])) for w in head.weight.detach()]
    outs = []
    for z in batches:
        logits = head(z)
        supports += [(z[i], int(logits[i].argmax()), float(entropy(logits[i:i + 1])[0])) for i in range(len(z))]
        kept = []
        for c in range(head.weight.shape[0]):
            kept += sorted((s for s in supports if s[1] == c), key=lambda s: s[2])[:k]
        supports = kept
        templates = torch.zeros(z.shape[1], head.weight.shape[0])
        for f, c, _ in supports:
            templates[:, c] += F.normalize(f, dim=0)
        outs.append(z @ F.normalize(templates, dim=0))
    return outs, supports


@torch.no_grad()
def test_t3a_equals_the_plain_rule_over_several_batches():
    g = torch.Generator().manual_seed(0)
    model = LinearOnInputs(torch.randn(3, 5, generator=g), torch.randn(3, generator=g))
    batches = [torch.randn(7, 5, generator=g) for _ in range(4)]
    s = strategies.create("t3a", model, filter_k=2)
    expected, supports = plain_t3a(model.fc, batches, k=2)
    for z, want in zip(batches, expected):
        torch.testing.assert_close(s.adapt(z), want, rtol=1e-5, atol=1e-6)
    kept = s.support_labels < 3
    assert int(kept.sum()) == len(supports)
    got = sorted((int(c), round(float(e), 5)) for c, e in zip(s.support_labels[kept], s.support_entropy[kept]))
    assert got == sorted((c, round(e, 5)) for _, c, e in supports)


def test_filter_keeps_k_lowest_entropy_per_class_in_class_major_slots():
    labels = torch.tensor([1, 0, 1, 1, 2, 0, 3])  # 3 marks an empty entry (num_classes = 3)
    ent = torch.tensor([0.5, 0.9, 0.1, 0.3, 0.7, 0.2, 0.0])
    slot = keep_lowest_entropy(labels, ent, num_classes=3, k=2)
    # class 0: entries 5 (0.2), 1 (0.9) -> slots 0, 1; class 1: 2 (0.1), 3 (0.3) -> 2, 3; entry 0 (0.5) dropped;
    # class 2: 4 -> slot 4; the empty entry is dropped (slot 6 = C * k)
    assert slot.tolist() == [6, 1, 2, 3, 4, 0, 6]


@torch.no_grad()
def test_t3a_never_changes_the_model_and_predict_adds_nothing(images):
    model = make_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = strategies.create("t3a", model, filter_k=3)
    s.adapt(images)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert s.trainable_parameters() == []
    bank = {k: v.clone() for k, v in s.state_dict().items() if k.startswith("support_")}
    first = s.predict(images)
    assert all(torch.equal(getattr(s, k), v) for k, v in bank.items())
    torch.testing.assert_close(s.predict(images), first)
    counts = torch.bincount(s.support_labels, minlength=5)[:4]
    assert int(counts.max()) <= 3


@torch.no_grad()
def test_t3a_starts_from_the_head_and_reset_returns_there(images):
    model = make_tiny()
    s = strategies.create("t3a", model, filter_k=4)
    start = {k: v.clone() for k, v in s.state_dict().items() if k.startswith("support_")}
    assert int((start["support_labels"] < s.num_classes).sum()) == model.fc.weight.shape[0]  # one per head row
    assert torch.equal(start["support_features"][start["support_labels"] < s.num_classes].sort(0).values,
                       model.fc.weight.sort(0).values)
    out = s.adapt(images)
    assert not torch.equal(s.support_labels, start["support_labels"])
    s.reset()
    assert all(torch.equal(getattr(s, k), v) for k, v in start.items())
    torch.testing.assert_close(s.adapt(images), out)


def test_t3a_is_deterministic_and_refuses_a_model_without_a_linear_head(images):
    a = strategies.create("t3a", make_tiny(), filter_k=5)
    b = strategies.create("t3a", make_tiny(), filter_k=5)
    assert torch.equal(a.adapt(images), b.adapt(images))
    with pytest.raises(UnsupportedError, match="linear classifier head"):
        strategies.create("t3a", nn.Sequential(nn.Flatten(), nn.ReLU()))
