"""CODA-Prompt: decomposed prompts (components, keys, attention vectors) on a frozen tiny ViT, per-task slices with
Gram-Schmidt init, the orthogonality loss, prefix tuning with per-sample prompts, class-masked head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ctta
from conftest import stripe_data, two_session_stream
from ctta import strategies
from ctta.backbones import create
from ctta.errors import ConfigError
from ctta.strategies.coda_prompt import component_weights, gram_schmidt_init, ortho_penalty

D = 16


def _vit(num_classes: int = 4, depth: int = 2):
    torch.manual_seed(0)
    return create("vit_tiny_patch16_224", num_classes=num_classes, img_size=16, patch_size=4, depth=depth,
                  embed_dim=D, num_heads=2)


def _coda(**kw):
    hp = dict(num_tasks=2, pool_size=6, prompt_length=4, lr=0.01)
    hp.update(kw)
    return strategies.create("coda_prompt", _vit(), **hp)


def _data(classes, n_per=8, seed=0):
    return stripe_data(classes, n_per, seed, size=16)


def _session(s, classes, seed, steps=2, batch=8):
    x, y = _data(classes, seed=seed)
    for _ in range(steps):
        for i in range(0, len(y), batch):
            s.learn(x[i:i + batch], y[i:i + batch])
    s.close_session()


def _backbone(s):
    return {n: p.detach().clone() for n, p in s.model.named_parameters() if not n.startswith("net.head.")}


def _slices(s, task):
    return {f"{k}{l}": s.slices(k, l)[task].detach().clone() for l in s.layers for k in ("p", "k", "a")}


def test_attention_weights_and_ortho_loss_match_their_formulas():
    q = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    k = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    a = torch.tensor([[2.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
    w = component_weights(q, k, a)
    for b in range(2):
        for m in range(2):
            qa = q[b] * a[m]
            expected = float(qa @ k[m] / (qa.norm() * k[m].norm()))
            assert w[b, m].item() == pytest.approx(expected, abs=1e-6)
    t = torch.tensor([[1.0, 2.0], [0.5, 0.0], [0.0, 1.0]])
    gram = t @ t.T - torch.eye(3)
    assert ortho_penalty(t).item() == pytest.approx(float((gram ** 2).sum()) / 9, abs=1e-6)
    assert ortho_penalty(torch.eye(4)).item() == 0.0


def test_gram_schmidt_is_the_references_classical_gram_schmidt():
    """New rows: Gaussian draws minus their projections on every earlier vector (previous rows and the new ones so
    far, unnormalised), normalised at the end; orthonormal and orthogonal to previous rows that are orthonormal."""
    first = gram_schmidt_init(torch.zeros(0, 40), 3, torch.Generator().manual_seed(1))
    assert torch.allclose(first @ first.T, torch.eye(3), atol=1e-5)
    new = gram_schmidt_init(first, 4, torch.Generator().manual_seed(2))
    assert torch.allclose(new @ new.T, torch.eye(4), atol=1e-5) and (new @ first.T).abs().max() < 1e-5
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(3, 10, generator=g) * 3  # trained slices: neither unit nor orthogonal
    got = gram_schmidt_init(prev, 2, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    basis, us = list(prev), []
    for _ in range(2):
        v = torch.randn(10, generator=g)
        u = v - sum((v @ b) / (b @ b) * b for b in basis)
        basis.append(u)
        us.append(u / u.norm())
    assert torch.allclose(got, torch.stack(us), atol=1e-5)


def test_new_slices_start_orthogonal_to_previous_and_old_slices_never_move():
    s = _coda()
    back = _backbone(s)
    _session(s, [0, 1], seed=0)
    after0 = _slices(s, 0)
    s.sessions.on_learn()
    s.begin_session(1)  # task 1's Gram-Schmidt start, against task 0's trained slices
    for layer in s.layers:
        for kind in ("p", "k", "a"):
            old = s.slices(kind, layer)[0].detach().flatten(1)
            new = s.slices(kind, layer)[1].detach().flatten(1)
            # old: trained away from orthonormal, so (as the reference) orthogonal up to that drift
            drift = float((old @ old.T - torch.eye(old.shape[0])).abs().max())
            assert float((new @ old.T).abs().max()) < max(4 * drift, 1e-4)
            assert float((new @ new.T - torch.eye(new.shape[0])).abs().max()) < max(4 * drift, 1e-4)
            assert s.slices(kind, layer)[1].requires_grad and not s.slices(kind, layer)[0].requires_grad
    start1 = _slices(s, 1)
    x, y = _data([2, 3], seed=1)
    for _ in range(2):
        s.learn(x, y)
    s.close_session()
    assert any(not torch.equal(v, start1[n]) for n, v in _slices(s, 1).items())  # task 1's slice learned
    for n, v in _slices(s, 0).items():
        assert torch.equal(v, after0[n]), n  # task 0's components, keys and attention vectors untouched
    for n, p in s.model.named_parameters():
        if not n.startswith("net.head."):
            assert torch.equal(p, back[n]), n  # the backbone never changes


def test_training_updates_only_the_current_slice_and_the_head():
    s = _coda()
    before = {n: p.detach().clone() for n, p in s.named_parameters()}
    _session(s, [0, 1], seed=0)
    changed = {n for n, p in s.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".0") or "net.head." in n for n in changed), sorted(changed)
    assert any("net.head." in n for n in changed)
    trainable = {id(p) for p in s.trainable_parameters()}
    assert trainable == {id(s.slices(k, l)[0]) for l in s.layers for k in ("p", "k", "a")} | {id(p) for p in s.head}


def _hand_attention(attn, z, pk, pv):
    """Prefix tuning by hand: keys [pk; k], values [pv; v] per head, one softmax (the reference's Attention)."""
    b, n, d = z.shape
    h = attn.num_heads
    q, k, v = attn.qkv(z).chunk(3, -1)
    k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    q, k, v = (t.reshape(b, -1, h, d // h).transpose(1, 2) for t in (q, k, v))
    w = (q @ k.transpose(-1, -2) * (d // h) ** -0.5).softmax(-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(b, n, d))


def test_prompted_forward_equals_prefix_tuning_by_hand():
    """Logits = head([CLS] after the final norm) of the ViT with prefix keys / values = the first / second half of
    sum_m alpha_m P_m in every prompted block, alpha from the frozen query."""
    s = _coda()
    x, _ = _data([0, 1], n_per=2)
    with torch.no_grad():
        q = s.model.forward_features(x)  # the frozen query: [CLS] without prompts
        net = s.model.net
        t = net._pos_embed(net.patch_embed(s.model.normalize(x)))
        for i, blk in enumerate(net.blocks):
            p, k, a = s.components(i, train=False)
            w = component_weights(q, k, a)
            prompt = (w[:, :, None, None] * p[None]).sum(1)
            t = t + _hand_attention(blk.attn, blk.norm1(t), prompt[:, :2], prompt[:, 2:])
            t = t + blk.mlp(blk.norm2(t))
        expected = net.head(net.norm(t)[:, 0])
    assert torch.allclose(s.logits(x), expected, atol=1e-5)
    assert not torch.allclose(s.logits(x), s.model(x), atol=1e-3)  # the prompts change the prediction


def test_loss_is_session_masked_cross_entropy_plus_ortho():
    s = _coda(ortho_mu=0.5)
    x, y = _data([0, 1], n_per=4)
    s.sessions.on_learn()
    s.begin_session(0)
    s.session_classes.mask[:2] = True
    logits, ortho = s.prompted(x, train=True)
    expected = sum(0.5 * (ortho_penalty(s.slices("k", l)[0]) + ortho_penalty(s.slices("a", l)[0])
                          + ortho_penalty(s.slices("p", l)[0].flatten(1))) for l in s.layers)
    assert ortho.detach().item() == pytest.approx(float(expected.detach()), rel=1e-5)
    ce = F.cross_entropy(logits[:, :2], y)
    masked = logits.clone()
    masked[:, 2:] = float("-inf")
    assert F.cross_entropy(masked, y).item() == pytest.approx(ce.item(), rel=1e-6)


def test_deterministic_under_a_seed():
    outs = []
    for _ in range(2):
        s = _coda(ortho_mu=0.1)
        _session(s, [0, 1], seed=0)
        _session(s, [2, 3], seed=1)
        x, _ = _data([0, 1, 2, 3], n_per=2, seed=5)
        outs.append(s.predict(x))
    assert torch.equal(outs[0], outs[1])
    other = _coda(ortho_mu=0.1, seed=3)
    assert not torch.equal(other.slices("k", 0)[0], _coda(ortho_mu=0.1).slices("k", 0)[0])


def test_checkpoint_round_trip_and_reset():
    s = _coda()
    init = {n: p.detach().clone() for n, p in s.named_parameters()}
    _session(s, [0, 1], seed=0)
    state = s.checkpoint_state()
    t = _coda()
    t.load_checkpoint_state(state)
    x, _ = _data([0, 1], n_per=2, seed=4)
    assert torch.equal(s.predict(x), t.predict(x))
    s.reset()
    assert all(torch.equal(p, init[n]) for n, p in s.named_parameters())


def test_config_errors():
    with pytest.raises(ConfigError, match="even"):
        _coda(prompt_length=3)
    with pytest.raises(ConfigError, match="prompt_layers"):
        _coda(prompt_layers=[0, 5])
    with pytest.raises(ConfigError, match="no component"):
        _coda(pool_size=1, num_tasks=2)
    s = _coda(num_tasks=1, pool_size=2)
    _session(s, [0, 1], seed=0)
    with pytest.raises(ConfigError, match="num_tasks"):
        _session(s, [2, 3], seed=1)


def test_coda_prompt_runs_a_two_session_class_incremental_stream():
    s = _coda(ortho_mu=0.1)
    assert s.layers == [0, 1]  # e_layers 0-4 capped at depth 2
    res = ctta.run(two_session_stream(_data, n_eval=4, batch=8), s, device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()
    assert s.sessions.session == 1 and s.task == 1
