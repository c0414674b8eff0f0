"""AdaContrast: the soft k-NN vote on a hand-made bank, the FIFO key queue, the EMA key encoder, what is adapted,
reset and determinism (the reference's formulas: mariodoebler/test-time-adaptation@8b2ed63 methods/adacontrast.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from ctta.strategies import create
from ctta.strategies.adacontrast import class_aware_infonce, diversity, soft_knn_vote

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_refined_label_is_the_soft_knn_vote_on_a_hand_made_bank():
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 20.0, 90.0, 100.0]))
    bank = torch.stack([angles.cos(), angles.sin()], 1) * torch.tensor([[1.0], [3.0], [0.5], [2.0], [1.0]])
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.0, 0.0, 1.0], [0.0, 0.1, 0.9]])
    query = torch.tensor([[1.0, 0.05], [0.0, 5.0]])  # near 0-20 degrees; near 90-100 degrees
    labels, voted = soft_knn_vote(query, bank, probs, k=3)
    assert torch.allclose(voted[0], probs[:3].mean(0))  # cosine: the scale of the rows does not matter
    assert torch.allclose(voted[1], probs[[3, 4, 2]].mean(0))
    assert labels.tolist() == [0, 2]


def test_infonce_masks_same_label_negatives_and_diversity_is_negative_entropy():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    loss = class_aware_infonce(logits, torch.tensor([1]), torch.tensor([1, 0, 1]))
    assert torch.allclose(loss, -torch.log_softmax(torch.tensor([1.0, 3.0]), 0)[0])
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    p = z.softmax(1).mean(0)
    assert torch.allclose(diversity(z), (p * torch.log(p + 1e-8)).sum())


def test_queue_is_fifo_of_the_configured_size():
    s = create("adacontrast", make_tiny(), queue_size=12, seed=0)
    assert s.queue_feats.shape == (8, 12) and torch.allclose(s.queue_feats.norm(dim=0), torch.ones(12))
    for step in range(4):  # 4 x 5 keys through a queue of 12: positions wrap around
        keys, labels = torch.full((5, 8), float(step)), torch.full((5,), step)
        s.enqueue(keys, labels)
    assert s.queue_labels.tolist() == [2, 2, 2, 3, 3, 3, 3, 3, 1, 1, 2, 2]  # 0-4, 5-9, 10-11+0-2, 3-7
    assert int(s.queue_ptr) == 20 % 12
    assert torch.equal(s.queue_feats[:, 3:8], torch.full((8, 5), 3.0))


def test_key_encoder_is_the_ema_of_the_query_encoder_and_all_parameters_adapt():
    s = create("adacontrast", make_tiny(), queue_size=16, ema_momentum=0.9, seed=0)
    before_q = [p.detach().clone() for p in s.model.parameters()]
    before_k = [p.detach().clone() for p in s.key_encoder.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before_q, before_k))
    s.adapt(_x())
    # the key encoder moved once, towards the query encoder as it was before the step (the code's order)
    for k0, q0, k1 in zip(before_k, before_q, s.key_encoder.parameters()):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q0)
    assert all(not p.requires_grad for p in s.key_encoder.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(before_q, s.model.parameters())]
    assert all(changed)  # every parameter of the query encoder is adapted, as the reference
    assert s.bank_feats.shape == (8, 8) and s.bank_probs.shape == (8, 4)
    assert torch.allclose(s.bank_probs.sum(1), torch.ones(8))


def test_pseudo_labels_use_argmax_first_then_the_bank_vote():
    s = create("adacontrast", make_tiny(), queue_size=64, refine_after=8, seed=0)
    s.adapt(_x(8, 1))
    assert int(s.seen) == 8
    feats, logits = torch.randn(3, 8), torch.randn(3, 4)
    assert torch.equal(s.pseudo_labels(feats, logits), soft_knn_vote(feats, s.bank_feats, s.bank_probs, 10)[0])
    assert int(s.seen) == 8


def test_reset_restores_and_runs_are_deterministic_under_a_seed():
    def run(seed):
        s = create("adacontrast", make_tiny(), queue_size=16, seed=seed)
        outs = [s.adapt(_x(8, i)) for i in range(3)]
        return s, outs

    s, outs = run(3)
    _, again = run(3)
    _, other = run(4)
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    assert not all(torch.equal(a, b) for a, b in zip(outs, other))
    fresh = create("adacontrast", make_tiny(), queue_size=16, seed=3)
    s.reset()
    assert s.bank_feats.shape[0] == 0 and int(s.queue_ptr) == 0 and int(s.seen) == 0
    for (name, a), b in zip(s.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(s.adapt(_x(8, 0)), outs[0])


def test_views_are_drawn_per_image_and_stay_in_range():
    s = create("adacontrast", make_tiny(), queue_size=16, seed=0)
    x = _x(64)
    weak, q, k = s.views(x)
    flipped = torch.tensor([torch.equal(w, xi.flip(-1)) for w, xi in zip(weak, x)])
    same = torch.tensor([torch.equal(w, xi) for w, xi in zip(weak, x)])
    assert bool((flipped | same).all()) and 10 < int(flipped.sum()) < 54
    assert not torch.equal(q, k) and float(q.min()) >= 0 and float(q.max()) <= 1
