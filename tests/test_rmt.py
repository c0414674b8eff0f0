"""RMT (``rmt``): its losses by hand, the source prototypes, what it updates, the EMA teacher, the warm-up (once, lr
ramp), the ensemble output, reset and determinism."""
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
from ctta.strategies.common import symmetric_cross_entropy, use_batch_statistics
from ctta.strategies.rmt import class_means, contrastive_loss, nearest_prototype

pytestmark = pytest.mark.usefixtures("one_thread")


def _source(n: int = 40, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % classes


def _rmt(**kw):
    kw = {"source_data": _source(), "source_batch": 10, "warmup_samples": 0, "seed": 1, **kw}
    return strategies.create("rmt", make_tiny(), **kw)


def _batch(seed: int = 5):
    return torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _params(module: nn.Module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_symmetric_cross_entropy_by_hand():
    s = torch.tensor([[math.log(2.0), 0.0]])  # softmax (2/3, 1/3)
    t = torch.tensor([[0.0, 0.0]])            # softmax (1/2, 1/2)
    expected = (-0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(1 / 3))  # -(1 - a) sum p_t log p_s
                - 0.5 * (2 / 3 * math.log(0.5) + 1 / 3 * math.log(0.5)))  # -a sum p_s log p_t
    torch.testing.assert_close(symmetric_cross_entropy(s, t), torch.tensor([expected]))


def test_contrastive_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 3, 4, generator=g)  # 3 samples x 3 views (prototype, test, augmented) x 4
    temperature = 0.5
    z = F.normalize(torch.cat([feats[:, v] for v in range(3)]), dim=1)  # view-major
    sample = torch.arange(3).repeat(3)
    terms = []
    for i in range(9):
        denom = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in range(9) if a != i)
        pos = [p for p in range(9) if p != i and sample[p] == sample[i]]
        terms.append(-sum(float(z[i] @ z[p]) / temperature - math.log(denom) for p in pos) / len(pos))
    got = contrastive_loss(feats, nn.Identity(), temperature)
    assert math.isclose(float(got), sum(terms) / 9, rel_tol=1e-5)


def test_prototypes_are_the_class_means_of_the_source_features():
    x, y = _source()
    s = _rmt(source_batch=40)  # one batch: its BatchNorm statistics are those of the whole set
    s.ensure_ready(torch.device("cpu"))
    net = make_tiny().eval()
    use_batch_statistics(net)
    with torch.no_grad():
        f = net.forward_features(x)
    expected = torch.stack([f[y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(s.prototypes, expected)
    # a class without samples gets a zero row, not NaN
    means = class_means(torch.ones(3, 2), torch.tensor([0, 0, 2]), 3)
    assert torch.equal(means, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))


def test_nearest_prototype_is_the_most_cosine_similar():
    g = torch.Generator().manual_seed(1)
    protos, feats = torch.randn(5, 8, generator=g), torch.randn(30, 8, generator=g)
    cos = F.cosine_similarity(protos.unsqueeze(1), feats.unsqueeze(0), dim=-1)  # 5 x 30, as the reference's dist
    assert torch.equal(nearest_prototype(protos, feats), cos.topk(1, dim=0).indices.squeeze(0))


def test_output_is_student_plus_teacher_before_the_update():
    s = _rmt()
    x = _batch()
    s.ensure_ready(x.device)
    with torch.no_grad():
        expected = s.model(x) + s.teacher(x)
    out = s.adapt(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(s.predict(x), expected), "the student adapted"


def test_teacher_is_the_ema_of_the_student():
    s = _rmt(mt=0.9)
    x = _batch()
    s.ensure_ready(x.device)
    teacher0 = _params(s.teacher)
    s.adapt(x)
    student1 = _params(s.model)
    for name, p in s.teacher.named_parameters():
        assert torch.equal(p, 0.9 * teacher0[name] + (1 - 0.9) * student1[name]), name
        assert not p.requires_grad


def test_what_is_updated_and_what_never_is():
    s = _rmt()
    x = _batch()
    s.ensure_ready(x.device)
    student0, projector0 = _params(s.model), _params(s.projector)
    buffers0 = {k: v.clone() for k, v in list(s.model.named_buffers()) + list(s.teacher.named_buffers())}
    protos0, images0 = s.prototypes.clone(), s.source_images.clone()
    for _ in range(2):
        s.adapt(x)
    # every weight and bias of the student moves, and the projector
    assert all(not torch.equal(p, student0[k]) for k, p in s.model.named_parameters())
    assert all(not torch.equal(p, projector0[k]) for k, p in s.projector.named_parameters())
    # never: BatchNorm running statistics (batch statistics are used), prototypes, source images
    for k, v in list(s.model.named_buffers()) + list(s.teacher.named_buffers()):
        assert torch.equal(v, buffers0[k]), k
    assert torch.equal(s.prototypes, protos0) and torch.equal(s.source_images, images0)
    assert all(not p.requires_grad for p in s.teacher.parameters())


def test_source_replay_reads_the_next_source_batch_and_the_source_free_variant_none():
    s = _rmt()
    s.adapt(_batch())
    assert s.source_index == 1  # 4 batches of 10, cycling
    for _ in range(4):
        s.adapt(_batch())
    assert s.source_index == 1
    free = _rmt(lambda_ce_src=0.0)
    free.adapt(_batch())
    assert free.source_index == 0


def test_the_warm_up_runs_once_with_a_linear_learning_rate_ramp():
    s = _rmt(warmup_samples=30, lr=1e-2)  # 30 // 10 = 3 steps
    lrs = []
    step = s.optimizer.step

    def recorded(*a, **k):
        lrs.append([g["lr"] for g in s.optimizer.param_groups])
        return step(*a, **k)

    s.optimizer.step = recorded
    before = _params(s.model)
    s.ensure_ready(torch.device("cpu"))
    assert s.warmups == 1 and s.source_index == 3
    assert any(not torch.equal(p, before[k]) for k, p in s.model.named_parameters()), "the warm-up trains"
    assert lrs == [[1e-2 / 3] * 2, [1e-2 * 2 / 3] * 2, [1e-2] * 2]
    assert [g["lr"] for g in s.optimizer.param_groups] == [1e-2, 1e-2]
    for _ in range(2):
        s.adapt(_batch())
    s.reset()
    s.predict(_batch())
    s.adapt(_batch())
    assert s.warmups == 1, "neither later steps nor a reset warm up again"


def test_reset_restores_the_state_after_the_warm_up():
    s = _rmt(warmup_samples=20)
    x = _batch()
    s.ensure_ready(x.device)
    after_warmup = copy.deepcopy(s.state_dict())
    adam = copy.deepcopy(s.optimizer.state_dict())
    for _ in range(2):
        s.adapt(x)
    draws, source_index = s.augment.host_gen.get_state(), s.source_index
    s.reset()
    for k, v in s.state_dict().items():
        assert torch.equal(v, after_warmup[k]), k
    # as the reference's global generator and source loader, the view draws and the source batches go on
    assert torch.equal(s.augment.host_gen.get_state(), draws) and s.source_index == source_index
    state = s.optimizer.state_dict()["state"]
    assert state.keys() == adam["state"].keys()
    for i in state:
        assert all(torch.equal(state[i][k], adam["state"][i][k]) for k in state[i])


def test_projector_init_is_nn_linear_under_the_seed_and_leaves_the_global_generator_alone():
    before = torch.get_rng_state()
    s = _rmt(seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    expected = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128))
    for (k, a), b in zip(s.projector.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), k
    torch.set_rng_state(before)


def test_determinism_under_a_seed():
    def run(seed):
        s = _rmt(seed=seed, warmup_samples=10)
        return [s.adapt(_batch(k)) for k in range(3)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[-1], c[-1])


def test_a_checkpoint_resumes_the_same_steps_without_warming_up_again():
    a = _rmt(warmup_samples=20)
    a.adapt(_batch(0))
    saved = copy.deepcopy(a.checkpoint_state())
    expected = a.adapt(_batch(1))
    b = _rmt(warmup_samples=20)
    b.load_checkpoint_state(saved)
    assert torch.equal(b.adapt(_batch(1)), expected) and b.warmups == 0


def test_needs_source_data():
    with pytest.raises(ConfigError, match="rmt needs source data"):
        strategies.create("rmt", make_tiny())
