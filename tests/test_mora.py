"""MoRA (arXiv 2506.21035): self-activated sparse rank-1 experts respect the activation budget, earlier tasks' experts
never change, low-activation experts are pruned, and mora / lora_ft run a 2-session class-incremental stream on
clip_tiny through the engine."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("open_clip")

import ctta  # noqa: E402
from conftest import stripe_data, two_session_stream  # noqa: E402
from ctta import strategies  # noqa: E402
from ctta.backbones import create  # noqa: E402
from ctta.backbones.peft import (AttentionProjections, LoRALinear, MixtureOfRankLoRA, add_attention_peft,  # noqa: E402
                                 add_mora, count_trainable, freeze)
from ctta.errors import ConfigError, UnsupportedError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["zero", "one", "two", "three"]


def _clip():
    torch.manual_seed(0)
    return create("clip_tiny", num_classes=4, class_names=NAMES)


def _data(classes, n_per=8, seed=0):
    return stripe_data(classes, n_per, seed, size=32)


def _ci_stream(batch=8):
    return two_session_stream(_data, n_eval=4, batch=batch)


def _learn_session(s, x, y, batch=8):
    for i in range(0, len(y), batch):
        s.learn(x[i:i + batch], y[i:i + batch])
    s.close_session()


def _module(r=4, k=2, tasks=3, delta=float("-inf"), tau=0.5):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 6))
    mod = add_mora(net, r=r, k=k, tau=tau, delta=delta, select="0", tasks=tasks)[0]
    with torch.no_grad():
        for b in mod.B:
            b.normal_()
    return net, mod


def test_gates_are_a_top_k_softmax_of_normalised_self_activations_and_output_matches():
    net, mod = _module(r=4, k=3, tasks=2, delta=0.1, tau=0.5)
    assert isinstance(mod, MixtureOfRankLoRA) and mod.num_tasks == 2
    x = torch.randn(5, 7, 12)  # tokens: gating is per token
    z, w = mod.gates(x)
    a = torch.cat(list(mod.A))
    s = (x @ a.t()) / (x @ a.t()).norm(dim=-1, keepdim=True)
    top, idx = s.topk(3, dim=-1)
    expected = torch.zeros_like(s).scatter(-1, idx, torch.softmax(top / 0.5, -1) * (top >= 0.1))
    assert torch.allclose(w, expected, atol=1e-6)
    assert int((w > 0).sum(-1).max()) <= 3
    out = net(x)
    assert torch.allclose(out, mod.base(x) + (w * z) @ torch.cat(list(mod.B), 1).t(), atol=1e-5)


def test_clip_attention_and_mlp_are_adapted_and_start_as_the_frozen_model():
    model = _clip()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    mods = add_mora(model, r=4, k=2, select=["*.mlp.c_fc", "*.mlp.c_proj"], attention=True)
    wrappers = [m for m in model.modules() if isinstance(m, AttentionProjections)]
    assert len(wrappers) == 2 and len(mods) == 8  # 2 blocks x (qkv, out_proj, c_fc, c_proj)
    assert {m.base.out_features for m in mods} >= {96, 32, 128}  # fused qkv = 3 x 32
    freeze(model, peft=True)
    assert count_trainable(model) == sum(4 * (m.base.in_features + m.base.out_features) for m in mods)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)  # B = 0: the wrapped attention is the original one
        for w in wrappers:
            w.qkv.B[0].normal_()
        assert not torch.allclose(model(x), ref, atol=1e-3)  # and the attention's experts act
    lora_model = _clip()
    wrapped = add_attention_peft(lora_model, lambda m: LoRALinear(m, 2))
    assert len(wrapped) == 2 and all(isinstance(w.qkv, LoRALinear) for w in wrapped)
    with pytest.raises(UnsupportedError, match="need_weights"):
        wrapped[0](torch.rand(2, 5, 32), need_weights=True)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_at_most_k_ranks_are_active_per_token_in_a_clip_model(k):
    s = strategies.create("mora", _clip(), r=4, k=k, delta=float("-inf"))
    x, y = _data([0, 1], seed=0)
    _learn_session(s, x, y)
    s.learn(*_data([2, 3], n_per=4, seed=1))  # session 1: 8 experts per layer
    for m in s.experts:
        m.keep_gates = True
    s.predict(x[:4])
    for m in s.experts:
        assert m.num_tasks == 2 and m.last_gates.shape[-1] == 8
        active = (m.last_gates != 0).sum(-1)
        assert int(active.max()) <= k
        assert int(active.min()) == min(k, 8)  # delta = -inf: exactly the budget is used


def test_earlier_task_experts_are_frozen_and_bit_identical_after_a_later_session():
    s = strategies.create("mora", _clip(), lr=0.01)
    frozen_backbone = {n: p.detach().clone() for n, p in s.model.named_parameters()
                       if ".A." not in n and ".B." not in n}
    x0, y0 = _data([0, 1], seed=0)
    _learn_session(s, x0, y0)
    old = [(m.A[0].detach().clone(), m.B[0].detach().clone()) for m in s.experts]
    assert any(b.abs().sum() > 0 for _, b in old)  # session 0 learned
    x1, y1 = _data([2, 3], seed=1)
    s.learn(x1[:8], y1[:8])
    in_opt = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    for m in s.experts:
        assert not m.A[0].requires_grad and not m.B[0].requires_grad
        assert id(m.A[0]) not in in_opt and id(m.B[0]) not in in_opt
        assert id(m.A[1]) in in_opt and m.B[1].requires_grad
    _learn_session(s, x1[8:], y1[8:])
    for m, (a, b) in zip(s.experts, old):
        assert torch.equal(m.A[0], a) and torch.equal(m.B[0], b)
    assert any(m.B[1].abs().sum() > 0 for m in s.experts)  # the new block learned
    assert all(torch.equal(v, dict(s.model.named_parameters())[n]) for n, v in frozen_backbone.items())
    assert not s.head  # CLIP: the zero-shot head does not train


def test_pruning_removes_experts_that_rarely_activate():
    net, mod = _module(r=4, k=4, tasks=1, delta=0.0)
    with torch.no_grad():
        mod.A[0].copy_(torch.ones(4, 12))
        mod.A[0][2].fill_(-1.0)  # inputs are positive: expert 2's score is always negative, below delta
    mod.reset_stats()
    mod.track = True
    x = torch.rand(10, 3, 12) + 0.1
    net(x)
    mod.track = False
    assert torch.equal(mod.act_count, torch.tensor([30.0, 30.0, 0.0, 30.0])) and int(mod.act_tokens) == 30
    alive = mod.prune(0, min_freq=0.01)
    assert alive.tolist() == [True, True, False, True]
    mod.delta = float("-inf")  # even with the threshold off, a pruned expert never activates again
    _, w = mod.gates(x)
    assert bool((w[..., 2] == 0).all()) and bool((w[..., [0, 1, 3]] > 0).all())
    # the strategy prunes at the end of each session: with prune_freq 1 and k=2 of r=4, >= 2 go per layer
    s = strategies.create("mora", _clip(), r=4, k=2, delta=float("-inf"), prune_freq=1.0)
    _learn_session(s, *_data([0, 1], seed=0))
    counts = s.expert_counts()
    assert counts["total"] == 4 * len(s.experts) and counts["alive"] <= 2 * len(s.experts)


def test_mora_and_lora_ft_run_a_two_session_class_incremental_stream():
    for name in ("mora", "lora_ft"):
        s = strategies.create(name, _clip())
        res = ctta.run(_ci_stream(), s, device="cpu", progress=False)
        evals = res.segments[res.segments["kind"] == "eval"]
        assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()
        assert s.sessions.session == 1
        if name == "mora":
            assert all(m.num_tasks == 2 for m in s.experts)
        else:
            assert all(isinstance(m, LoRALinear) for m in s.loras)


def test_checkpoint_round_trip_reset_and_errors():
    s = strategies.create("mora", _clip())
    _learn_session(s, *_data([0, 1], seed=0))
    _learn_session(s, *_data([2, 3], seed=1))
    state = s.checkpoint_state()
    x, _ = _data([0, 1, 2, 3], n_per=2, seed=5)
    expected = s.predict(x)
    fresh = strategies.create("mora", _clip())
    fresh.load_checkpoint_state(state)
    assert fresh.task == 1 and torch.allclose(fresh.predict(x), expected)
    s.reset()
    assert s.task == 0 and s.sessions.session == -1
    with pytest.raises(ConfigError, match="hyperparameter k=0"):
        strategies.create("mora", _clip(), k=0)
    with pytest.raises(ConfigError, match="loss_classes"):
        strategies.create("lora_ft", _clip(), loss_classes="all")
    with pytest.raises(UnsupportedError, match="add_mora found no"):
        strategies.create("mora", _clip(), targets=["*.nothing"], attention=False)
