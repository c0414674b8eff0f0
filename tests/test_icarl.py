"""iCaRL: herding's greedy order on a hand-made set, the nearest-mean classifier, class-balanced exemplars with old
classes cut to their prefix, every exemplar replayed once per epoch, the BCE-with-distillation step against a hand
computation, determinism and reset."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ctta
from conftest import make_tiny, quadrant_data, two_session_stream
from ctta import strategies
from ctta.streams.base import tensor_segment
from ctta.strategies.common.exemplars import ExemplarSet, herding_order
from ctta.strategies.common.prototypes import nearest_mean_logits

CPU = torch.device("cpu")


def _segment(classes, seed, n_per=12, batch=8):
    x, y = quadrant_data(classes, n_per, seed)
    return tensor_segment(f"session-{seed}", "train", x, y, batch, role="session", meta={"classes": classes})


def _session(s, seg):
    s.segment_start(seg)
    for x, y in seg.batches(CPU):
        s.learn(x, y)
    s.segment_end(seg)


def _after_first_session(buffer_size=8, **hp):
    torch.manual_seed(0)
    s = strategies.create("icarl", make_tiny(num_classes=4), buffer_size=buffer_size, **hp)
    first = _segment([0, 1], 0)
    _session(s, first)
    return s, first


def test_herding_picks_the_greedy_mean_matching_order_not_the_nearest_to_the_mean():
    f = torch.tensor([[0.0], [1.0], [2.5], [6.0]])  # mean 2.375
    # i=1: |2.375 - x| -> 2.5; i=2: |2.375 - (x + 2.5) / 2| -> 1; i=3: |2.375 - (x + 3.5) / 3| -> 6; then 0
    assert herding_order(f, 4).tolist() == [2, 1, 3, 0]
    assert herding_order(f, 2).tolist() == [2, 1]  # a prefix of the full order
    assert torch.argsort((f - f.mean()).abs().squeeze(1)).tolist() == [2, 1, 0, 3]  # what ranking would give
    assert herding_order(f, 9).tolist() == [2, 1, 3, 0]  # never more than the class holds


def test_nearest_mean_predicts_the_closest_normalised_class_mean():
    means = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), dim=1)
    feats = torch.tensor([[3.0, 0.5], [0.1, 2.0], [-5.0, -4.0], [2.0, 2.1]])
    z = nearest_mean_logits(feats, means)
    f = F.normalize(feats, dim=1)
    assert torch.allclose(z, -torch.cdist(f, means).pow(2), atol=1e-6)
    assert z.argmax(1).tolist() == [0, 1, 2, 1]
    assert z.argmax(1).tolist() == nearest_mean_logits(10 * feats, means).argmax(1).tolist()  # scale-free


def test_exemplar_set_reduce_keeps_each_class_prefix():
    e = ExemplarSet()
    e.add(torch.arange(6.0).view(6, 1), torch.tensor([1, 1, 1, 0, 0, 0]))
    e.reduce(2)
    x, y = e.items()
    assert y.tolist() == [0, 0, 1, 1] and x.squeeze(1).tolist() == [3.0, 4.0, 0.0, 1.0]


def test_first_session_herds_balanced_exemplars_and_the_means_are_of_their_normalised_features():
    s, first = _after_first_session(buffer_size=8)
    ex, ey = s.exemplars.items()
    assert ey.tolist() == [0] * 4 + [1] * 4  # buffer 8 // 2 seen classes
    x, y = first.materialise(CPU)[:2]
    s.model.eval()
    with torch.no_grad():
        f = F.normalize(s.model.forward_features(x), dim=1)
        for c in (0, 1):
            idx = (y == c).nonzero().squeeze(1)
            assert torch.equal(ex[ey == c], x[idx[herding_order(f[idx], 4)]])
            fc = F.normalize(s.model.forward_features(ex[ey == c]), dim=1).mean(0)
            ff = F.normalize(s.model.forward_features(ex[ey == c].flip(-1)), dim=1).mean(0)
            assert torch.allclose(s.means[c], F.normalize((fc + ff) / 2, dim=0), atol=1e-6)
        probe = quadrant_data([0, 1], 4, 5)[0]
        z = s.predict(probe)
        pf = F.normalize(s.model.forward_features(probe), dim=1)
    assert torch.isinf(z[:, 2:]).all()
    assert torch.equal(z.argmax(1), torch.cdist(pf, s.means[:2]).argmin(1))


def test_second_session_replays_every_exemplar_once_per_epoch_and_cuts_old_classes_to_their_prefix():
    s, _ = _after_first_session(buffer_size=8)
    old_x, old_y = (t.clone() for t in s.exemplars.items())
    second = _segment([2, 3], 1)  # 24 samples, batches of 8: 3 batches, 8 exemplars -> 2, 3, 3 per batch
    seen, plain = [], s.training_batch
    s.training_batch = lambda x, y: seen.append(plain(x, y)) or seen[-1]
    _session(s, second)
    sizes = [len(yb) for _, yb in seen]
    assert sizes == [8 + 2, 8 + 3, 8 + 3]
    replayed = torch.cat([xb[8:] for xb, _ in seen])
    assert sorted(map(tuple, replayed.flatten(1).tolist())) == sorted(map(tuple, old_x.flatten(1).tolist()))
    ex, ey = s.exemplars.items()
    assert ey.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # 8 // 4 per class
    for c in (0, 1):
        assert torch.equal(ex[ey == c], old_x[old_y == c][:2])


def test_step_is_the_bce_with_distillation_on_old_classes_plus_the_weight_penalty():
    s, _ = _after_first_session(buffer_size=8, l2=1e-3)
    second = _segment([2, 3], 1)
    s.segment_start(second)
    x, y = next(iter(second.batches(CPU)))
    s.sessions.on_learn()
    s.begin_session(s.sessions.session)
    s.seen.update(y)
    state = copy.deepcopy(s.checkpoint_state())
    xb, yb = s.training_batch(x, y)
    manual = copy.deepcopy(s.model).train()
    with torch.no_grad():
        prev = torch.sigmoid(s.teacher.eval()(xb))
    target = F.one_hot(yb, 4).float()
    target[:, :2] = prev[:, :2]  # old classes: the previous model's sigmoids; new ones one-hot
    loss = F.binary_cross_entropy_with_logits(manual(xb), target)
    loss = loss + 1e-3 * sum(p.pow(2).sum() for p in manual.parameters())
    loss.backward()
    with torch.no_grad():
        for p in manual.parameters():
            p -= 0.1 * p.grad
    s.load_checkpoint_state(state)
    s.training_batch = lambda a, b: (xb, yb)
    s.learn_batch(x, y)
    for (k, p), q in zip(s.model.named_parameters(), manual.parameters()):
        assert torch.allclose(p, q, atol=1e-6), k
    assert not torch.equal(s.teacher.fc.weight, s.model.fc.weight)


def _run(seed):
    s = strategies.create("icarl", make_tiny(num_classes=4), seed=seed, buffer_size=8)
    ctta.run(two_session_stream(lambda c, n_per=12, seed=0: quadrant_data(c, n_per, seed), n_eval=6), s,
             device="cpu", progress=False)
    return s


def test_deterministic_and_runs_a_two_session_stream():
    a, b = _run(0), _run(0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a.exemplars.items()[0], b.exemplars.items()[0])
    assert a.exemplars.counts(4).tolist() == [2, 2, 2, 2] and a.has_mean.all()


def test_reset_and_resume_restore_the_state():
    s = _run(0)
    fresh = strategies.create("icarl", make_tiny(num_classes=4), buffer_size=8)
    fresh.load_checkpoint_state(copy.deepcopy(s.checkpoint_state()))
    assert torch.equal(fresh.exemplars.items()[0], s.exemplars.items()[0]) and torch.equal(fresh.means, s.means)
    probe = quadrant_data([0, 1, 2, 3], 3, 7)[0]
    assert torch.equal(fresh.predict(probe), s.predict(probe))
    s.reset()
    assert len(s.exemplars) == 0 and not s.has_mean.any()
    init = make_tiny(num_classes=4).state_dict()
    assert all(torch.equal(v, init[k]) for k, v in s.model.state_dict().items())


def test_refuses_a_model_without_features():
    with pytest.raises(ctta.errors.UnsupportedError):
        strategies.create("icarl", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)))
