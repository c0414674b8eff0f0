"""NOTE and its PBRS memory: the reservoir rule against a plain-list version drawing the same numbers, capacity and
class balance on a correlated stream, what NOTE updates (norm affines and BN running statistics by momentum from the
memory batch), the prediction made with learned statistics before the update, reset, checkpoint and determinism."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from ctta import strategies
from ctta.strategies.common.pbrs import PBRS
from ctta.strategies.note import tempered_entropy

from conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_pbrs(labels, capacity, num_classes, seed):
    """The paper's rule on lists of sample ids (the same random calls in the same order)."""
    rng = random.Random(seed)
    data = [[] for _ in range(num_classes)]
    counter = [0] * num_classes
    for i, c in enumerate(labels):
        counter[c] += 1
        if sum(map(len, data)) < capacity:
            data[c].append(i)
            continue
        sizes = [len(d) for d in data]
        largest = [k for k, n in enumerate(sizes) if n == max(sizes)]
        if c not in largest:
            victim = rng.choice(largest)
            data[victim].pop(rng.randrange(0, len(data[victim])))
            data[c].append(i)
        elif rng.uniform(0, 1) <= sizes[c] / counter[c]:
            data[c].pop(rng.randrange(0, len(data[c])))
            data[c].append(i)
    return data


def test_pbrs_keeps_what_the_rule_keeps_and_reads_out_class_by_class():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g).tolist()
    labels[50:120] = [2] * 70  # a long single-class run: temporal correlation
    images = torch.arange(200, dtype=torch.float32).view(200, 1, 1, 1)  # image i holds the value i
    mem = PBRS(capacity=12, num_classes=4, seed=7)
    for i in range(0, 200, 16):
        mem.add(images[i:i + 16], labels[i:i + 16])
    want = plain_pbrs(labels, 12, 4, seed=7)
    assert mem.per_class() == [len(d) for d in want]
    assert mem.images().flatten().long().tolist() == [i for d in want for i in d]
    assert mem.occupancy() == 12 and max(mem.per_class()) - min(mem.per_class()) <= 1


def test_pbrs_balances_a_correlated_stream_that_plain_reservoir_would_not():
    mem = PBRS(capacity=20, num_classes=5, seed=0)
    x = torch.zeros(10, 1, 1, 1)
    for c in [0] * 30 + [1, 2, 3, 4] * 5 + [0] * 30:  # class 0 is 60 of 80 samples
        mem.add(x[:1], [c])
    assert mem.per_class() == [4, 4, 4, 4, 4]


def test_tempered_entropy_by_hand():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = F.softmax(logits / 2.0, dim=1)
    want = (-(p * torch.log(p + 1e-6))).sum() / 6
    torch.testing.assert_close(tempered_entropy(logits, 2.0), want)


def test_note_predicts_with_learned_statistics_then_adapts_affines_and_running_stats(images):
    model = make_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model.eval()(images)
    s = strategies.create("note", model, memory_size=64, lr=0.1)
    out = s.adapt(images)
    torch.testing.assert_close(out, expected)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= {k for k in before if k.startswith(("bn1.", "bn2."))}
    assert {"bn1.weight", "bn1.bias", "bn1.running_mean"} <= changed
    assert not any(k.startswith(("conv", "fc")) for k in changed)
    # the running mean moved by momentum 0.01 towards the memory batch's (here: all 16 images)
    with torch.no_grad():
        h = model.conv1(images)
    batch_mean = h.mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, 0.99 * before["bn1.running_mean"] + 0.01 * batch_mean,
                               rtol=1e-4, atol=1e-6)


def test_note_reset_checkpoint_and_determinism(images):
    a = strategies.create("note", make_tiny(), memory_size=8, lr=0.05, seed=3)
    b = strategies.create("note", make_tiny(), memory_size=8, lr=0.05, seed=3)
    first = a.adapt(images)
    assert torch.equal(first, b.adapt(images))
    state = copy.deepcopy(a.checkpoint_state())  # as written to disk
    x2 = images.flip(0)
    out2 = a.adapt(x2)
    c = strategies.create("note", make_tiny(), memory_size=8, lr=0.05, seed=3)
    c.load_checkpoint_state(state)
    torch.testing.assert_close(c.adapt(x2), out2)
    assert c.memory.per_class() == a.memory.per_class()
    a.reset()
    assert a.memory.occupancy() == 0
    torch.testing.assert_close(a.adapt(images), first)
