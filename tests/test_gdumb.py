"""GDumb: the greedy class-balanced sampler on hand-made streams, retraining from the same initial weights, the
learning-rate schedule, CutMix, determinism, reset, and a run through the engine."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import ctta
from conftest import make_tiny, quadrant_data, two_session_stream
from ctta import strategies
from ctta.strategies.common.cutmix import cutmix
from ctta.strategies.common.replay import GreedyClassBalancedBuffer

pytestmark = pytest.mark.usefixtures("one_thread")


def _offer(buf, labels, start=0, gen=None):
    """Offer samples whose single feature is their arrival index, with the given labels, in one batch."""
    x = torch.arange(start, start + len(labels), dtype=torch.float32).view(-1, 1)
    buf.add(x, torch.tensor(labels), gen or torch.Generator().manual_seed(0))
    return start + len(labels)


def test_greedy_sampler_stays_class_balanced_on_a_hand_made_stream():
    buf, t = GreedyClassBalancedBuffer(6), 0
    t = _offer(buf, [0] * 8, t)
    assert buf.counts() == {0: 6}
    assert buf.items()[0].flatten().tolist() == [0, 1, 2, 3, 4, 5]  # first come, first kept; the rest dropped
    t = _offer(buf, [1] * 5, t)
    assert buf.counts() == {0: 3, 1: 3}  # class 1 enters until 6 / 2, each time evicting class 0 (the largest)
    x, y = buf.items()
    assert x[y == 1].flatten().tolist() == [8, 9, 10]  # its first three arrivals
    assert set(x[y == 0].flatten().tolist()) <= {0, 1, 2, 3, 4, 5}  # survivors of class 0, never replaced by class 0
    t = _offer(buf, [2, 0, 2, 2, 1], t)
    assert buf.counts() == {0: 2, 1: 2, 2: 2}  # the late 0 and 1 are refused (their classes are at 6 / 3)
    assert len(buf) == 6


def test_greedy_sampler_evicts_from_the_largest_class_lowest_label_on_ties():
    buf = GreedyClassBalancedBuffer(5)
    t = _offer(buf, [0, 0, 0, 1, 1])
    t = _offer(buf, [2], t)  # classes 0 (3), 1 (2): class 2 takes a slot of class 0
    assert buf.counts() == {0: 2, 1: 2, 2: 1}
    t = _offer(buf, [3], t)  # 0 and 1 tie at 2: the lowest label (0) gives way
    assert buf.counts() == {0: 1, 1: 2, 2: 1, 3: 1}
    for labels in ([4, 4, 4], [0, 1, 2, 3, 4]):
        t = _offer(buf, labels, t)
        c = list(buf.counts().values())
        assert sum(c) == 5 and max(c) - min(c) <= 1


def test_greedy_sampler_state_round_trip_and_batch_equals_one_by_one():
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    labels = [0, 1, 0, 2, 2, 1, 3, 3, 0, 1, 2, 3]
    a, b = GreedyClassBalancedBuffer(5), GreedyClassBalancedBuffer(5)
    _offer(a, labels, 0, gen_a)
    for i, c in enumerate(labels):
        _offer(b, [c], i, gen_b)
    assert torch.equal(a.items()[0], b.items()[0]) and torch.equal(a.items()[1], b.items()[1])
    c = GreedyClassBalancedBuffer(5)
    c.load_state(copy.deepcopy(a.state()))
    assert torch.equal(c.items()[0], a.items()[0]) and c.counts() == a.counts()


def test_cutmix_pastes_a_box_and_returns_its_pixel_share():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    y = torch.tensor([0, 1])
    same = cutmix(x, y, 1.0, 0.0, np.random.default_rng(0))
    assert same[0] is x and same[3] == 1.0
    rng = np.random.default_rng(1)
    out, ya, yb, lam = cutmix(x, y, 1.0, 1.0, rng, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(128, dtype=torch.float32).view(2, 1, 8, 8))  # the input is untouched
    moved = (out != x)
    partner = {0: int(yb[0]), 1: int(yb[1])}
    for i in range(2):
        if partner[i] != i:  # pixels moved form the box, copied from the partner
            assert torch.equal(out[i][moved[i]], x[partner[i]][moved[i]])
            assert lam == pytest.approx(1 - moved[i].sum().item() / 64)
    assert torch.equal(ya, y)


def _strategy(seed=0, **hp):
    kw = dict(buffer_size=8, epochs=3, batch_size=4)
    kw.update(hp)
    return strategies.create("gdumb", make_tiny(num_classes=4), seed=seed, **kw)


def _run(seed=0, **hp):
    s = _strategy(seed, **hp)
    res = ctta.run(two_session_stream(lambda c, n_per=12, seed=0: quadrant_data(c, n_per, seed), n_eval=6), s,
                   device="cpu", progress=False)
    return s, res


def test_retraining_starts_from_the_same_initial_weights_each_session():
    s = _strategy()
    init = copy.deepcopy(s.model.state_dict())
    starts, lrs, original = [], [], s.step

    def spy(x, y, gen):
        if not lrs or s.optimizer is not starts[-1][1]:
            starts.append(({k: v.clone() for k, v in s.model.state_dict().items()}, s.optimizer))
        lrs.append(s.optimizer.param_groups[0]["lr"])
        return original(x, y, gen)

    s.step = spy
    ctta.run(two_session_stream(lambda c, n_per=12, seed=0: quadrant_data(c, n_per, seed), n_eval=6), s,
             device="cpu", progress=False)
    assert len(starts) == 2  # one retraining per session end
    for weights, _ in starts:
        assert all(torch.equal(weights[k], init[k]) for k in init)  # BatchNorm statistics included
    assert not torch.equal(s.model.fc.weight, init["fc.weight"])
    top = 0.05  # per epoch (8 samples / batch 4 = 2 steps): warm-up, maxlr, the first restart (maxlr again)
    assert lrs[:6] == pytest.approx([lr for lr in [0.1 * top, top, top] for _ in range(2)])


def test_a_longer_schedule_restarts_as_the_warm_restarts_do():
    s = _strategy(epochs=7, buffer_size=4)
    lrs, original = [], s.step
    s.step = lambda x, y, gen: (lrs.append(s.optimizer.param_groups[0]["lr"]), original(x, y, gen))
    s.learn(*quadrant_data([0, 1], 2, 0))
    s.close_session()
    eta, top = 5e-4, 0.05
    cos = lambda t, T: eta + (top - eta) * (1 + math.cos(math.pi * t / T)) / 2  # noqa: E731
    assert lrs == pytest.approx([0.1 * top, top, top, cos(1, 2), top, cos(1, 4), cos(2, 4)])


def test_stores_only_while_batches_arrive():
    s = _strategy()
    before = copy.deepcopy(s.model.state_dict())
    x, y = quadrant_data([0, 1], 6, 0)
    s.learn(x, y)
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
    assert s.buffer.counts() == {0: 4, 1: 4}


def test_deterministic_under_a_seed_and_engine_run():
    (a, res), (b, _) = _run(0), _run(0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a.buffer.items()[0], b.buffer.items()[0])
    assert a.buffer.counts() == {0: 2, 1: 2, 2: 2, 3: 2}
    c, _ = _run(1)
    assert not torch.equal(c.model.fc.weight, a.model.fc.weight)
    assert res is not None


def test_reset_and_resume_restore_the_state():
    s, _ = _run(0)
    fresh = _strategy()
    fresh.load_checkpoint_state(copy.deepcopy(s.checkpoint_state()))
    assert torch.equal(fresh.buffer.items()[0], s.buffer.items()[0])
    probe = quadrant_data([0, 1, 2, 3], 3, 7)[0]
    assert torch.equal(fresh.predict(probe), s.predict(probe))
    s.reset()
    assert len(s.buffer) == 0
    init = make_tiny(num_classes=4).state_dict()
    assert all(torch.equal(v, init[k]) for k, v in s.model.state_dict().items())


def test_reservoir_sampler_option_uses_the_reservoir():
    s = _strategy(sampler="reservoir")
    s.learn(*quadrant_data([0, 1], 12, 0))
    assert len(s.buffer) == 8 and s.buffer.seen == 24
