"""LAE: PET modules (adapter / LoRA / prefix) with learnable scales on a frozen tiny ViT, online + EMA offline
experts, warm-up freeze in later sessions, max-of-softmax ensemble."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import ctta
from conftest import stripe_data, tiny_vit, two_session_stream
from ctta import strategies
from ctta.backbones.peft import KVLoRA, PrefixAttention, add_prefix, count_trainable, freeze
from ctta.errors import ConfigError

PET = ["adapter", "lora", "prefix"]


_vit = tiny_vit


def _data(classes, n_per=8, seed=0):
    return stripe_data(classes, n_per, seed, size=16)


def _ci_stream(batch=8):
    return two_session_stream(_data, n_eval=4, batch=batch)


def _backbone_state(s):
    ids = {id(p) for p in s.pets + s.head}
    return {n: p.detach().clone() for n, p in s.model.named_parameters() if id(p) not in ids}


def _learn_session(s, x, y, batch=8):
    for i in range(0, len(y), batch):
        s.learn(x[i:i + batch], y[i:i + batch])
    s.close_session()


def test_prefix_tuning_matches_a_hand_computed_attention():
    model = _vit()
    att = add_prefix(model, "net.blocks.0.attn", length=3)[0]
    assert isinstance(att, PrefixAttention)
    freeze(model, peft=True)
    assert count_trainable(model) == 2 * 3 * 16 + 2  # key/value tokens + two scales
    z = torch.randn(2, 5, 16)
    a = att.base
    q, k, v = a.qkv(z).chunk(3, -1)
    k = torch.cat([att.key.expand(2, -1, -1), k], 1).view(2, 8, 2, 8).transpose(1, 2)
    v = torch.cat([att.value.expand(2, -1, -1), v], 1).view(2, 8, 2, 8).transpose(1, 2)
    q = q.view(2, 5, 2, 8).transpose(1, 2)
    w = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
    w = torch.cat([w[..., :3] / w[..., :3].sum(-1, keepdim=True), w[..., 3:]], -1)  # LAE's compensation
    expected = a.proj((w @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(att(z), expected, atol=1e-5)


@pytest.mark.parametrize("pet_type", PET)
def test_trainable_parameters_are_the_pet_modules_and_the_head(pet_type):
    s = strategies.create("lae", _vit(), pet_type=pet_type)
    d, blocks = 16, 2  # adapt_blocks default: first 5 blocks capped at depth 2
    pet = {"adapter": blocks * (d * 5 + 5 + 5 * d + d + 1),
           "lora": blocks * (2 * 5 * (d + d) + 2),
           "prefix": blocks * (2 * 10 * d + 2)}[pet_type]
    assert sum(p.numel() for p in s.pets) == pet
    assert count_trainable(s.model) == pet + d * 4 + 4
    assert sum(p.numel() for p in s.trainable_parameters()) == pet + d * 4 + 4
    if pet_type == "lora":
        assert all(isinstance(s.model.get_submodule(f"net.blocks.{b}.attn.qkv"), KVLoRA) for b in range(2))


@pytest.mark.parametrize("pet_type", PET)
def test_offline_is_the_ema_of_online_warmup_freezes_and_backbone_is_untouched(pet_type):
    s = strategies.create("lae", _vit(), pet_type=pet_type, ema_decay=0.9, freeze_batches=2, lr=0.01)
    frozen = _backbone_state(s)
    x0, y0 = _data([0, 1], seed=0)
    _learn_session(s, x0, y0)
    assert not s.offline_ready  # only the online expert during session 0
    after0 = [p.detach().clone() for p in s.pets]
    x1, y1 = _data([2, 3], seed=1)
    expected = [p.clone() for p in after0]  # offline starts as a copy of the online modules
    online_traj = []
    for i in range(4):
        head_before = [h.detach().clone() for h in s.head]
        s.learn(x1[8 * (i % 2):8 * (i % 2) + 8], y1[8 * (i % 2):8 * (i % 2) + 8])
        online = [p.detach().clone() for p in s.pets]
        online_traj.append(online)
        if i < 2:  # warm-up: the online modules do not move, the head does
            assert all(torch.equal(a, b) for a, b in zip(online, after0))
            assert any(not torch.equal(a, b) for a, b in zip(head_before, s.head))
        expected = [0.9 * e + 0.1 * o for e, o in zip(expected, online)]
        assert all(torch.allclose(o, e, atol=1e-6) for o, e in zip(s.offline_parameters(), expected))
    assert any(not torch.equal(a, b) for a, b in zip(online_traj[-1], after0))  # after the warm-up it learns
    s.close_session()
    # the frozen ViT is bit-identical across sessions
    assert all(torch.equal(frozen[n], v) for n, v in _backbone_state(s).items())
    # inference = element-wise max of the two experts' (seen-masked) softmax
    xt, _ = _data([0, 1, 2, 3], n_per=2, seed=5)
    with torch.no_grad():
        p_on = F.softmax(s.model(xt), 1)
        p_off = F.softmax(s._offline_logits(xt), 1)
    out = s.predict(xt)
    assert torch.allclose(out.exp(), torch.maximum(p_on, p_off), atol=1e-6)
    assert not torch.allclose(p_on, p_off)


def test_warmup_from_the_segment_length_is_the_freeze_fraction():
    s = strategies.create("lae", _vit(), num_epochs=5, num_freeze_epochs=3)
    seg = SimpleNamespace(kind="train", num_samples=40, batch_size=8, meta={"classes": [2, 3]})
    x0, y0 = _data([0, 1], seed=0)
    _learn_session(s, x0, y0)
    s.segment_start(seg)
    x1, y1 = _data([2, 3], n_per=20, seed=1)
    states = []
    for i in range(5):
        s.learn(x1[8 * i:8 * i + 8], y1[8 * i:8 * i + 8])
        states.append(s.in_warmup())
    assert s._warmup == 24 and states == [True, True, False, False, False]  # 3/5 of 40 samples
    with pytest.raises(ConfigError, match="pet_type"):
        strategies.create("lae", _vit(), pet_type="prompt")
    with pytest.raises(ConfigError, match="adapt_blocks"):
        strategies.create("lae", _vit(), adapt_blocks=[0, 7])


@pytest.mark.parametrize("pet_type", PET)
def test_lae_runs_a_two_session_class_incremental_stream(pet_type):
    s = strategies.create("lae", _vit(), pet_type=pet_type)
    res = ctta.run(_ci_stream(), s, device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()
    assert s.sessions.session == 1 and s.offline_ready
    # the session length came from the engine: 16 samples, 3/5 of them frozen
    assert s._warmup == round(16 * 3 / 5)


def test_head_starts_as_the_official_new_heads_and_rows_move_only_in_their_session():
    """Side-by-side fix (gqk/LAE@1680e49): a new head N(0, 0.001^2) with bias 0 (``head_init: reset``, seeded), not
    the backbone's own; adapters' down-projection bias 0; a head row learns only in its class's session."""
    model = _vit()
    own = model.net.head.weight.detach().clone()
    s = strategies.create("lae", model, seed=3)
    w, b = (p.detach() for p in s.head)
    assert not torch.allclose(w, own) and torch.equal(b, torch.zeros_like(b))
    assert 0.0005 < float(w.std()) < 0.002 and float(w.abs().max()) < 0.01
    again = strategies.create("lae", _vit(), seed=3)
    assert torch.equal(again.head[0], w)  # the same draw under the same seed
    kept = strategies.create("lae", _vit(), head_init="keep")
    assert torch.equal(kept.head[0], own)
    for name, m in s.model.named_modules():
        if name.endswith("attn") and hasattr(m, "down"):
            assert torch.equal(m.down.bias, torch.zeros_like(m.down.bias))
            assert torch.equal(m.up.weight, torch.zeros_like(m.up.weight))
    x0, y0 = _data([0, 1], seed=0)
    _learn_session(s, x0, y0)
    after0 = s.head[0].detach().clone()
    assert torch.equal(after0[2:], again.head[0][2:]) and not torch.equal(after0[:2], again.head[0][:2])
    x1, y1 = _data([2, 3], seed=1)
    _learn_session(s, x1, y1)
    assert torch.equal(s.head[0][:2], after0[:2]) and not torch.equal(s.head[0][2:], after0[2:])
    with pytest.raises(ConfigError):
        strategies.create("lae", _vit(), head_init="zeros")
