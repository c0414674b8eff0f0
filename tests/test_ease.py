"""EASE: a new adapter per session (earlier ones and the backbone frozen), prototypes in every subspace, the
semantic-guided complement of old classes' prototypes in new subspaces, and the reweighted cosine ensemble."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import ctta
from conftest import stripe_data, tiny_vit, two_session_stream
from ctta import strategies
from strategies.ease import complement_prototypes, reweighted_logits


def _vit(num_classes: int = 6):
    return tiny_vit(num_classes)


def _data(classes, seed=0, n_per=8):
    return stripe_data(classes, n_per, seed, size=16)


def _ease(**hp):
    return strategies.create("ease", _vit(), **{"lr": 0.5, **hp})


def _session(s, classes, seed, batch=8, epochs=1):
    x, y = _data(classes, seed)
    s.segment_start(SimpleNamespace(kind="train", num_samples=epochs * len(y), meta={"epochs": epochs,
                                                                                    "classes": classes}))
    for _ in range(epochs):
        for i in range(0, len(y), batch):
            s.learn(x[i:i + batch], y[i:i + batch])
    s.close_session()
    return x, y


def _adapter_state(s, k):
    return [{n: p.detach().clone() for n, p in st.adapters[k].named_parameters()} for st in s.sets]


def test_previous_adapters_never_change_and_the_new_one_trains():
    torch.manual_seed(1)
    s = _ease()
    _session(s, [0, 1], 0)
    a0 = _adapter_state(s, 0)
    assert any(not torch.equal(d["up.weight"], torch.zeros_like(d["up.weight"])) for d in a0)  # trained
    _session(s, [2, 3], 1, epochs=2)
    s.predict(_data([0, 1, 2, 3], 5)[0])
    assert s.num_subspaces == 2
    for before, st in zip(a0, s.sets):
        for n, p in st.adapters[0].named_parameters():
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(st.adapters[1].up.weight, torch.zeros_like(st.adapters[1].up.weight)) for st in s.sets)
    assert not any(p.requires_grad for p in s.model.parameters())  # after a session nothing of the model trains


def test_backbone_never_changes():
    torch.manual_seed(1)
    s = _ease()
    plain = {n: p.detach().clone() for n, p in _vit().named_parameters()}
    x, _ = _session(s, [0, 1], 0)
    torch.testing.assert_close(s.subspace_features(x, None), _vit().forward_features(x))  # no adapter: pretrained
    _session(s, [2, 3], 1)
    for n, p in s.model.named_parameters():
        if ".adapters." in n:
            continue
        key = n.replace(".mlp.base.0.", ".norm2.").replace(".mlp.base.1.", ".mlp.")  # the moved norm2 / mlp
        assert torch.equal(p, plain[key]), n
    # a new adapter starts as the pretrained model (zero up-projection)
    t = _ease()
    torch.testing.assert_close(t.subspace_features(x, 0), _vit().forward_features(x))


def test_feature_dimension_grows_by_one_subspace_per_session():
    s = _ease()
    x, _ = _data([0, 1], 3)
    d = s.dim
    for k, classes in enumerate([[0, 1], [2, 3], [4, 5]]):
        _session(s, classes, k)
        assert s.num_subspaces == k + 1 and s.protos.shape == (k + 1, 6, d)
        f = s.features(x)
        assert f.shape == (len(x), (k + 1) * d)
        torch.testing.assert_close(f[:, k * d:], s.subspace_features(x, k))
    assert s.owner.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.real.tolist() == [[True] * 6, [False, False, True, True, True, True], [False] * 4 + [True, True]]


def _reference_complement(protos, real, owner, recalc):
    """PILOT's solve_sim_reset / solve_similarity loops, written element by element."""
    out = protos.clone()
    k = protos.shape[0]
    for s in range(k - 1):
        old = (owner == s).nonzero().flatten().tolist()
        for j in (range(s + 1, k) if recalc else [k - 1]):
            co = (real[s] & real[j]).nonzero().flatten().tolist()
            sim = torch.zeros(len(old), len(co))
            for a, o in enumerate(old):
                for b, n in enumerate(co):
                    sim[a, b] = torch.cosine_similarity(protos[s, o], protos[s, n], dim=0)
            sim = F.softmax(sim, dim=1)
            for a, o in enumerate(old):
                out[j, o] = sum(sim[a, b] * protos[j, n] for b, n in enumerate(co))
    return out


def test_prototype_complement_equals_its_formula_on_a_hand_made_case():
    # 3 sessions of 2 classes, D = 2; real prototypes: class c of session s in subspaces 0..s
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    real = torch.arange(3).unsqueeze(1) <= owner.unsqueeze(0)
    protos = torch.zeros(3, 6, 2)
    protos[0] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [1.0, 0.2], [-1.0, 1.0]])
    protos[1, 2:] = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 2.0], [2.0, 1.0]])
    protos[2, 4:] = torch.tensor([[5.0, 5.0], [-5.0, 5.0]])
    out = complement_prototypes(protos, real, owner, recalc=True)
    # class 0 in subspace 1: similarity to classes 2..5 (real in subspaces 0 and 1), measured in subspace 0
    w = torch.softmax(torch.tensor([1 / 2 ** 0.5, 2 / 5 ** 0.5, 1 / 1.04 ** 0.5, -1 / 2 ** 0.5]), 0)
    torch.testing.assert_close(out[1, 0], w @ protos[1, 2:])
    # class 2 (session 1) in subspace 2: classes 4, 5, similarity in its own subspace 1
    w2 = torch.softmax(torch.tensor([1 / 5 ** 0.5, 2 / 5 ** 0.5]), 0)
    torch.testing.assert_close(out[2, 2], w2 @ protos[2, 4:])
    torch.testing.assert_close(out, _reference_complement(protos, real, owner, True))
    assert torch.equal(out[real], protos[real])  # data prototypes untouched
    # recalc_sim false: only the newest subspace, from the new classes; earlier entries kept
    once = complement_prototypes(protos, real, owner, recalc=False)
    torch.testing.assert_close(once, _reference_complement(protos, real, owner, False))
    assert torch.equal(once[1, :2], protos[1, :2])


def test_strategy_prototypes_are_class_means_and_complemented():
    s = _ease()
    x0, y0 = _session(s, [0, 1], 0)
    x1, y1 = _session(s, [2, 3], 1)
    for k in range(2):
        f = s.subspace_features(x1, k)
        for c in (2, 3):
            torch.testing.assert_close(s.protos[k, c], f[y1 == c].mean(0))
    f0 = s.subspace_features(x0, 0)
    torch.testing.assert_close(s.protos[0, 0], f0[y0 == 0].mean(0))
    sim = F.normalize(s.protos[0, :2], dim=1) @ F.normalize(s.protos[0, 2:4], dim=1).T
    torch.testing.assert_close(s.protos[1, :2], sim.softmax(1) @ s.protos[1, 2:4])


def test_prediction_is_the_reweighted_cosine_ensemble():
    s = _ease(alpha=0.3)
    for k, classes in enumerate([[0, 1], [2, 3], [4, 5]]):
        _session(s, classes, k)
    x, _ = _data([0, 3, 5], 7, n_per=2)
    cos = [F.normalize(s.subspace_features(x, k), dim=1) @ F.normalize(s.protos[k], dim=1).T for k in range(3)]
    expected = torch.zeros(len(x), 6)
    for c in range(6):
        own = c // 2
        expected[:, c] = sum((1.0 if k == own else 0.3 / 2) * cos[k][:, c] for k in range(3))
    torch.testing.assert_close(s.predict(x), expected)
    torch.testing.assert_close(reweighted_logits(torch.stack(cos), s.owner, 0.3), expected)
    plain = copy.deepcopy(s)
    plain.use_reweight = False
    cat = F.normalize(s.features(x), dim=1) @ F.normalize(s.protos.transpose(0, 1).reshape(6, -1), dim=1).T
    torch.testing.assert_close(plain.predict(x), cat)


def test_training_loss_covers_the_session_classes_only():
    s = _ease()
    _session(s, [0, 1], 0)
    x, y = _data([2, 3], 1)
    s.segment_start(SimpleNamespace(kind="train", num_samples=len(y), meta={"epochs": 1, "classes": [2, 3]}))
    out = s.learn(x[:8], y[:8])
    assert torch.isinf(out[:, [0, 1, 4, 5]]).all() and torch.isfinite(out[:, 2:4]).all()


def test_deterministic_under_a_seed():
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)  # dropout masks come from the global generator (as the reference's)
        s = _ease(seed=seed)
        _session(s, [0, 1], 0)
        x, _ = _session(s, [2, 3], 1)
        runs.append((s.sets[0].adapters[1].down.weight.clone(), s.predict(x)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_checkpoint_round_trip_and_reset():
    torch.manual_seed(0)
    s = _ease()
    _session(s, [0, 1], 0)
    x, _ = _session(s, [2, 3], 1)
    state = copy.deepcopy(s.checkpoint_state())
    t = _ease()
    t.load_checkpoint_state(state)
    assert t.num_subspaces == 2 and torch.equal(t.predict(x), s.predict(x))
    s.reset()
    assert s.num_subspaces == 1 and s.protos.shape[0] == 0 and (s.owner == -1).all()
    assert len(s.trainable_parameters()) == 4 * len(s.sets) + 2  # one adapter per block + proxy head


def test_engine_runs_two_sessions_on_a_tiny_vit():
    torch.manual_seed(0)
    s = strategies.create("ease", _vit(num_classes=4))
    res = ctta.run(two_session_stream(_data), s, device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()
    assert s.sessions.session == 1 and s.num_subspaces == 2 and s.protos.shape[0] == 2
    assert s.owner.tolist() == [0, 0, 1, 1]


def test_a_checkpoint_in_mid_session_resumes_bit_identically():
    def start():
        s = _ease(adapter_dropout=0.0)  # no dropout: the global generator plays no part
        _session(s, [0, 1], 0)
        x, y = _data([2, 3], 1)
        s.segment_start(SimpleNamespace(kind="train", num_samples=len(y), meta={"epochs": 1, "classes": [2, 3]}))
        s.learn(x[:8], y[:8])
        return s, x, y

    s, x, y = start()
    state = copy.deepcopy(s.checkpoint_state())
    s.learn(x[8:], y[8:])
    s.close_session()
    t = _ease(adapter_dropout=0.0)
    t.load_checkpoint_state(state)
    assert t.num_subspaces == 2 and t.sessions.in_session
    t.learn(x[8:], y[8:])
    t.close_session()
    assert torch.equal(t.predict(x), s.predict(x))
    for a, b in zip(s.sets, t.sets):
        assert torch.equal(a.adapters[1].up.weight, b.adapters[1].up.weight)


def test_adapter_sets_read_the_stream_beside_the_mlp_and_route_by_index():
    from ctta.backbones.peft import add_ffn_adapter_sets, set_active_adapter

    model, plain = _vit(), _vit()
    sets = add_ffn_adapter_sets(model, bottleneck=3, scale=0.1, dropout=0.1)
    g = torch.Generator().manual_seed(0)
    for s in sets:
        s.add(g)
        s.add(g)
        for ad in s.adapters:
            torch.nn.init.normal_(ad.up.weight, generator=g)
    model.eval()
    block, ref = model.net.blocks[0], plain.net.blocks[0]
    z = torch.randn(2, 5, 16)
    after_attn = z + ref.attn(ref.norm1(z))
    for k in (0, 1):
        set_active_adapter(sets, k)
        ad = block.mlp.adapters[k]
        expected = after_attn + ref.mlp(ref.norm2(after_attn)) + 0.1 * ad.up(torch.relu(ad.down(after_attn)))
        torch.testing.assert_close(block(z), expected)  # AdaptFormer parallel: the adapter sees x, not norm2(x)
    set_active_adapter(sets, None)
    torch.testing.assert_close(block(z), ref(z))
    assert not torch.equal(sets[0].adapters[0].down.weight, sets[0].adapters[1].down.weight)
    assert torch.equal(sets[0].adapters[0].down.bias, torch.zeros(3))
