"""AaD: the bank's kNN picks exactly k known neighbours, slots follow samples across epochs, the loss terms and
schedules match the official code's formulas, runs are deterministic, and a 2-epoch SFDA run works on the CPU."""
from __future__ import annotations

import pytest
import torch

import ctta
from conftest import make_tiny
from ctta.backbones.classifier import features_and_logits
from ctta.errors import ConfigError, UnsupportedError
from ctta.streams import create as make_stream
from ctta.streams.base import from_batches
from ctta.strategies import create
from ctta.strategies.common.banks import SampleBank, batch_dispersion, decay, knn_indices, neighbour_attraction


pytestmark = pytest.mark.usefixtures("one_thread")


def test_knn_on_a_hand_made_bank_picks_exactly_k_known_neighbours():
    # bank rows on the unit circle at angles 0, 10, 20, ..., 90 degrees; slot 9 not filled yet
    angles = torch.deg2rad(torch.arange(0, 100, 10).float())
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)
    valid = torch.arange(10) < 9
    query = bank[[0, 4]]  # the samples in slots 0 and 4
    index, mask = knn_indices(query, bank, k=3, valid=valid, exclude=torch.tensor([0, 4]))
    assert index.shape == (2, 3) and bool(mask.all())
    assert set(index[0].tolist()) == {1, 2, 3}          # its own slot 0 excluded
    assert set(index[1].tolist()) == {3, 5} | {index[1, 2].item()} and index[1, 2].item() in (2, 6)
    # fewer usable rows than k: the extra picks are masked out
    index, mask = knn_indices(query[:1], bank, k=3, valid=torch.arange(10) < 3, exclude=torch.tensor([0]))
    assert mask.tolist() == [[True, True, False]]


def test_attraction_uses_the_k_bank_neighbours_scores():
    bank = SampleBank()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    slot = bank.slots(x)
    assert slot.tolist() == list(range(6))
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0.8, 0.3], [0, 1], [0.1, 0.9],
                                                        [-1, 0]]), dim=1)
    scores = torch.eye(6)[:, :4].roll(1, 0).softmax(1)
    bank.write("features", slot, feats)
    bank.write("scores", slot, scores)
    index, mask = bank.neighbours(feats[:1], slot[:1], k=2)
    assert sorted(index[0].tolist()) == [1, 2] and bool(mask.all())
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    expected = -(p[0] @ scores[1] + p[0] @ scores[2])
    assert torch.allclose(neighbour_attraction(p, bank.table("scores")[index], mask), expected)
    # the strategy's own look-up during adapt: k columns, never the sample's own slot
    st = create("aad", make_tiny(num_classes=4), k=3, max_iter=10)
    seen = []
    original = st.bank.neighbours

    def spy(f, s, k, table="features"):
        out = original(f, s, k, table)
        seen.append((s.clone(), out[0].clone()))
        return out

    st.bank.neighbours = spy
    st.adapt(torch.rand(8, 3, 8, 8))
    s, idx = seen[0]
    assert idx.shape == (8, 3) and not bool((idx == s.view(-1, 1)).any())


def test_slots_follow_the_samples_across_reshuffled_epochs_and_the_bank_grows():
    bank = SampleBank(min_capacity=8)
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first = torch.cat([bank.slots(x[i:i + 8]) for i in range(0, 40, 8)])
    assert first.tolist() == list(range(40)) and bank.capacity >= 40
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    again = torch.cat([bank.slots(x[perm][i:i + 8]) for i in range(0, 40, 8)])
    assert torch.equal(again, perm) and int(bank.count) == 40
    # a bank loaded from a checkpoint takes the saved size (and an empty one shrinks back)
    empty = SampleBank(min_capacity=8).state_dict()
    bank.load_state_dict(empty)
    assert bank.capacity == 0 and int(bank.count) == 0


def test_dispersion_and_schedules_match_the_formulas():
    p = torch.rand(5, 3).softmax(1)
    brute = sum(float(p[i] @ p[j]) for i in range(5) for j in range(5) if i != j) / 5
    assert abs(float(batch_dispersion(p)) - brute) < 1e-6
    assert decay(0, 100, 5.0) == 1.0 and abs(decay(50, 100, 5.0) - 6.0 ** -5) < 1e-12
    assert decay(7, None, 5.0) == 1.0
    st = create("aad", make_tiny(num_classes=4), max_iter=10, lr=0.01)
    for _ in range(3):
        st.adapt(torch.rand(8, 3, 8, 8))
    lrs = sorted(g["lr"] for g in st.optimizer.param_groups)
    scale = (1 + 10 * 3 / 10) ** -0.75
    assert lrs == pytest.approx([0.001 * scale, 0.01 * scale])   # backbone 0.1 x lr, classifier 1 x lr
    assert st.dispersion_weight() == pytest.approx((1 + 10 * 3 / 10) ** -5.0)


def _stream(n: int = 96, epochs: int = 2):
    return make_stream("sfda", num_samples=n, epochs=epochs, batch_size=32)


def test_two_epoch_sfda_run_deterministic_and_resettable():
    stream = _stream()
    runs = []
    for _ in range(2):
        st = create("aad", make_tiny(seed=3, num_classes=10), max_iter=6)
        result = ctta.run(stream, st, device="cpu", progress=False)
        runs.append((result, st))
    (r1, s1), (r2, s2) = runs
    assert list(r1.segments["segment"]) == ["target/epoch-0", "target/epoch-1", "target/eval"]
    assert int(s1.bank.count) == 96 and s1.iteration == 6
    assert r1.steps.equals(r2.steps)
    assert all(torch.equal(a, b) for a, b in zip(s1.state_dict().values(), s2.state_dict().values()))
    before = make_tiny(seed=3, num_classes=10).state_dict()
    s1.reset()
    assert s1.iteration == 0 and int(s1.bank.count) == 0
    assert all(torch.equal(before[k], v) for k, v in s1.model.state_dict().items())


def test_settings_and_bad_options():
    with pytest.raises(UnsupportedError, match="sfda"):
        ctta.run(from_batches([(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]),
                 create("aad", make_tiny()), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="hyperparameter k=0"):
        create("aad", make_tiny(), k=0)
    with pytest.raises(ConfigError, match="unknown hyperparameter|max_iter"):
        create("aad", make_tiny(), max_iter=0)


@pytest.mark.parametrize("n", [96, 97])  # 97: each epoch ends on a batch of one sample, which only predicts
def test_schedule_length_is_read_from_the_stream_and_reaches_its_final_values(n):
    st = create("aad", make_tiny(seed=3, num_classes=10), lr=0.01)  # max_iter: null (the config's default)
    assert st.max_iter is None
    seen = []
    adapt = st.adapt

    def spy(x):
        weight = st.dispersion_weight()
        out = adapt(x)
        if x.shape[0] > 1:
            seen.append((weight, sorted(g["lr"] for g in st.optimizer.param_groups)))
        return out

    st.adapt = spy
    ctta.run(_stream(n=n, epochs=2), st, device="cpu", progress=False)
    max_iter = 2 * 3  # 2 epochs x 3 updating batches of 32
    assert st.max_iter == max_iter and st.iteration == max_iter and len(seen) == max_iter
    # official loop: lambda from iter_num before its increment (0 .. max_iter - 1), lr after it (1 .. max_iter)
    for it, (weight, lrs) in enumerate(seen):
        assert weight == pytest.approx((1 + 10 * it / max_iter) ** -5.0)
        assert lrs == pytest.approx([0.001 * (1 + 10 * (it + 1) / max_iter) ** -0.75,
                                     0.01 * (1 + 10 * (it + 1) / max_iter) ** -0.75])
    assert seen[-1][1][1] == pytest.approx(0.01 * 11 ** -0.75)          # lr at it = max_iter
    assert st.dispersion_weight() == pytest.approx(11 ** -5.0)        # lambda at it = max_iter
    # an explicit max_iter wins; a reset re-reads the stream; the inferred length is carried across a resume
    assert create("aad", make_tiny(num_classes=10), max_iter=50).max_iter == 50
    state = st.checkpoint_state()
    st.reset()
    assert st.max_iter is None and st.iteration == 0
    st.load_checkpoint_state(state)
    assert st.max_iter == max_iter and st.iteration == max_iter


def test_source_bank_init_fills_every_target_sample_with_the_source_model_before_adapting():
    """bank_init: source (the official code's start): before the first step the bank holds every target sample's
    normalised eval-mode features and softmax scores of the source model; the first step's neighbours then come from
    the whole target set (lazy: only from the batch itself)."""
    stream = _stream(n=64, epochs=2)
    seg = stream.segments[0]
    model = make_tiny(seed=3, num_classes=10)
    st = create("aad", model)  # bank_init: source is the default (the official start)
    assert st.bank_init == "source"
    st.segment_start(seg)
    assert int(st.bank.count) == 64 and st.max_iter == 4
    x, _, _ = seg.materialise(torch.device("cpu"))
    ref = make_tiny(seed=3, num_classes=10).eval()
    with torch.no_grad():
        f, logits = features_and_logits(ref, x)
    slot = st.bank.slots(x)
    assert int(st.bank.count) == 64  # the same samples: no new slots
    assert torch.allclose(st.bank.table("features")[slot], torch.nn.functional.normalize(f.flatten(1), dim=1),
                          atol=1e-6)
    assert torch.allclose(st.bank.table("scores")[slot], logits.softmax(1), atol=1e-6)
    st.segment_start(stream.segments[1])  # a later epoch does not refill
    lazy = create("aad", make_tiny(seed=3, num_classes=10), bank_init="lazy")
    lazy.segment_start(seg)
    assert int(lazy.bank.count) == 0
    with pytest.raises(ConfigError):
        create("aad", make_tiny(), bank_init="target")
