"""CoSO: projected AdamW orthogonal to the historical subspace, frequent-directions sketch, energy threshold."""
from __future__ import annotations

import pytest
import torch

import ctta
from ctta import strategies
from ctta.backbones import create
from ctta.strategies.common.fd_sketch import FrequentDirections, energy_rank, fd_update
from ctta.strategies.coso import epoch_cosine
from ctta.strategies.common.subspace import SubspaceAdamW
from test_lae import _ci_stream, _data, _vit


def test_frequent_directions_error_bound_on_a_random_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 200, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 30, dtype=torch.float64)[:, None]
    for rank in (4, 10):
        fd = FrequentDirections(rank)
        for i in range(0, 200, 17):  # column blocks of uneven width
            fd.update(a[:, i:i + 17])
        b = fd.sketch
        err = a @ a.T - b @ b.T
        assert torch.linalg.eigvalsh(err).min() > -1e-8  # one-sided: A A^T >= B B^T
        assert torch.linalg.matrix_norm(err, 2) <= a.square().sum() / (rank + 1) + 1e-8
    fd = FrequentDirections(40)  # rank above the dimension: exact
    fd.update(a)
    assert torch.allclose(fd.sketch @ fd.sketch.T, a @ a.T, atol=1e-8)


def test_energy_threshold_counts_the_directions_below_the_cumulative_share():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])  # energies 16, 4, 1, 1, 0 of 22
    # cumulative shares 0.727, 0.909, 0.955, 1.0, 1.0
    # the default is the official count sum(cumsum(share) < threshold)
    assert energy_rank(sigma, 0.98) == 3 and energy_rank(sigma, 0.92) == 2 and energy_rank(sigma, 0.5) == 0
    assert energy_rank(sigma, 0.98, "reach") == 4 and energy_rank(sigma, 0.92, "reach") == 3
    assert energy_rank(sigma, 0.5, "reach") == 1
    assert energy_rank(sigma, 1.0, "reach") == 4  # never a zero-energy direction
    assert energy_rank(torch.zeros(3), 0.98) == 0 and energy_rank(torch.zeros(3), 0.98, "reach") == 0
    # the optimiser's task end (CoSO's default rule) adds exactly that many directions of a hand-made sketch
    w = torch.nn.Parameter(torch.zeros(8, 3))
    opt = SubspaceAdamW([{"params": [w], "subspace": True}], proj_rank=2, sketch_rank=5)
    basis = torch.linalg.qr(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)))[0]
    opt.state[w].update(step=3, fd_basis=basis, fd_sigma=sigma)
    assert opt.end_task(0.98) == {"0.0": 3}
    assert torch.allclose(opt.historical_basis(w).abs(), basis[:, :3].abs(), atol=1e-6)
    # one dominant direction (99 % of the energy): the official count keeps none, H exists and is empty
    w2 = torch.nn.Parameter(torch.zeros(8, 3))
    opt = SubspaceAdamW([{"params": [w2], "subspace": True}], proj_rank=2, sketch_rank=5)
    opt.state[w2].update(step=1, fd_basis=basis, fd_sigma=torch.tensor([10.0, 1.0, 0.0, 0.0, 0.0]))
    assert opt.end_task(0.98) == {"0.0": 0} and opt.historical_basis(w2).shape == (8, 0)
    w2.grad = torch.ones(8, 3)
    opt.step()  # an empty H projects nothing away
    assert bool((w2 != 0).all())
    assert strategies.create("coso", _vit()).energy_rule == "below"


@pytest.mark.parametrize("orthonormalize, weight_decay", [(False, 0.0), (True, 0.01)])
def test_updates_after_a_task_have_no_component_in_the_historical_subspace(orthonormalize, weight_decay):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8))
    opt = SubspaceAdamW([{"params": [w], "subspace": True}], lr=0.05, proj_rank=3, sketch_rank=6,
                        weight_decay=weight_decay, orthonormalize=orthonormalize)
    x1 = torch.randn(64, 8)
    t1 = torch.randn(64, 12) @ torch.diag(torch.linspace(2, 0.0, 12))  # task 1 uses mostly the first outputs
    for _ in range(10):
        ((x1 @ w.T - t1) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    dims = opt.end_task(0.98)
    h = opt.historical_basis(w)
    assert 0 < dims["0.0"] == h.shape[1] < 12
    assert torch.allclose(h.T @ h, torch.eye(h.shape[1]), atol=1e-5)
    assert "exp_avg" not in opt.state[w] and opt.state[w]["step"] == 0
    t2 = torch.randn(64, 12)  # task 2 pulls every direction
    for _ in range(10):
        before = w.detach().clone()
        ((x1 @ w.T - t2) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        delta = w.detach() - before
        assert delta.abs().max() > 1e-4 and (h.T @ delta).abs().max() < 1e-5
    # a second task end grows the historical subspace, still orthonormal
    opt.end_task(0.98)
    h2 = opt.historical_basis(w)
    assert h2.shape[1] > h.shape[1] and torch.allclose(h2.T @ h2, torch.eye(h2.shape[1]), atol=1e-5)
    # the state is all tensors: a state dict round trip keeps it
    opt2 = SubspaceAdamW([{"params": [w], "subspace": True}], lr=0.05, proj_rank=3, sketch_rank=6,
                         orthonormalize=orthonormalize)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.historical_basis(w), h2)


def test_only_the_selected_weights_and_the_head_change_and_old_directions_are_kept():
    s = strategies.create("coso", _vit(), proj_rank=4, sketch_rank=8, lr=0.01, fc_lr=0.01, threshold=0.999)
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    assert s.target_names == ["net.blocks.0.attn.proj.weight", "net.blocks.1.attn.proj.weight"]
    assert sum(p.numel() for p in s.trainable_parameters()) == 2 * 16 * 16 + 16 * 4 + 4
    for k, cls in enumerate([[0, 1], [2, 3]]):
        x, y = _data(cls, seed=k)
        for i in range(0, len(y), 8):
            s.learn(x[i:i + 8], y[i:i + 8])
        s.close_session()
        if k == 0:
            mid = {n: p.detach().clone() for n, p in s.model.named_parameters()}
            hist0 = [s.optimizer.historical_basis(p).clone() for p in s.targets]
    after = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(s.target_names) | set(s.head_names)
    for n, h in zip(s.target_names, hist0):
        assert h.shape[1] > 0 and (h.T @ (after[n] - mid[n])).abs().max() < 1e-5
    # the head rows of session 0's classes did not move in session 1
    w = s.model.get_submodule("net.head").weight
    assert torch.equal(w[:2], mid["net.head.weight"][:2])


def test_coso_runs_a_two_session_class_incremental_stream():
    s = strategies.create("coso", _vit())
    res = ctta.run(_ci_stream(), s, device="cpu", progress=False)
    evals = res.segments[res.segments["kind"] == "eval"]
    assert len(evals) == 2 and evals["accuracy"].between(0, 1).all()
    assert s.sessions.session == 1
    assert all(s.optimizer.historical_basis(p) is not None for p in s.targets)


def _hand_made(values, columns, u):
    """A 8 x 4 matrix whose singular values ``values`` lie on the columns ``columns`` of the orthonormal ``u``."""
    v = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    return sum(val * torch.outer(u[:, c], v[:, i]) for i, (val, c) in enumerate(zip(values, columns)))


def test_sketch_shrinks_each_gradient_by_its_own_next_singular_value_before_merging():
    u = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    g1 = _hand_made([5.0, 4.0, 3.0, 2.0], [0, 1, 2, 3], u)   # energies 25, 16, 9, 4 on u0..u3
    g2 = _hand_made([3.0, 2.0, 1.0], [2, 3, 0], u)           # energies 9, 4, 1 on u2, u3, u0
    # first block, rank 2: sigma_i^2 - sigma_3^2 = 25 - 9, 16 - 9 (both variants)
    for shrink in (True, False):
        b, s = fd_update(None, None, g1, 2, shrink_block=shrink)
        assert torch.allclose(s, torch.tensor([4.0, 7.0 ** 0.5], dtype=torch.float64))
        assert torch.allclose((b.T @ u[:, :2]).abs(), torch.eye(2, dtype=torch.float64), atol=1e-10)
    b1, s1 = fd_update(None, None, g1, 2, shrink_block=True)
    # official DoubleSVD: g2 -> sqrt(9 - 1) on u2, sqrt(4 - 1) on u3; merged energies u0 16, u1 7, u2 8, u3 3
    # -> top two u0, u2 shrunk by the third (7): sqrt(9), sqrt(1)
    b, s = fd_update(b1, s1, g2, 2, shrink_block=True)
    assert torch.allclose(s, torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert torch.allclose((b.T @ u[:, [0, 2]]).abs(), torch.eye(2, dtype=torch.float64), atol=1e-10)
    # textbook frequent directions merges g2 whole: energies u0 17, u1 7, u2 9, u3 4 -> sqrt(10), sqrt(2)
    b, s = fd_update(b1, s1, g2, 2, shrink_block=False)
    assert torch.allclose(s, torch.tensor([10.0 ** 0.5, 2.0 ** 0.5], dtype=torch.float64))
    # the optimiser sketches the same way (reusing the SVD it takes for its projector), by default
    for shrink, expected in ((True, [3.0, 1.0]), (False, [10.0 ** 0.5, 2.0 ** 0.5])):
        w = torch.nn.Parameter(torch.zeros(8, 4, dtype=torch.float64))
        opt = SubspaceAdamW([{"params": [w], "subspace": True}], proj_rank=2, sketch_rank=2, shrink_block=shrink)
        for g in (g1, g2):
            w.grad = g.clone()
            opt.step()
        assert torch.allclose(opt.state[w]["fd_sigma"], torch.tensor(expected, dtype=torch.float64))


def test_learning_rate_follows_the_official_scheduler_as_its_learner_steps_it():
    import math

    from ctta.streams.base import tensor_segment

    # models/coso.py builds CosineSchedule per task (epoch-0 rate, then last_epoch reset to -1) and steps it after
    # each epoch: epochs 0 and 1 at the base rate, epoch e >= 1 at cos(99 pi (e - 1) / (200 (K - 1)))
    assert epoch_cosine(0, 20) == epoch_cosine(1, 20) == 1.0 and epoch_cosine(0, 1) == 1.0
    assert epoch_cosine(19, 20) == pytest.approx(math.cos(99 * math.pi * 18 / 3800)) == pytest.approx(0.0974, abs=1e-4)
    assert epoch_cosine(11, 21) == pytest.approx(math.cos(99 * math.pi / 400))
    assert epoch_cosine(0, 2) == epoch_cosine(1, 2) == 1.0
    s = strategies.create("coso", _vit(), proj_rank=2, sketch_rank=4)
    x, y = _data([0, 1])  # 16 samples, 4 epochs in one train segment (as the incremental streams build them)
    seg = tensor_segment("session-0", "train", x.repeat(4, 1, 1, 1), y.repeat(4), 6, role="session",
                         meta={"classes": [0, 1], "epochs": 4})
    lrs = []
    xs, ys = seg.materialise(torch.device("cpu"))[:2]
    s.segment_start(seg)  # what the engine does around a train segment
    for i in range(0, seg.num_samples, seg.batch_size):
        s.learn(xs[i:i + 6], ys[i:i + 6])
        lrs.append([g["lr"] for g in s.optimizer.param_groups])
    s.segment_end(seg)
    # batches of 6 start at samples 0, 6, ..., 60: epochs floor(start / 16); constant within an epoch
    epochs = [start // 16 for start in range(0, 64, 6)]
    assert epochs == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3] and len(lrs) == len(epochs)
    for (fc, lr), e in zip(lrs, epochs):
        factor = math.cos(99 * math.pi * max(e - 1, 0) / (200 * 3))
        assert fc == pytest.approx(5e-4 * factor) and lr == pytest.approx(3e-4 * factor)
    assert lrs[5] == pytest.approx([5e-4, 3e-4])                                       # epoch 1: still the base
    assert lrs[-1] == pytest.approx([5e-4 * math.cos(0.33 * math.pi), 3e-4 * math.cos(0.33 * math.pi)])  # last
    off = strategies.create("coso", _vit(), cosine=False)
    off.segment_start(seg)
    off.learn(x[:6], y[:6])
    assert [g["lr"] for g in off.optimizer.param_groups] == pytest.approx([5e-4, 3e-4])


def test_fresh_head_is_drawn_as_nn_linear_default_init_from_the_seed_and_reset_restores_it():
    model = _vit()
    trained = model.net.head.weight.detach().clone()
    s = strategies.create("coso", model, seed=3)
    w, b = s.head_layer.weight.detach().clone(), s.head_layer.bias.detach().clone()
    bound = 1 / 16 ** 0.5  # width 16
    assert not torch.equal(w, trained) and w.abs().max() <= bound and b.abs().max() <= bound
    assert w.std() > 0.4 * bound and b.abs().max() > 0  # uniform on +-bound (std bound / sqrt 3), bias drawn too
    assert torch.equal(strategies.create("coso", _vit(), seed=3).head_layer.weight, w)      # from the seed
    assert not torch.equal(strategies.create("coso", _vit(), seed=4).head_layer.weight, w)
    assert torch.equal(strategies.create("coso", _vit(), head_init="keep").head_layer.weight, trained)
    x, y = _data([0, 1])
    s.learn(x[:8], y[:8])
    assert not torch.equal(s.head_layer.weight, w)
    s.reset()
    assert torch.equal(s.head_layer.weight, w) and torch.equal(s.head_layer.bias, b)


def test_training_loss_is_the_session_rows_cross_entropy_in_the_streams_class_order():
    from ctta.streams.base import tensor_segment
    import torch.nn.functional as F

    x, y = _data([1, 3])
    seg = tensor_segment("session-0", "train", x, y, 8, role="session", meta={"classes": [3, 1], "epochs": 1})
    a = strategies.create("coso", _vit(), proj_rank=2, sketch_rank=4)
    head = {n: p.detach().clone() for n, p in a.model.net.head.named_parameters()}
    a.segment_start(seg)
    with torch.no_grad():  # the official task head: a 2-row linear layer (rows of classes 3 and 1), targets 0 / 1
        feats = a.model.forward_features(x[:8])
        expect = F.cross_entropy(F.linear(feats, head["weight"][[3, 1]], head["bias"][[3, 1]]) / 3.0,
                                 (y[:8] == 1).long())
    seen = []
    backward = torch.Tensor.backward
    torch.Tensor.backward = lambda t, *k, **kw: (seen.append(t.detach().clone()), backward(t, *k, **kw))[1]
    try:
        a.learn(x[:8], y[:8])
    finally:
        torch.Tensor.backward = backward
    assert torch.allclose(seen[0], expect, atol=1e-6)
    other = [0, 2]  # the rows of the classes outside the session (4 outputs) get no gradient
    assert torch.equal(a.head_layer.weight[other], head["weight"][other])
    assert not torch.equal(a.head_layer.weight[[1, 3]], head["weight"][[1, 3]])
    # the masked full-head path (outside the engine: no segment classes) gives the same loss
    b = strategies.create("coso", _vit(), proj_rank=2, sketch_rank=4)
    torch.Tensor.backward = lambda t, *k, **kw: (seen.append(t.detach().clone()), backward(t, *k, **kw))[1]
    try:
        b.learn(x[:8], y[:8])
    finally:
        torch.Tensor.backward = backward
    assert torch.allclose(seen[1], expect, atol=1e-6)
    assert torch.allclose(a.head_layer.weight, b.head_layer.weight, atol=1e-6)


def test_task_end_appends_the_sketch_directions_as_they_are_as_the_official_code():
    w = torch.nn.Parameter(torch.zeros(8, 3))
    opt = SubspaceAdamW([{"params": [w], "subspace": True}], proj_rank=2, sketch_rank=5)
    basis = torch.linalg.qr(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)))[0]
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])
    opt.state[w].update(step=3, fd_basis=basis, fd_sigma=sigma)
    opt.end_task(0.98)
    assert torch.equal(opt.historical_basis(w), basis[:, :3])  # official: concatenated, not re-orthonormalised
    basis2 = torch.linalg.qr(torch.randn(8, 5, generator=torch.Generator().manual_seed(1)))[0]
    opt.state[w].update(step=3, fd_basis=basis2, fd_sigma=torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0]))
    opt.end_task(1.0)  # cumsum < 1.0: none of (1, 1, 1, 1, 1)
    opt.state[w].update(step=3, fd_basis=basis2, fd_sigma=sigma)
    opt.end_task(0.98)
    assert torch.equal(opt.historical_basis(w), torch.cat([basis[:, :3], basis2[:, :3]], dim=1))
