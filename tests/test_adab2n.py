"""AdaB²N: BatchNorm replacement, the layer against nn.BatchNorm2d, task-weighted statistics, modified momentum,
the regulariser and its gradient, refusal of LayerNorm models, task ids through the replay buffer, engine runs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ctta
from ctta.engine import run as engine_run
from conftest import make_tiny, quadrant_data
from ctta import strategies
from ctta.errors import UnsupportedError
from ctta.streams.base import Stream, tensor_segment
from ctta.strategies.common.adab2n_norm import AdaB2NBatchNorm, adab2n_layers, replace_batchnorm
from ctta.strategies.common.replay import ReservoirBuffer
from torch.nn.modules.batchnorm import _BatchNorm


def _bn_pair(kappa=1.0, momentum=0.1, c=5):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return bn, AdaB2NBatchNorm.from_batchnorm(copy.deepcopy(bn), kappa=kappa, num_tasks=3)


def _two_task_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 3, 3, generator=g)
    x[4:] += 2.0  # the two samples of task 1 sit elsewhere
    return x, torch.tensor([0, 0, 0, 0, 1, 1])


# ---- replacement -------------------------------------------------------------------------------------------------

def test_every_batchnorm_is_replaced_and_its_state_kept():
    m = ctta.backbones.create("resnet18_reduced", num_classes=10, nf=4)
    before = [(n, mod.running_mean.clone()) for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(before) == 20  # stem + 8 blocks x 2 + 3 projection shortcuts
    layers = replace_batchnorm(m, kappa=0.5)
    after = dict(m.named_modules())
    assert len(layers) == len(before) == len(adab2n_layers(m))
    assert not any(type(mod) is nn.BatchNorm2d for mod in m.modules())
    assert sum(isinstance(mod, _BatchNorm) for mod in m.modules()) == len(before)
    for name, rm in before:
        assert isinstance(after[name], AdaB2NBatchNorm) and torch.equal(after[name].running_mean, rm)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_layernorm_model_is_refused_in_one_line():
    vit = ctta.backbones.create("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=1,
                                embed_dim=32, num_heads=2)
    with pytest.raises(UnsupportedError) as e:
        strategies.create("adab2n", vit)
    msg = str(e.value)
    assert "\n" not in msg and "BatchNorm" in msg and "LayerNorm" in msg


# ---- the layer ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [None, "one_task", "balanced"])
def test_uniform_weights_and_plain_momentum_equal_batchnorm(ids):
    bn, ada = _bn_pair(kappa=1.0)
    g = torch.Generator().manual_seed(2)
    bn.train(), ada.train()
    for step in range(4):
        x = torch.randn(8, 5, 4, 4, generator=g) * 2 + 0.3 * step
        if ids == "one_task":  # the first task, every sample in it: weights 1/N
            ada.set_tasks(torch.zeros(8, dtype=torch.long), torch.tensor([8.0]))
        elif ids == "balanced":  # equal counts and equal priors: pi_t / n_t = 1/N
            ada.set_tasks(torch.arange(8) % 2, torch.tensor([4.0, 4.0]))
        assert torch.allclose(ada(x), bn(x), atol=1e-6)
        assert torch.allclose(ada.running_mean, bn.running_mean, atol=1e-6)
        assert torch.allclose(ada.running_var, bn.running_var, atol=1e-6)
    bn.eval(), ada.eval()
    x = torch.randn(3, 5, 4, 4, generator=g)
    assert torch.allclose(ada(x), bn(x), atol=1e-6)


def test_task_weights_change_batch_statistics_as_the_formula_says():
    x, ids = _two_task_batch()
    ada = AdaB2NBatchNorm(4, num_tasks=3)
    with torch.no_grad():
        ada.task_weight.copy_(torch.tensor([0.5, 1.5, 9.0]))  # task 2 is not in the batch: no say
    ada.train()
    ada.set_tasks(ids, torch.tensor([4.0, 2.0]))
    mean, var = ada.batch_statistics(x)
    a0, a1 = torch.exp(torch.tensor(0.5)) + 4, torch.exp(torch.tensor(1.5)) + 2  # Dirichlet posterior
    p0, p1 = a0 / (a0 + a1), a1 / (a0 + a1)
    m0, m1 = x[:4].mean(dim=(0, 2, 3)), x[4:].mean(dim=(0, 2, 3))
    exp_mean = p0 * m0 + p1 * m1
    d = (x - exp_mean.view(1, -1, 1, 1)).square()
    exp_var = p0 * d[:4].mean(dim=(0, 2, 3)) + p1 * d[4:].mean(dim=(0, 2, 3))
    assert torch.allclose(mean, exp_mean, atol=1e-6) and torch.allclose(var, exp_var, atol=1e-6)
    plain_var, plain_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert not torch.allclose(mean, plain_mean, atol=1e-3)  # task 1 gets more than its 2/6 share
    # the output is normalised with those statistics, and the task weights get a gradient through it
    out = ada(x)
    ref = (x - exp_mean.view(1, -1, 1, 1)) / torch.sqrt(exp_var.view(1, -1, 1, 1) + ada.eps)
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().mul(torch.arange(4.0).view(1, -1, 1, 1)).sum().backward()
    assert ada.task_weight.grad[:2].abs().sum() > 0 and ada.task_weight.grad[2] == 0


def test_a_task_absent_from_the_batch_keeps_its_prior_mass_as_the_official_formula():
    # official models/utils/adab2n.py: concentration = exp(w[:T+1]) + counts (0 for an absent task),
    # task_weights = concentration / concentration.sum(), sample weight = task_weights[t] / n_t
    x, _ = _two_task_batch()
    ids = torch.tensor([0, 0, 0, 0, 2, 2])  # tasks 0 and 2 in the batch, task 1 (seen before) absent
    ada = AdaB2NBatchNorm(4, num_tasks=3)
    with torch.no_grad():
        ada.task_weight.copy_(torch.tensor([0.5, 2.0, 1.5]))
    ada.train()
    ada.set_tasks(ids, torch.tensor([4.0, 0.0, 2.0]))
    e = torch.exp(torch.tensor([0.5, 2.0, 1.5]))
    a0, a1, a2 = e[0] + 4, e[1] + 0, e[2] + 2
    total = a0 + a1 + a2  # the absent task's exp(w_1) stays in the denominator
    w = torch.tensor([a0 / total / 4] * 4 + [a2 / total / 2] * 2)
    assert torch.allclose(ada.sample_weights(ids, torch.tensor([4.0, 0.0, 2.0])), w, atol=1e-7)
    assert float(w.sum()) < 0.9  # less than one: nothing renormalised
    mean, var = ada.batch_statistics(x)
    exp_mean = (x.mean(dim=(2, 3)) * w.view(-1, 1)).sum(0)
    exp_var = ((x - exp_mean.view(1, -1, 1, 1)).square().mean(dim=(2, 3)) * w.view(-1, 1)).sum(0)
    assert torch.allclose(mean, exp_mean, atol=1e-6) and torch.allclose(var, exp_var, atol=1e-6)
    # renormalising over the present tasks (the old behaviour) gives other statistics
    renorm = torch.tensor([a0 / (a0 + a2) / 4] * 4 + [a2 / (a0 + a2) / 2] * 2)
    assert not torch.allclose(mean, (x.mean(dim=(2, 3)) * renorm.view(-1, 1)).sum(0), atol=1e-3)


def test_modified_momentum_recursion():
    m, kappa = 0.1, 0.5
    ada = AdaB2NBatchNorm(2, momentum=m, kappa=kappa).train()
    etas, expected = [], []
    e = None
    for _ in range(4):
        ada(torch.randn(4, 2, 2, 2))
        etas.append(float(ada.eta))
        e = m ** kappa if e is None else e / (e + (1 - m) ** kappa)
        expected.append(e)
    assert etas == pytest.approx(expected, rel=1e-6)
    cum = AdaB2NBatchNorm(2, momentum=m, kappa=0.0).train()  # kappa = 0: the cumulative average 1/k
    for k in range(1, 4):
        cum(torch.randn(4, 2, 2, 2))
        assert float(cum.eta) == pytest.approx(1.0 / k)


def test_regulariser_zero_at_running_stats_and_its_gradient():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 2, 2, generator=g)
    n = x.numel() // x.shape[1]
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    ada = AdaB2NBatchNorm(3, momentum=0.3).train()
    with torch.no_grad():
        ada.running_mean.copy_(mean)
        ada.running_var.copy_(var * n / (n - 1))
    ada(x)
    assert float(ada.reg_loss) == pytest.approx(0.0, abs=1e-10)

    ada = AdaB2NBatchNorm(3, momentum=0.3).train()
    rm, rv = torch.tensor([0.5, -0.2, 0.1]), torch.tensor([0.7, 1.3, 2.0])
    with torch.no_grad():
        ada.running_mean.copy_(rm)
        ada.running_var.copy_(rv)
    xg = x.clone().requires_grad_(True)
    ada(xg)
    ada.reg_loss.backward()
    # hand formula: R = mean_c (mu_c - r'_c)^2 + mean_c (c_n var_c - v'_c)^2, r', v' the updated (constant) stats
    eta, c, C = 0.3, n / (n - 1), 3
    r_new, v_new = (1 - eta) * rm + eta * mean, (1 - eta) * rv + eta * c * var
    dmu = 2 * (mean - r_new) / C
    dvar = 2 * (c * var - v_new) * c / C
    grad = (dmu.view(1, -1, 1, 1) / n + dvar.view(1, -1, 1, 1) * 2 * (x - mean.view(1, -1, 1, 1)) / n)
    assert torch.allclose(xg.grad, grad, atol=1e-6)
    expected = F.mse_loss(mean, r_new) + F.mse_loss(c * var, v_new)
    assert float(ada.reg_loss.detach()) == pytest.approx(float(expected), rel=1e-5)


# ---- task ids through the buffer ------------------------------------------------------------------------------

def test_buffer_keeps_task_ids_and_old_states_load():
    buf = ReservoirBuffer(6)
    g = torch.Generator().manual_seed(0)
    buf.add(torch.zeros(4, 1), torch.arange(4), g)  # task 0 (default)
    buf.task = 1
    buf.add(torch.ones(4, 1), torch.arange(4, 8), g)
    buf.add(torch.ones(2, 1), torch.arange(8, 10), g, task=torch.tensor([5, 6]))
    x, y = buf.items()
    t = buf.tasks()
    expect = torch.where(y < 4, 0, torch.where(y < 8, 1, y - 3))
    assert torch.equal(t, expect)
    bx, by, bt = buf.sample_with_tasks(4, g)
    assert torch.equal(bt, torch.where(by < 4, 0, torch.where(by < 8, 1, by - 3)))
    by2 = buf.sample(3, g)[1]
    assert torch.equal(buf.last_tasks, torch.where(by2 < 4, 0, torch.where(by2 < 8, 1, by2 - 3)))
    state = buf.state()
    del state["t"]  # a state written before task ids existed
    other = ReservoirBuffer(6)
    other.load_state(state)
    assert torch.equal(other.tasks(), torch.zeros(6, dtype=torch.long))


def _data(classes, n_per=10, seed=0):
    return quadrant_data(classes, n_per, seed)


def _online_stream():
    segs, seen = [], []
    for k, cls in enumerate([[0, 1], [2, 3], [0 + 4, 5]]):
        x, y = _data(cls, seed=k)
        segs.append(tensor_segment(f"session-{k}", "train", x, y, 10, role="session", meta={"classes": cls}))
        seen += cls
        xt, yt = _data(seen, n_per=4, seed=10 + k)
        segs.append(tensor_segment(f"eval@session-{k}", "eval", xt, yt, 32, role="probe",
                                   meta={"after": f"session-{k}"}))
    return Stream("tiny_online", segs, num_classes=6, setting="online_class_incremental", spec={"name": "tiny_online"})


def test_layers_see_the_task_of_every_sample_including_replayed():
    s = strategies.create("adab2n", make_tiny(num_classes=6), replay_batch_size=8)
    seen_ids = []
    hook = s._norms[0].register_forward_pre_hook(lambda mod, a: seen_ids.append(mod.task_ids.clone()))
    replayed_labels = []
    draw = s.buffer.sample_with_tasks

    def recording_draw(k, generator=None):
        out = draw(k, generator)
        replayed_labels.append(out[1].clone())
        return out

    s.buffer.sample_with_tasks = recording_draw
    for k, cls in enumerate([[0, 1], [2, 3], [4, 5]]):
        x, y = _data(cls, seed=k)
        for i in range(0, 20, 10):
            s.learn(x[i:i + 10], y[i:i + 10])
        s.segment_end(type("Seg", (), {"kind": "train"})())
    hook.remove()
    assert [int(t.shape[0]) for t in seen_ids] == [10, 10, 18, 18, 18, 18]
    assert torch.equal(seen_ids[0], torch.zeros(10, dtype=torch.long))
    assert torch.equal(seen_ids[2][:10], torch.ones(10, dtype=torch.long)) and (seen_ids[2][10:] == 0).all()
    assert len(replayed_labels) == 4
    for ids, labels in zip(seen_ids[2:], replayed_labels):  # classes 2k, 2k+1 are task k here
        assert torch.equal(ids[10:], labels // 2)
    assert (seen_ids[-1][:10] == 2).all()
    assert torch.equal(s.buffer.tasks(), s.buffer.items()[1] // 2)  # class pairs = tasks here
    assert all(m.task_ids is None for m in s._norms)  # cleared after the step


def test_regulariser_enters_the_loss_from_the_second_task():
    s = strategies.create("adab2n", make_tiny(num_classes=6), lambd=1000.0)
    x, y = _data([0, 1])
    s.learn(x[:10], y[:10])
    logits = torch.zeros(10, 6)
    base = strategies.STRATEGIES.get("er_ace").loss(s, logits, y[:10], 10)
    assert torch.allclose(s.loss(logits, y[:10], 10), base)  # first task: plain ER-ACE
    s.segment_end(type("Seg", (), {"kind": "train"})())
    x, y = _data([2, 3], seed=1)
    s.learn(x[:10], y[:10])
    reg = s.regulariser()
    assert float(reg.detach()) > 0
    ytot = y[:10]
    assert torch.allclose(s.loss(logits, ytot, 10), strategies.STRATEGIES.get("er_ace").loss(s, logits, ytot, 10)
                          + 1000.0 * reg)


def test_one_forward_of_incoming_and_replayed_as_er_ace_ada():
    s = strategies.create("adab2n", make_tiny(num_classes=6))
    x, y = _data([0, 1])
    s.learn(x[:10], y[:10])
    s.segment_end(type("Seg", (), {"kind": "train"})())
    sizes = []
    hook = s.model.register_forward_pre_hook(lambda mod, a: sizes.append(int(a[0].shape[0])))
    x, y = _data([2, 3], seed=1)
    s.learn(x[:10], y[:10])
    hook.remove()
    assert sizes == [20]  # 10 incoming + 10 replayed (the paper's replay batch), one forward


def test_defaults_are_the_papers_online_setting():
    import inspect

    from ctta.config import strategy_defaults

    for name in ("adab2n", "er_ace"):
        hp = strategy_defaults(name)
        assert hp["lr"] == 0.03 and hp["replay_batch_size"] == 10 and hp["momentum"] == 0.0, name
        sig = inspect.signature(strategies.STRATEGIES.get(name).__init__).parameters
        assert sig["lr"].default == 0.03 and sig["replay_batch_size"].default == 10, name
    for spec in ("cifar10_online", "cifar100_online"):
        assert ctta.config.stream_defaults(spec)["batch_size"] == 10  # the incoming batch
    s = strategies.create("adab2n", make_tiny(num_classes=6))
    assert s.optimizer.param_groups[0]["lr"] == 0.03 and s.replay_batch_size == 10


# ---- end to end --------------------------------------------------------------------------------------------------

def _run(seed):
    stream = _online_stream()
    s = strategies.create("adab2n", make_tiny(seed=seed, num_classes=6), seed=seed, buffer_size=20)
    return s, engine_run(stream, s, device="cpu", progress=False)


def test_online_stream_runs_end_to_end_and_is_deterministic():
    s, res = _run(0)
    assert res.summary["strategy"] == "adab2n"
    assert s.sessions.session == 2 and len(s.buffer) == 20
    assert set(s.buffer.tasks().tolist()) <= {0, 1, 2}
    w = [m.task_weight.detach().clone() for m in s._norms]
    assert any((t[:3] != 0).any() for t in w)  # task weights were trained
    assert all((t[3:] == 0).all() for t in w)  # unused tasks untouched
    s2, res2 = _run(0)
    for a, b in zip(s.state_dict().values(), s2.state_dict().values()):
        assert torch.equal(a, b)
    assert res.summary.get("final_accuracy") == res2.summary.get("final_accuracy")


def test_checkpoint_state_round_trip_keeps_eta_and_buffer_tasks():
    s, _ = _run(1)
    state = copy.deepcopy(s.checkpoint_state())
    fresh = strategies.create("adab2n", make_tiny(seed=1, num_classes=6), seed=1, buffer_size=20)
    fresh.load_checkpoint_state(state)
    assert torch.equal(fresh.buffer.tasks(), s.buffer.tasks())
    assert all(torch.equal(a.eta, b.eta) for a, b in zip(fresh._norms, s._norms))
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(fresh.predict(x), s.predict(x))
