"""L2P: prompt pool with learnable keys matched to the frozen ViT's [CLS] query, top-k prompts prepended to the
tokens, pull loss, session-masked cross-entropy; only prompts, keys and head learn."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ctta
from conftest import make_tiny, stripe_data, tiny_vit, two_session_stream
from ctta import strategies
from ctta.errors import ConfigError, UnsupportedError
from strategies.common.prompt_pool import PromptPool, frozen_query, pull_term, select_top_k

pytestmark = pytest.mark.usefixtures("one_thread")


_vit = tiny_vit


def _data(classes, n_per=8, seed=0):
    return stripe_data(classes, n_per, seed, size=16)


def _l2p(**hp):
    return strategies.create("l2p", _vit(), **{"pool_size": 6, "length": 2, "top_k": 3, **hp})


def _session(s, x, y, batch=8):
    for i in range(0, len(y), batch):
        s.learn(x[i:i + batch], y[i:i + batch])
    s.close_session()


def test_top_k_selection_on_hand_made_queries_and_keys():
    keys = torch.eye(4) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]  # norms do not matter: cosine
    q = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.9], [0.0, 0.0, 1.0, 0.2]])
    sim = F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T
    assert select_top_k(sim, 2).tolist() == [[0, 1], [2, 3], [2, 3]]
    assert select_top_k(sim, 1).tolist() == [[0], [2], [2]]
    # batchwise: the batch's most frequent choice(s) for every sample
    assert select_top_k(sim, 1, batchwise=True).tolist() == [[2], [2], [2]]
    pool = PromptPool(4, (2, 4), 4, top_k=1)
    with torch.no_grad():
        pool.keys.copy_(keys)
    prompts, idx, _ = pool(q)
    assert idx.tolist() == [[0], [2], [2]] and torch.equal(prompts[:, 0], pool.prompts[[0, 2, 2]])
    fixed = torch.tensor([[3], [3], [3]])
    assert pool(q, fixed)[1].tolist() == [[3], [3], [3]]
    with pytest.raises(ConfigError):
        PromptPool(4, (2, 4), 4, top_k=5)


def test_pull_loss_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    keys, q = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)
    idx = torch.tensor([[0, 2], [1, 4], [3, 3]])
    expected = sum(F.cosine_similarity(keys[j], q[i], dim=0) for i in range(3) for j in idx[i].tolist()) / 3
    torch.testing.assert_close(pull_term(keys, q, idx), expected)


def test_prompted_forward_is_cls_prompts_patches_with_the_cls_position_and_mean_of_prompts():
    s = _l2p(batchwise_prompt=False)
    x, _ = _data([0, 1], n_per=2)
    net = s.model.net
    q = frozen_query(s.model, x)
    assert torch.equal(q, net.forward_head(net.forward_features(s.model.normalize(x)), pre_logits=True))
    idx = s.pool.select(q)
    p = s.pool.prompts[idx].reshape(len(x), -1, 16)  # top_k x length prompt tokens
    t = net.patch_embed(s.model.normalize(x))
    cls = net.cls_token.expand(len(x), -1, -1) + net.pos_embed[:, :1]
    seq = torch.cat([cls, p + net.pos_embed[:, :1], t + net.pos_embed[:, 1:]], 1)
    out = net.norm(net.blocks(seq))
    expected = net.head(out[:, 1:1 + p.shape[1]].mean(1))
    torch.testing.assert_close(s.logits(x), expected)
    cls_head = copy.deepcopy(s)
    cls_head.head_type = "token"
    torch.testing.assert_close(cls_head.logits(x), net.head(out[:, 0]))
    s.prompt_pos = "none"  # the official JAX code: prompts without a positional embedding
    out = net.norm(net.blocks(torch.cat([cls, p, t + net.pos_embed[:, 1:]], 1)))
    torch.testing.assert_close(s.logits(x), net.head(out[:, 1:1 + p.shape[1]].mean(1)))


def test_a_step_minimises_session_masked_ce_minus_the_pull_term_with_adam():
    s = _l2p(lr=0.01, pull_constraint_coeff=0.5)
    x0, y0 = _data([0, 1], seed=0)
    _session(s, x0, y0)
    x1, y1 = _data([2, 3], seed=1)
    ref = copy.deepcopy(s)
    s.learn(x1[:8], y1[:8])
    # by hand: logits with classes 0, 1 (previous) and unseen ones masked, CE - 0.5 * pull, a fresh Adam
    params = [ref.pool.prompts, ref.pool.keys] + ref.head
    opt = torch.optim.Adam(params, lr=0.01)
    q = frozen_query(ref.model, x1[:8])
    with torch.enable_grad():
        logits, pull = ref.prompted(x1[:8], q, True)
        masked = logits.clone()
        masked[:, :2] = float("-inf")
        loss = F.cross_entropy(masked, y1[:8]) - 0.5 * pull
        loss.backward()
    opt.step()
    for a, b in zip(s.trainable_parameters(), params):
        torch.testing.assert_close(a, b)
    assert torch.equal(s.head[0][:2], ref.head[0][:2])  # previous classes' rows untouched by this session


def test_backbone_never_changes_only_prompts_keys_and_head_learn():
    s = _l2p()
    learnable = {id(p) for p in s.trainable_parameters()}
    frozen = {n: p.detach().clone() for n, p in s.model.named_parameters() if id(p) not in learnable}
    before = [p.detach().clone() for p in s.trainable_parameters()]
    for k, cls in enumerate([[0, 1], [2, 3]]):
        _session(s, *_data(cls, seed=k))
    assert all(torch.equal(p, frozen[n]) for n, p in s.model.named_parameters() if n in frozen)
    assert all(not torch.equal(a, b) for a, b in zip(before, s.trainable_parameters()))
    assert sum(p.numel() for p in s.trainable_parameters()) == 6 * 2 * 16 + 6 * 16 + 4 * 16 + 4
    assert {id(p) for p in s.model.parameters() if p.requires_grad} == {id(p) for p in s.head}


def test_deterministic_under_a_seed_and_reset_restores_the_initial_state():
    x, y = _data([0, 1])
    a, b, c = _l2p(seed=3), _l2p(seed=3), _l2p(seed=4)
    assert torch.equal(a.pool.prompts, b.pool.prompts) and not torch.equal(a.pool.keys, c.pool.keys)
    initial = copy.deepcopy(a.state_dict())
    _session(a, x, y)
    _session(b, x, y)
    assert torch.equal(a.predict(x), b.predict(x))
    resumed = _l2p(seed=3)
    resumed.load_checkpoint_state(copy.deepcopy(b.checkpoint_state()))  # Adam moments and sessions carried
    x1, y1 = _data([2, 3], seed=1)
    b.learn(x1[:8], y1[:8])
    resumed.learn(x1[:8], y1[:8])
    assert all(torch.equal(p, q) for p, q in zip(b.trainable_parameters(), resumed.trainable_parameters()))
    a.reset()
    assert all(torch.equal(v, initial[k]) for k, v in a.state_dict().items())
    with pytest.raises(ConfigError):
        _l2p(head_type="gap")
    with pytest.raises(UnsupportedError, match="timm VisionTransformer"):
        strategies.create("l2p", make_tiny())


def test_l2p_runs_a_two_session_stream_in_the_engine():
    s = _l2p()
    res = ctta.run(two_session_stream(_data, n_eval=4, batch=8), s, device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all() and s.sessions.session == 1


def test_l2p_runs_from_a_ctta_bench_config(tmp_path):
    pytest.importorskip("sklearn")
    from ctta.config import resolve
    from ctta.experiment import run_experiment

    cfg = resolve({"stream": {"name": "digits_ci", "init_classes": 5, "increment": 5, "train_per_class": 6,
                              "test_per_class": 3},
                   "strategy": {"name": "l2p", "pool_size": 4, "length": 2, "top_k": 2},
                   "backbone": {"name": "vit_tiny_patch16_224", "img_size": 8, "patch_size": 4, "depth": 1,
                                "embed_dim": 16, "num_heads": 2},
                   "run": {"device": "cpu", "out": str(tmp_path / "run")}})
    results = run_experiment(cfg, progress=False)
    res = next(iter(results.values()))
    assert (res.segments["kind"] == "eval").sum() == 2
