"""Online SHOT: the losses against hand computations, the head never moves while the feature extractor does, the
pseudo-label term only counts confident samples (and is 0, not NaN, without one), SHOT-IM = cls_par 0, the BN modes,
the returned prediction is the pre-update one, reset and determinism."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ctta import strategies
from ctta.strategies.shot import confident_pseudo_label_loss, information_maximisation

from conftest import adapt_once, make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_information_maximisation_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p = (3/4, 1/4) and (1/2, 1/2)
    h = lambda p: -sum(q * math.log(q) for q in p)  # noqa: E731
    mean = (5 / 8, 3 / 8)
    want = (h((0.75, 0.25)) + h((0.5, 0.5))) / 2 + sum(m * math.log(m + 1e-5) for m in mean)
    assert float(information_maximisation(logits)) == pytest.approx(want, abs=1e-6)


def test_pseudo_label_term_counts_only_confident_samples_and_is_zero_without_one():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 5.0]])
    conf = logits.softmax(1).max(1).values
    assert conf[0] > 0.9 and conf[1] < 0.9 and conf[2] > 0.9
    want = F.cross_entropy(logits[[0, 2]], torch.tensor([0, 2]))
    torch.testing.assert_close(confident_pseudo_label_loss(logits, 0.9), want)
    none = confident_pseudo_label_loss(logits[1:2], 0.9)
    assert float(none) == 0.0 and torch.isfinite(none)


def test_shot_adapts_the_feature_extractor_not_the_head_and_returns_the_pre_update_prediction(images):
    s, out, expected, changed = adapt_once("shot", images)
    torch.testing.assert_close(out, expected)
    assert not any(k.startswith("fc.") for k in changed)
    assert {"conv1.weight", "conv2.weight", "bn1.weight"} <= changed
    # BatchNorm on test-batch statistics, running buffers untouched (bn: batch, the default)
    assert not any("running" in k for k in changed)
    assert all(not p.requires_grad for p in s.model.fc.parameters())


def test_shot_with_source_statistics_keeps_the_model_in_eval_mode(images):
    model = make_tiny()
    with torch.no_grad():
        expected = model(images)
    s = strategies.create("shot", model, bn="source", optimizer="adam", lr=1e-3)
    assert not model.training
    torch.testing.assert_close(s.adapt(images), expected)


def test_shot_im_is_cls_par_zero(images):
    """cls_par 0 drops the pseudo-label term: the update equals a hand-written IM step."""
    model, twin = make_tiny(), make_tiny()
    s = strategies.create("shot", model, cls_par=0.0, bn="source", optimizer="sgd", lr=0.1, momentum=0.0)
    params = [p for n, p in twin.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.SGD(params, lr=0.1)
    twin.eval()
    information_maximisation(twin(images)).backward()
    opt.step()
    s.adapt(images)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, msg=n)


def test_shot_reset_and_determinism(images):
    a = strategies.create("shot", make_tiny(), lr=0.05)
    b = strategies.create("shot", make_tiny(), lr=0.05)
    first = a.adapt(images)
    assert torch.equal(first, b.adapt(images))
    assert torch.equal(a.adapt(images), b.adapt(images))
    a.reset()
    torch.testing.assert_close(a.adapt(images), first)
