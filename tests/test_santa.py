"""SANTA (``santa``): AugCrossEntropy by hand, the nearest prototype, the prototypes, what it updates and what it never
touches, the output, reset and determinism."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny
from ctta import strategies
from ctta.errors import ConfigError
from ctta.strategies.common import aug_cross_entropy, norm_affine_parameters, use_batch_statistics
from ctta.strategies.common.source_prototypes import nearest_prototype

pytestmark = pytest.mark.usefixtures("one_thread")


def _source(n: int = 40, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % classes


def _santa(**kw):
    kw = {"source_data": _source(), "source_batch": 10, "seed": 1, **kw}
    return strategies.create("santa", make_tiny(), **kw)


def _batch(seed: int = 5):
    return torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _params(module: nn.Module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_aug_cross_entropy_by_hand():
    s = torch.tensor([[math.log(2.0), 0.0]])  # softmax (2/3, 1/3)
    s_aug = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    a = torch.tensor([[0.0, math.log(4.0)]])  # softmax (1/5, 4/5)
    log_a = [math.log(1 / 5), math.log(4 / 5)]
    expected = (-0.5 * (2 / 3 * log_a[0] + 1 / 3 * log_a[1])    # -(1 - alpha) sum p_s log p_a
                - 0.5 * (1 / 4 * log_a[0] + 3 / 4 * log_a[1]))  # -alpha sum p_s' log p_a
    torch.testing.assert_close(aug_cross_entropy(s, s_aug, a), torch.tensor([expected]))
    weighted = -(0.8 * (2 / 3 * log_a[0] + 1 / 3 * log_a[1]) + 0.2 * (1 / 4 * log_a[0] + 3 / 4 * log_a[1]))
    torch.testing.assert_close(aug_cross_entropy(s, s_aug, a, alpha=0.2), torch.tensor([weighted]))


def test_nearest_prototype_is_the_most_cosine_similar():
    g = torch.Generator().manual_seed(3)
    protos, feats = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    cos = F.cosine_similarity(protos.unsqueeze(1), feats.unsqueeze(0), dim=-1)  # 6 x 40, as the reference's dist
    assert torch.equal(nearest_prototype(protos, feats), cos.topk(1, dim=0).indices.squeeze(0))
    # a hand-made case: scale does not matter, direction does
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    feats = torch.tensor([[10.0, 1.0], [0.1, 0.3], [-0.2, -0.3], [0.0, -5.0]])
    assert nearest_prototype(protos, feats).tolist() == [0, 1, 2, 2]


def test_prototypes_are_the_class_means_of_the_source_features():
    x, y = _source()
    s = _santa(source_batch=40)  # one batch: its BatchNorm statistics are those of the whole set
    s.ensure_ready(torch.device("cpu"))
    net = make_tiny().eval()
    use_batch_statistics(net)
    with torch.no_grad():
        f = net.forward_features(x)
    torch.testing.assert_close(s.prototypes, torch.stack([f[y == c].mean(0) for c in range(4)]))


def test_output_is_the_student_before_the_update():
    s = _santa()
    x = _batch()
    s.ensure_ready(x.device)
    with torch.no_grad():
        expected = s.model(x)
    torch.testing.assert_close(s.adapt(x), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(s.predict(x), expected), "the model adapted"


def test_what_is_updated_and_what_never_is():
    s = _santa()
    x = _batch()
    s.ensure_ready(x.device)
    affine = {n for n, _ in norm_affine_parameters(s.model)}
    assert affine and {id(p) for p in s.params} == {id(p) for _, p in norm_affine_parameters(s.model)}
    student0, projector0, anchor0 = _params(s.model), _params(s.projector), _params(s.anchor)
    buffers0 = {k: v.clone() for k, v in list(s.model.named_buffers()) + list(s.anchor.named_buffers())}
    protos0 = s.prototypes.clone()
    for _ in range(2):
        s.adapt(_batch(7))
    for k, p in s.model.named_parameters():
        if k in affine:  # the norm layers' affines move
            assert not torch.equal(p, student0[k]), k
        else:  # convolutions and the head never
            assert torch.equal(p, student0[k]) and not p.requires_grad, k
    assert all(not torch.equal(p, projector0[k]) for k, p in s.projector.named_parameters())
    # never: the anchor (the source model), BatchNorm running statistics, the prototypes
    for k, p in s.anchor.named_parameters():
        assert torch.equal(p, anchor0[k]) and not p.requires_grad, k
    for k, v in list(s.model.named_buffers()) + list(s.anchor.named_buffers()):
        assert torch.equal(v, buffers0[k]), k
    assert torch.equal(s.prototypes, protos0)
    # the anchor is the source model with batch statistics
    net = make_tiny().eval()
    use_batch_statistics(net)
    with torch.no_grad():
        torch.testing.assert_close(s.anchor(x), net(x), rtol=0, atol=0)


def test_reset_restores_the_initial_state():
    s = _santa()
    x = _batch()
    s.ensure_ready(x.device)
    initial = copy.deepcopy(s.state_dict())
    for _ in range(2):
        s.adapt(x)
    draws = s.augment.host_gen.get_state()
    s.reset()
    for k, v in s.state_dict().items():
        assert torch.equal(v, initial[k]), k
    assert not s.optimizer.state_dict()["state"], "the optimiser's moments are cleared"
    # as the reference's global generator, the view draws go on
    assert torch.equal(s.augment.host_gen.get_state(), draws)
    assert bool(s.ready) and torch.equal(s.prototypes, initial["prototypes"])


def test_projector_init_is_nn_linear_under_the_seed_and_leaves_the_global_generator_alone():
    before = torch.get_rng_state()
    s = _santa(seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    expected = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128))
    for (k, a), b in zip(s.projector.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), k
    torch.set_rng_state(before)


def test_determinism_under_a_seed():
    def run(seed):
        s = _santa(seed=seed)
        return [s.adapt(_batch(k)) for k in range(3)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[-1], c[-1])


def test_a_checkpoint_resumes_the_same_steps():
    a = _santa()
    a.adapt(_batch(0))
    saved = copy.deepcopy(a.checkpoint_state())
    expected = a.adapt(_batch(1))
    b = _santa()
    b.load_checkpoint_state(saved)
    assert torch.equal(b.adapt(_batch(1)), expected)


def test_needs_source_data():
    with pytest.raises(ConfigError, match="santa needs source data"):
        strategies.create("santa", make_tiny())
