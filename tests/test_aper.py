"""APER: first-session PEFT (adapter, SSF, VPT shallow / deep, full fine-tuning), then a frozen backbone and a
prototype cosine head on the concatenated [pretrained, adapted] features."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import ctta
from conftest import stripe_data, tiny_vit, two_session_stream
from ctta import strategies
from ctta.backbones.peft import PromptTokens, SSF, add_ssf, add_vpt, vit_ssf_layers

VARIANTS = ["adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"]


_vit = tiny_vit


def _data(classes, seed=0, n_per=8):
    return stripe_data(classes, n_per, seed, size=16)


def _aper(variant="adapter", **hp):
    torch.manual_seed(1)
    return strategies.create("aper", _vit(), variant=variant, **{"lr": 0.2, **hp})


def _session(s, x, y, batch=8, epochs=1):
    s.segment_start(SimpleNamespace(kind="train", num_samples=epochs * len(y), meta={"epochs": epochs}))
    xx, yy = torch.cat([x] * epochs), torch.cat([y] * epochs)
    for i in range(0, len(yy), batch):
        s.learn(xx[i:i + batch], yy[i:i + batch])
    s.close_session()


def _own(variant, name):
    """Whether parameter ``name`` of the tuned model belongs to ``variant``'s PEFT."""
    return {"adapter": ".down." in name or ".up." in name, "ssf": name.endswith((".scale", ".shift")),
            "vpt_shallow": name.endswith(".tokens"), "vpt_deep": name.endswith(".tokens"),
            "finetune": not name.startswith("net.head.")}[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_session_zero_trains_only_the_variants_parameters_then_nothing_moves(variant):
    s = _aper(variant)
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    pre = {n: p.detach().clone() for n, p in s.pretrained.named_parameters()}
    assert {n for n, p in s.model.named_parameters() if p.requires_grad} == {n for n in before if _own(variant, n)}
    x, y = _data([0, 1])
    _session(s, x, y, epochs=2)
    moved = {n for n, p in s.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(_own(variant, n) for n in moved), sorted(moved)
    assert not any(p.requires_grad for p in s.model.parameters()) and s.trainable_parameters() == []
    after0 = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    x2, y2 = _data([2, 3], 1)
    _session(s, x2, y2)
    s.predict(x2)
    for n, p in s.model.named_parameters():
        assert torch.equal(p, after0[n]), n
    for n, p in s.pretrained.named_parameters():  # the pretrained branch never changes at all
        assert torch.equal(p, pre[n]) and not p.requires_grad, n
    s.reset()
    assert s.adapting and s.prototypes.counts.sum() == 0
    assert {n for n, p in s.model.named_parameters() if p.requires_grad} == {n for n in before if _own(variant, n)}


def test_merged_feature_is_the_concatenation_and_prototypes_are_its_class_means():
    s = _aper("adapter")
    (x1, y1), (x2, y2) = _data([0, 1]), _data([2, 3], 1)
    _session(s, x1, y1, epochs=2)  # the second pass does not count twice
    _session(s, x2, y2)
    plain = _vit().eval()
    f = s.features(x1)
    torch.testing.assert_close(f[:, :16], plain.forward_features(x1))  # branch 1: the untouched pretrained model
    torch.testing.assert_close(f[:, 16:], s.model.forward_features(x1))  # branch 2: the adapted one
    assert not torch.allclose(f[:, :16], f[:, 16:])
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
    f = s.features(x)
    means = torch.stack([f[y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(s.prototypes.means(), means)
    torch.testing.assert_close(s.prototypes.counts, torch.full((4,), 8.0))
    cos = F.normalize(f, dim=1) @ F.normalize(means, dim=1).T  # one cosine over the whole 2D vector
    torch.testing.assert_close(s.predict(x), cos)


def test_session_zero_prototypes_use_the_adapted_features_after_training():
    s = _aper("ssf")
    x, y = _data([0, 1])
    _session(s, x, y, epochs=3)
    f = s.features(x)
    torch.testing.assert_close(s.prototypes.means()[:2], torch.stack([f[y == c].mean(0) for c in (0, 1)]))
    assert torch.isinf(s.predict(x)[:, 2:]).all()  # unseen classes masked


def test_training_head_is_a_cosine_head_with_the_cosine_learning_rate():
    s = _aper("vpt_deep", lr=0.1, min_lr=0.0)
    x, y = _data([0, 1])
    s.segment_start(SimpleNamespace(kind="train", num_samples=2 * len(y), meta={"epochs": 2}))
    s.learn(x[:8], y[:8])
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    s.learn(x[8:], y[8:])
    s.learn(x[:8], y[:8])  # epoch 1 of 2: lr 0.1 * (1 + cos(pi / 2)) / 2
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    f = s.model.forward_features(x[:3])
    cos = s.train_sigma * F.normalize(f, dim=1) @ F.normalize(s.train_weight, dim=1).T
    torch.testing.assert_close(s.logits(x[:3]), cos)  # still adapting (a prediction would end the session)


def test_deterministic_under_a_seed():
    x, y = _data([0, 1])
    runs = []
    for _ in range(2):
        s = _aper("adapter")
        _session(s, x, y)
        runs.append(s.predict(x))
    assert torch.equal(runs[0], runs[1])


def test_checkpoint_round_trip_mid_and_after_session_zero():
    x, y = _data([0, 1])
    s = _aper("vpt_shallow")
    _session(s, x, y)
    t = _aper("vpt_shallow")
    t.load_checkpoint_state(s.checkpoint_state())
    assert not t.adapting and not any(p.requires_grad for p in t.model.parameters())
    assert torch.equal(t.predict(x), s.predict(x))


def test_ssf_sits_after_pilots_layers_and_scales_each_channel():
    model = _vit()
    names = vit_ssf_layers(model)
    assert names[0] == "net.patch_embed.proj" and names[-1] == "net.norm"
    assert "net.blocks.1.attn.qkv" in names and "net.blocks.0.mlp.fc2" in names and len(names) == 2 + 2 * 6
    plain = _vit()
    mods = add_ssf(model)
    assert all(isinstance(model.get_submodule(n), SSF) for n in names) and len(mods) == len(names)
    fc1 = model.net.blocks[0].mlp.fc1
    z = torch.randn(2, 5, 16)
    torch.testing.assert_close(fc1(z), plain.net.blocks[0].mlp.fc1(z) * fc1.scale + fc1.shift)
    proj = model.net.patch_embed.proj  # a Conv2d: per output channel, axis 1
    img = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(proj(img), plain.net.patch_embed.proj(img) * proj.scale.view(1, -1, 1, 1)
                               + proj.shift.view(1, -1, 1, 1))
    assert 0.9 < float(fc1.scale.detach().mean()) < 1.1 and float(fc1.scale.detach().std()) > 0  # N(1, 0.02), not the identity


def test_vpt_appends_tokens_and_drops_them_after_each_block_or_the_stack():
    deep, shallow, plain = _vit(), _vit(), _vit()
    add_vpt(deep, 3, deep=True)
    add_vpt(shallow, 3, deep=False)
    assert all(isinstance(b, PromptTokens) for b in deep.net.blocks)
    assert isinstance(shallow.net.blocks, PromptTokens)
    for m in (deep, shallow):
        for p in m.modules():
            if isinstance(p, PromptTokens):
                torch.nn.init.normal_(p.tokens)
    z = torch.randn(2, 17, 16)
    p0, p1 = deep.net.blocks[0].tokens, deep.net.blocks[1].tokens
    b = plain.net.blocks
    h = b[0](torch.cat([z, p0.expand(2, -1, -1)], 1))[:, :17]
    expected = b[1](torch.cat([h, p1.expand(2, -1, -1)], 1))[:, :17]
    torch.testing.assert_close(deep.net.blocks[1](deep.net.blocks[0](z)), expected)
    ps = shallow.net.blocks.tokens
    torch.testing.assert_close(shallow.net.blocks(z), b(torch.cat([z, ps.expand(2, -1, -1)], 1))[:, :17])


def test_engine_runs_two_sessions_on_a_tiny_vit():
    torch.manual_seed(0)
    s = strategies.create("aper", _vit(), variant="adapter")
    res = ctta.run(two_session_stream(_data), s, device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()
    assert s.sessions.session == 1 and not s.adapting
    assert s.prototypes.present().tolist() == [True] * 4
