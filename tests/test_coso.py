"""CoSO: projected AdamW orthogonal to the historical subspace, frequent-directions sketch, energy threshold."""
from __future__ import annotations

import torch

import ctta
from ctta import strategies
from ctta.backbones import create
from ctta.strategies.common.fd_sketch import FrequentDirections, energy_rank
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
    assert energy_rank(sigma, 0.98) == 4 and energy_rank(sigma, 0.92) == 3 and energy_rank(sigma, 0.5) == 1
    assert energy_rank(sigma, 0.98, "below") == 3 and energy_rank(sigma, 0.5, "below") == 0  # the official count
    assert energy_rank(sigma, 1.0) == 4  # never a zero-energy direction
    assert energy_rank(torch.zeros(3), 0.98) == 0


def test_updates_after_a_task_have_no_component_in_the_historical_subspace():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8))
    opt = SubspaceAdamW([{"params": [w], "subspace": True}], lr=0.05, proj_rank=3, sketch_rank=6,
                        weight_decay=0.01)
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
    opt2 = SubspaceAdamW([{"params": [w], "subspace": True}], lr=0.05, proj_rank=3, sketch_rank=6)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.historical_basis(w), h2)


def test_only_the_selected_weights_and_the_head_change_and_old_directions_are_kept():
    s = strategies.create("coso", _vit(), proj_rank=4, sketch_rank=8, lr=0.01, fc_lr=0.01)
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
