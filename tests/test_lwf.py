"""LwF: the warm-up moves only the new head rows, the distillation target is the frozen previous model, the loss on
a hand-made case, determinism and reset."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ctta
from conftest import make_tiny, quadrant_data, two_session_stream
from ctta import strategies
from ctta.streams.base import tensor_segment
from ctta.strategies.lwf import lwf_distillation, smooth


def _segment(classes, seed, n_per=12, batch=8):
    x, y = quadrant_data(classes, n_per, seed)
    return tensor_segment(f"session-{seed}", "train", x, y, batch, role="session", meta={"classes": classes})


def _after_first_session(**hp):
    """``lwf`` on the tiny model after a session on classes 0, 1 (closed), the segment of classes 2, 3 next."""
    torch.manual_seed(0)
    s = strategies.create("lwf", make_tiny(num_classes=4), **hp)
    first = _segment([0, 1], 0)
    s.segment_start(first)
    for x, y in first.batches(torch.device("cpu")):
        s.learn(x, y)
    s.segment_end(first)
    return s, _segment([2, 3], 1)


def test_smooth_is_the_softmax_at_temperature_t_and_the_distillation_a_hand_computed_cross_entropy():
    z = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.1, -1.0]])
    assert torch.allclose(smooth(F.softmax(z, 1), 2.0), F.softmax(z / 2.0, 1), atol=1e-7)
    t = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    expected = 0.0
    for zs, zt in zip(z.tolist(), t.tolist()):
        ps = [math.exp(v / 2) for v in zs]
        pt = [math.exp(v / 2) for v in zt]
        expected += -sum(a / sum(pt) * math.log(b / sum(ps)) for a, b in zip(pt, ps))
    assert lwf_distillation(z, t, 2.0).item() == pytest.approx(expected / 2, rel=1e-6)


def test_warm_up_moves_only_the_new_classes_head_rows():
    s, second = _after_first_session()
    before = copy.deepcopy(s.model.state_dict())
    s.segment_start(second)
    after = s.model.state_dict()
    for k, v in before.items():
        if k.startswith("fc."):
            continue
        assert torch.equal(after[k], v), k  # body weights and BatchNorm statistics untouched (eval mode)
    for k in ("fc.weight", "fc.bias"):
        assert torch.equal(after[k][:2], before[k][:2]), k  # old rows
        assert not torch.allclose(after[k][2:], before[k][2:]), k  # new rows trained
    assert all(p.grad is None for p in s.model.parameters())
    assert not s.optimizer.state  # the main optimiser did not step


def test_warm_up_reads_the_new_classes_from_the_labels_when_the_segment_does_not_name_them():
    torch.manual_seed(0)
    s = strategies.create("lwf", make_tiny(num_classes=5))
    for x, y in _segment([0, 1], 0).batches(torch.device("cpu")):
        s.learn(x, y)
    s.close_session()
    second = _segment([2, 3], 1)
    second.meta.clear()
    before = s.model.fc.weight.detach().clone()
    s.segment_start(second)
    moved = (s.model.fc.weight != before).any(dim=1)
    assert moved.tolist() == [False, False, True, True, False]  # not the unseen class 4 outside the segment


def test_no_warm_up_in_the_first_session_nor_with_warmup_false():
    torch.manual_seed(0)
    s = strategies.create("lwf", make_tiny(num_classes=4))
    before = copy.deepcopy(s.model.state_dict())
    s.segment_start(_segment([0, 1], 0))
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in before.items())
    s, second = _after_first_session(warmup=False)
    before = copy.deepcopy(s.model.state_dict())
    s.segment_start(second)
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in before.items())


def test_distillation_target_is_the_frozen_previous_model_not_the_current_one():
    s, second = _after_first_session()
    s.segment_start(second)
    previous = copy.deepcopy(s.model).eval()  # after the warm-up: what the reference stores logits with
    batches = list(second.batches(torch.device("cpu")))
    for x, y in batches[:2]:
        s.learn(x, y)
    x, y = batches[2]
    with torch.no_grad():
        assert torch.equal(s.teacher(x), previous(x))  # the frozen copy did not follow the training
        assert not torch.allclose(s.model.eval()(x), previous(x), atol=1e-4)  # the network did
    # one more step by hand, the target from the previous model
    ref = copy.deepcopy(s.model).train()
    z = ref(x)
    keep = torch.tensor([True, True, True, True])
    loss = F.cross_entropy(z.masked_fill(~keep, float("-inf")), y) + 0.5 * lwf_distillation(
        z[:, :2], previous(x)[:, :2].detach(), 2.0)
    loss.backward()
    expected = {k: p.detach() - 0.03 * p.grad for k, p in ref.named_parameters()}
    s.learn(x, y)
    for k, p in s.model.named_parameters():
        assert torch.allclose(p, expected[k], atol=1e-7), k
    # the same step with the current model as the target would land elsewhere
    wrong = copy.deepcopy(ref)
    for p in wrong.parameters():
        p.grad = None
    z = wrong(x)
    with torch.no_grad():
        current = copy.deepcopy(wrong).eval()(x)[:, :2]
    (F.cross_entropy(z, y) + 0.5 * lwf_distillation(z[:, :2], current, 2.0)).backward()
    assert not all(torch.allclose(p.detach() - 0.03 * p.grad, expected[k], atol=1e-7)
                   for k, p in wrong.named_parameters())


def test_teacher_logits_equal_the_stored_logits_of_the_reference_on_other_batches():
    """The reference stores the old model's eval-mode logits in dataset-order batches after the warm-up; the frozen
    copy evaluated on the training batch gives the same old-class numbers."""
    s, second = _after_first_session()
    s.segment_start(second)
    x, y, _ = second.materialise(torch.device("cpu"))
    with torch.no_grad():
        stored = torch.cat([s.model.eval()(x[i:i + 5]) for i in range(0, len(x), 5)])  # other batch composition
    s.learn(x[:8], y[:8])
    with torch.no_grad():
        assert torch.allclose(s.teacher(x[:8]), stored[:8], atol=1e-6)
    assert s.old.tolist() == [True, True, False, False]


def _run(seed):
    torch.manual_seed(0)
    s = strategies.create("lwf", make_tiny(num_classes=4), seed=seed)
    ctta.run(two_session_stream(lambda c, n_per=12, seed=0: quadrant_data(c, n_per, seed), n_eval=6), s,
             device="cpu", progress=False)
    return s


def test_deterministic_and_runs_a_two_session_stream():
    a, b = _run(0), _run(0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.sessions.session == 1 and a.old.tolist() == [True, True, False, False]


def test_reset_restores_the_initial_state():
    s = _run(0)
    fresh = strategies.create("lwf", make_tiny(num_classes=4))
    fresh.load_checkpoint_state(copy.deepcopy(s.checkpoint_state()))
    assert torch.equal(fresh.teacher.fc.weight, s.teacher.fc.weight) and torch.equal(fresh.old, s.old)
    s.reset()
    assert not s.old.any() and s.old_index() is None
    init = make_tiny(num_classes=4).state_dict()
    assert all(torch.equal(v, init[k]) for k, v in s.model.state_dict().items())
