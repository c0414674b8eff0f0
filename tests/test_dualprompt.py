"""DualPrompt: shared G-prompt and task E-prompts by prefix tuning of a frozen ViT; the true task's E-prompt in
training, the best-matching key at test; only prompts, keys and head learn."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ctta
from conftest import stripe_data, two_session_stream
from ctta import strategies
from ctta.backbones import create
from ctta.errors import ConfigError
from strategies.common.prompt_pool import frozen_query, prefix_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(num_classes: int = 4, depth: int = 3):
    torch.manual_seed(0)
    return create("vit_tiny_patch16_224", num_classes=num_classes, img_size=16, patch_size=4, depth=depth,
                  embed_dim=16, num_heads=2)


def _data(classes, n_per=8, seed=0):
    return stripe_data(classes, n_per, seed, size=16)


def _dp(**hp):
    return strategies.create("dualprompt", _vit(), **{"pool_size": 4, "length": 2, "g_prompt_length": 3,
                                                      "g_layers": [0], "e_layers": [1, 2], **hp})


def _session(s, x, y, batch=8):
    for i in range(0, len(y), batch):
        s.learn(x[i:i + batch], y[i:i + batch])
    s.close_session()


def test_training_uses_the_true_tasks_e_prompt_and_test_the_argmax_key():
    s = _dp(batchwise_prompt=False)
    x, y = _data([0, 1], n_per=4)
    chosen = []
    pool = s.e_pool
    select = pool.select
    pool.select = lambda q, fixed=None: chosen.append(select(q, fixed)) or chosen[-1]
    s.learn(x, y)  # session 0 -> slot 0
    assert chosen[-1].tolist() == [[0]] * len(x)
    s.close_session()
    s.learn(*_data([2, 3], n_per=4, seed=1))  # session 1 -> slot 1
    assert chosen[-1].tolist() == [[1]] * len(x)
    # at test: the key of highest cosine with the frozen [CLS] query, per sample
    with torch.no_grad():
        pool.keys.zero_()
        q = frozen_query(s.model, x)
        pool.keys[3] = q[0]
        pool.keys[2] = -q[0]
    ids = s.test_prompt_ids(x)
    sim = F.normalize(q, dim=1) @ F.normalize(pool.keys, dim=1).T
    assert ids[0].item() == 3 and torch.equal(ids[:, 0], sim.argmax(1))
    s.predict(x)
    assert torch.equal(chosen[-1][:, 0], sim.argmax(1))


def test_prefixes_are_g_in_g_layers_and_the_selected_e_prompt_in_e_layers():
    s = _dp(batchwise_prompt=False)
    x, _ = _data([0, 1], n_per=2)
    net = s.model.net
    q = frozen_query(s.model, x)
    idx = s.e_pool.select(q)
    e = s.e_pool.prompts[idx[:, 0]]  # B x layers x 2 x length x D
    t = net.norm_pre(net._pos_embed(net.patch_embed(s.model.normalize(x))))
    prefix = {0: (s.g_prompt[0, 0].expand(len(x), -1, -1), s.g_prompt[0, 1].expand(len(x), -1, -1)),
              1: (e[:, 0, 0], e[:, 0, 1]), 2: (e[:, 1, 0], e[:, 1, 1])}
    for i, blk in enumerate(net.blocks):
        k, v = prefix[i]
        t = t + prefix_attention(blk.attn, blk.norm1(t), k, v)
        t = t + blk.mlp(blk.norm2(t))
    expected = net.head(net.norm(t)[:, 0])
    torch.testing.assert_close(s.logits(x), expected)
    # prefix attention = softmax over [prefix keys; keys] per head, values likewise (hand-computed)
    a, z = net.blocks[1].attn, torch.randn(2, 5, 16)
    pk, pv = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    qq, kk, vv = a.qkv(z).chunk(3, -1)
    heads = lambda u: u.reshape(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
    w = (heads(qq) @ heads(torch.cat([pk, kk], 1)).transpose(-1, -2) / 8 ** 0.5).softmax(-1)
    out = a.proj((w @ heads(torch.cat([pv, vv], 1))).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(prefix_attention(a, z, pk, pv), out)


def test_backbone_never_changes_and_a_new_task_starts_from_the_previous_e_prompt():
    s = _dp()
    learnable = {id(p) for p in s.trainable_parameters()}
    frozen = {n: p.detach().clone() for n, p in s.model.named_parameters() if id(p) not in learnable}
    g0 = s.g_prompt.detach().clone()
    _session(s, *_data([0, 1], seed=0))
    after0 = s.e_pool.prompts.detach().clone()
    assert not torch.equal(after0[0], s._initial["module"]["e_pool.prompts"][0])
    x1, y1 = _data([2, 3], seed=1)
    s.learn(x1[:8], y1[:8])
    # shared_prompt_pool: slot 1 started as slot 0 (then one Adam step moved it by at most lr per entry)
    assert (s.e_pool.prompts[1] - after0[0]).abs().max() <= 1.01e-3
    assert torch.equal(s.e_pool.prompts[2:], after0[2:])  # later slots unused, never touched
    assert all(torch.equal(p, frozen[n]) for n, p in s.model.named_parameters() if n in frozen)
    assert not torch.equal(g0, s.g_prompt)
    assert {id(p) for p in s.model.parameters() if p.requires_grad} == {id(p) for p in s.head}
    n = sum(p.numel() for p in s.trainable_parameters())
    assert n == 1 * 2 * 3 * 16 + 4 * 2 * 2 * 2 * 16 + 4 * 16 + 4 * 16 + 4
    unshared = _dp(shared_prompt_pool=False)
    _session(unshared, *_data([0, 1], seed=0))
    unshared.learn(x1[:8], y1[:8])
    assert (unshared.e_pool.prompts[1] - unshared.e_pool.prompts[0]).abs().max() > 0.1  # its own init


def test_deterministic_under_a_seed_and_reset_restores_the_initial_state():
    x, y = _data([0, 1])
    a, b, c = _dp(seed=2), _dp(seed=2), _dp(seed=5)
    assert torch.equal(a.g_prompt, b.g_prompt) and not torch.equal(a.e_pool.keys, c.e_pool.keys)
    initial = copy.deepcopy(a.state_dict())
    _session(a, x, y)
    _session(b, x, y)
    assert torch.equal(a.predict(x), b.predict(x))
    a.reset()
    assert all(torch.equal(v, initial[k]) for k, v in a.state_dict().items())


def test_layers_are_checked_and_cut_to_the_depth():
    s = strategies.create("dualprompt", _vit(depth=3), pool_size=4)  # the reference's [0, 1] / [2, 3, 4]
    assert s.g_layers == [0, 1] and s.e_layers == [2]
    with pytest.raises(ConfigError, match="overlap"):
        _dp(g_layers=[0, 1], e_layers=[1, 2])
    with pytest.raises(ConfigError, match="e_layers"):
        _dp(e_layers=[5])


def test_dualprompt_runs_a_two_session_stream_in_the_engine():
    s = _dp()
    res = ctta.run(two_session_stream(_data, n_eval=4, batch=8), s, device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all() and s.sessions.session == 1


def test_dualprompt_runs_from_a_ctta_bench_config(tmp_path):
    pytest.importorskip("sklearn")
    from ctta.config import resolve
    from ctta.experiment import run_experiment

    cfg = resolve({"stream": {"name": "digits_ci", "init_classes": 5, "increment": 5, "train_per_class": 6,
                              "test_per_class": 3},
                   "strategy": {"name": "dualprompt", "pool_size": 4, "length": 2, "g_layers": [0],
                                "e_layers": [1]},
                   "backbone": {"name": "vit_tiny_patch16_224", "img_size": 8, "patch_size": 4, "depth": 2,
                                "embed_dim": 16, "num_heads": 2},
                   "run": {"device": "cpu", "out": str(tmp_path / "run")}})
    results = run_experiment(cfg, progress=False)
    res = next(iter(results.values()))
    assert (res.segments["kind"] == "eval").sum() == 2
