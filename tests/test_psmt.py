"""PSMT as released (JiaxuTian/PSMT ``classification/methods/psmt.py``, commit 2c74335): the source Fisher computed
once, the lowest-importance restore mask, the two-step teacher update and the teacher + student output, all against
a transcription of the released step; the shared ``source_data`` option; PSMT is not CoTTA. Then the paper-reading
variant (``variant: paper``): the Fisher-masked EMA, the penalty, determinism, reset."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctta import strategies
from ctta.errors import ConfigError, CttaError
from ctta.strategies.common import (
    DiagonalFisher,
    copy_or_ema_update_,
    ema_update_,
    fisher_penalty,
    frozen_copy,
    load_source_data,
    lowest_fraction_masks,
    masked_ema_update_,
    masked_restore_,
    source_fisher,
    symmetric_cross_entropy,
    top_fraction_masks,
    use_batch_statistics,
)

from conftest import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _source(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % 4


def _batches(k: int = 3, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(16, 3, 8, 8, generator=g) for _ in range(k)]


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _params(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _released(**kw) -> "strategies.Strategy":
    kw.setdefault("source_data", _source())
    kw.setdefault("fisher_batch", 16)
    return strategies.create("psmt", make_tiny(), **kw)


def _configured_tiny() -> nn.Module:
    """The released ``configure_model``: eval mode, BatchNorm on batch statistics, every parameter trainable."""
    m = make_tiny().eval().requires_grad_(True)
    use_batch_statistics(m)
    return m


# --- a transcription of the released code (JiaxuTian/PSMT classification/methods/psmt.py, 2c74335) ----------------
class _SymmetricCrossEntropy(nn.Module):
    def __init__(self, alpha=0.5):
        super().__init__()
        self.alpha = alpha

    def __call__(self, x, x_ema):
        return -(1 - self.alpha) * (x_ema.softmax(1) * x.log_softmax(1)).sum(1) - self.alpha * (
            x.softmax(1) * x_ema.log_softmax(1)).sum(1)


def _find_quantile(arr, perc):
    arr_sorted = torch.sort(arr).values
    frac_idx = perc * (len(arr_sorted) - 1)
    frac_part = frac_idx - int(frac_idx)
    low_idx = int(frac_idx)
    high_idx = low_idx + 1
    return arr_sorted[low_idx] + (arr_sorted[high_idx] - arr_sorted[low_idx]) * frac_part


def _update_ema_variables(ema_model, model, alpha_teacher):
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.data[:] = alpha_teacher * ema_param[:].data[:] + (1 - alpha_teacher) * param[:].data[:]
    return ema_model


def _update_ema_variables_two(ema_model, model, alpha_teacher, mask_list):
    for ema_param, param, mask in zip(ema_model.parameters(), model.parameters(), mask_list):
        ema_param.data = mask * param.data + (1 - mask) * (alpha_teacher * ema_param.data + (1 - alpha_teacher) * param.data)
    return ema_model


class _ReleasedPSMT:
    """forward_and_adapt of the released class, line for line (plain forwards where its views are plain copies)."""

    def __init__(self, fishers, mt=0.999, lr=1e-3, perc=0.03, lamb=500.0):
        self.model = _configured_tiny()
        self.model_ema = copy.deepcopy(self.model)
        for p in self.model_ema.parameters():
            p.detach_()
        self.model_states = [copy.deepcopy(self.model.state_dict())]
        params = [p for nm, m in self.model.named_modules() for npp, p in m.named_parameters()
                  if npp in ["weight", "bias"] and p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.fishers = {n: [f, self.model_states[0][n].clone()] for n, f in fishers.items()}
        self.sce, self.mt, self.perc, self.fisher_alpha = _SymmetricCrossEntropy(), mt, perc, lamb
        self.before_restore = None

    def __call__(self, imgs_test):
        self.optimizer.zero_grad()
        outputs_test = self.model(imgs_test)
        outputs_aug_test = self.model(imgs_test)  # released: the augmented features are overwritten by plain ones
        outputs_ema = self.model_ema(imgs_test)   # released: 32 plain teacher forwards averaged, or this one
        loss = (0.5 * self.sce(outputs_test, outputs_ema) + 0.5 * self.sce(outputs_aug_test, outputs_ema)).mean(0)
        ewc_loss = 0
        for name, param in self.model.named_parameters():
            if name in self.fishers:
                ewc_loss += self.fisher_alpha * (self.fishers[name][0] * (param - self.fishers[name][1]) ** 2).sum()
        loss += ewc_loss
        loss.backward()
        fisher_dict = {}
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters():
                if npp in ["weight", "bias"] and p.requires_grad:
                    fisher_dict[f"{nm}.{npp}"] = p.grad.data.clone().pow(2)
        threshold = _find_quantile(torch.cat([v.reshape(-1) for v in fisher_dict.values()]), self.perc)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.before_restore = _params(self.model)
        self.model_ema = _update_ema_variables(self.model_ema, self.model, self.mt)
        masks = []
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters():
                if npp in ["weight", "bias"] and p.requires_grad:
                    mask = (fisher_dict[f"{nm}.{npp}"] < threshold).float()
                    masks.append(mask)
                    with torch.no_grad():
                        p.data = self.model_states[0][f"{nm}.{npp}"] * mask + p * (1. - mask)
        self.model_ema = _update_ema_variables_two(self.model_ema, self.model, self.mt, masks)
        return (outputs_ema + outputs_test).detach(), masks


def _released_fisher(images: torch.Tensor) -> dict:
    """The released EWC loop on one batch: CE against the argmax, squared gradients (mean over 1 batch)."""
    m = _configured_tiny()
    out = m(images)
    F.cross_entropy(out, out.max(1)[1]).backward()
    return {n: p.grad.detach().clone() ** 2 for n, p in m.named_parameters()}


# --- released variant -------------------------------------------------------------------------------------------
def test_missing_source_data_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="psmt needs source data") as e:
        strategies.create("psmt", make_tiny())
    assert "\n" not in str(e.value) and "--set strategy.source_data=" in str(e.value)
    with pytest.raises(ConfigError, match="only CIFAR-10/100 train sets") as e:
        strategies.create("psmt", make_tiny(), source_data="somewhere")  # the tiny model has no num_classes
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="must be a path or"):
        strategies.create("psmt", make_tiny(), source_data=(torch.zeros(2),))
    # the paper-reading variant uses no source data
    assert strategies.create("psmt", make_tiny(), variant="paper", views=2).variant == "paper"


def test_source_data_path_is_read_like_lsa(tmp_path):
    """One option for LSA and PSMT: a CIFAR train set path (here an .npz), or a one-line error naming it."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8),
             labels=np.arange(30) % 10)
    s = strategies.create("psmt", _ten(), source_data=str(tmp_path), source_samples=20, fisher_batch=10)
    assert s.source_images.shape == (20, 3, 8, 8) and s.source_images.dtype == torch.uint8
    s.adapt(_batches(1)[0])
    assert s.fisher is not None and s.source_images is None
    x, y = load_source_data(str(tmp_path), 10, 20, 0, "lsa")
    assert x.shape == (20, 3, 8, 8) and y.shape == (20,)
    with pytest.raises(CttaError, match="psmt source_data") as e:
        strategies.create("psmt", _ten(), source_data=str(tmp_path / "missing"))
    assert "\n" not in str(e.value)


def test_one_source_data_option_reaches_psmt_and_lsa_in_a_comparison():
    from ctta.experiment import _hparams_for

    given = {"source_data": "../shared/data/cifar10", "source_samples": 500, "restore_share": 0.1}
    assert _hparams_for("psmt", given, True) == given
    assert _hparams_for("lsa+tent", given, True) == {"source_data": "../shared/data/cifar10", "source_samples": 500}
    assert _hparams_for("tent", given, True) == {}


def _ten() -> nn.Module:
    m = make_tiny(num_classes=10)
    m.num_classes = 10
    return m


def test_load_source_data_subset_is_seeded():
    x, y = _source(40)
    a = load_source_data((x, y), None, 10, 3, "psmt")
    b = load_source_data((x, y), None, 10, 3, "psmt")
    c = load_source_data((x, y), None, 10, 4, "psmt")
    assert a[0].shape == (10, 3, 8, 8) and torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(load_source_data((x, y), None, None, 3, "psmt")[0], x)


def test_lowest_fraction_masks_follow_find_quantile():
    g = torch.Generator().manual_seed(0)
    values = {"a": torch.rand(7, 5, generator=g), "b": torch.rand(13, generator=g)}
    flat = torch.cat([v.reshape(-1) for v in values.values()])
    for share in (0.03, 0.1, 0.25, 0.5):
        got = lowest_fraction_masks(values, share)
        threshold = _find_quantile(flat, share)
        for k, v in values.items():
            assert torch.equal(got[k], v < threshold)
    hand = {"w": torch.tensor([0.5, 0.1, 0.9, 0.3]), "b": torch.tensor([0.2, 0.7, 0.0, 0.8])}
    # 8 values, share 0.25: position 1.75 between the 2nd (0.1) and 3rd (0.2) smallest -> 0.0 and 0.1 are below
    got = lowest_fraction_masks(hand, 0.25)
    assert got["w"].tolist() == [False, True, False, False] and got["b"].tolist() == [False, False, True, False]
    assert not any(m.any() for m in lowest_fraction_masks(hand, 0.0).values())


def test_restore_mask_restores_the_lowest_importance_share_and_keeps_the_rest():
    """A hand-set importance (squared gradient) on the tiny model: the lowest 25% go back to source, the rest stay."""
    s = _released(restore_share=0.25)
    g = torch.Generator().manual_seed(2)
    for p in s.model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    importance = {n: p.grad.square() for n, p in s.model.named_parameters()}
    flat = torch.cat([v.reshape(-1) for v in importance.values()])
    expect = {n: v < _find_quantile(flat, 0.25) for n, v in importance.items()}
    masks = s.restore_masks()
    n_restored = sum(int(m.sum()) for m in masks.values())
    assert n_restored == int(0.25 * (flat.numel() - 1)) + 1  # distinct values: floor(pos) + 1 elements below
    with torch.no_grad():
        for p in s.model.parameters():
            p.add_(1.0)
    moved = _params(s.model)
    masked_restore_(s.model, s.source_state, masks)
    for n, p in s.model.named_parameters():
        assert torch.equal(masks[n], expect[n])
        torch.testing.assert_close(p.detach(), torch.where(expect[n], s.source_state[n], moved[n]), rtol=0, atol=0)


def test_fisher_is_computed_once_from_source_data_and_not_updated_on_test_batches(monkeypatch):
    import ctta.strategies.psmt as psmt_module

    calls = []
    real = psmt_module.source_fisher
    monkeypatch.setattr(psmt_module, "source_fisher", lambda *a, **k: calls.append(1) or real(*a, **k))
    x_src, y_src = _source(24)
    s = _released(source_data=(x_src, y_src), fisher_batch=24)  # one batch: the order inside does not matter
    assert s.fisher is None  # computed on the device at the first step
    batches = _batches(3)
    s.adapt(batches[0])
    first = {k: v.clone() for k, v in s.fisher.items()}
    hand = _released_fisher(x_src)
    assert set(first) == set(hand)
    for k in hand:
        torch.testing.assert_close(first[k], hand[k], rtol=1e-4, atol=1e-9)
    for x in batches[1:]:
        s.adapt(x)
    s.reset()
    s.adapt(batches[0])
    assert len(calls) == 1
    assert all(torch.equal(s.fisher[k], first[k]) for k in first)
    # another test stream, the same Fisher: it depends on the source data only
    other = _released(source_data=(x_src, y_src), fisher_batch=24)
    other.adapt(batches[2] * 0.5)
    assert all(torch.equal(other.fisher[k], first[k]) for k in first)


def test_source_fisher_is_the_mean_of_per_batch_squared_gradients():
    m = _configured_tiny()
    x = _source(20)[0]
    got = source_fisher(m, x, 10)
    hand = [_released_fisher(x[:10]), _released_fisher(x[10:])]
    for k in got:
        torch.testing.assert_close(got[k], (hand[0][k] + hand[1][k]) / 2, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in m.parameters())


def test_symmetric_cross_entropy_is_rmts():
    g = torch.Generator().manual_seed(0)
    s1 = torch.randn(6, 4, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    t = torch.randn(6, 4, generator=g)
    ours, ref = symmetric_cross_entropy(s1, t), _SymmetricCrossEntropy()(s2, t)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_teacher_student_and_output_equal_the_released_step():
    """Three batches: our step and the transcribed released step give the same output, student and teacher."""
    s = _released(lr=1e-2, mt=0.9)
    batches = _batches(3)
    s.ensure_fisher()
    ref = _ReleasedPSMT({k: v.clone() for k, v in s.fisher.items()}, mt=0.9, lr=1e-2)
    for i, x in enumerate(batches):
        t0 = _params(ref.model_ema)
        out = s.adapt(x)
        ref_out, masks = ref(x)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        for k, p in s.model.named_parameters():
            torch.testing.assert_close(p.detach(), dict(ref.model.named_parameters())[k].detach(), rtol=1e-5, atol=1e-6)
        for k, p in s.teacher.named_parameters():
            torch.testing.assert_close(p.detach(), dict(ref.model_ema.named_parameters())[k], rtol=1e-5, atol=1e-6)
        # the released teacher update, written out: masked -> the restored (source) value, else two EMA steps
        restored = 0
        for (k, t), m in zip(ref.model_ema.named_parameters(), masks):
            two_steps = 0.81 * t0[k] + 0.19 * ref.before_restore[k]
            torch.testing.assert_close(t, torch.where(m.bool(), s.source_state[k], two_steps), rtol=1e-5, atol=1e-6)
            restored += int(m.sum())
        assert restored > 0


def test_output_is_the_teacher_plus_student_ensemble():
    s = _released(lr=1e-2, mt=0.9)
    b = _batches(2)
    s.adapt(b[0])  # teacher and student now differ
    with torch.no_grad():
        teacher, student = s.teacher(b[1]), s.model(b[1])
    assert not torch.allclose(teacher, student)
    state = _state(s)
    torch.testing.assert_close(s.predict(b[1]), teacher + student)
    assert all(torch.equal(v, state[k]) for k, v in _state(s).items())  # predict changes nothing
    torch.testing.assert_close(s.adapt(b[1]), teacher + student)


def test_psmt_predictions_differ_from_cotta_on_the_same_batches():
    psmt = _released()
    cotta = strategies.create("cotta", make_tiny(), views=2)
    outs = [(psmt.adapt(x), cotta.adapt(x)) for x in _batches(4)]
    assert all((a - b).abs().max() > 1e-2 for a, b in outs)
    # the ensemble moves the decision, not only the scale: on the source model CoTTA's output is the teacher's
    assert any((a.softmax(1) - b.softmax(1)).abs().max() > 1e-2 for a, b in outs)


def test_released_defaults_checkpoint_reset_and_determinism():
    s = _released()
    assert (s.variant, s.mt, s.fisher_weight, s.restore_share, s.sce_alpha, s.fisher_batch, s.steps) == \
        ("released", 0.999, 500.0, 0.03, 0.5, 16, 1)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    from ctta.config import strategy_defaults

    d = strategy_defaults("psmt")
    assert (d["variant"], d["source_samples"], d["fisher_batch"], d["restore_share"], d["fisher_weight"]) == \
        ("released", 10000, 200, 0.03, 500.0)
    b = _batches(3)
    a = _released(lr=1e-2)
    outs = [a.adapt(x) for x in b[:2]]
    resumed = _released(lr=1e-2)
    resumed.load_checkpoint_state(a.checkpoint_state())
    assert resumed.fisher is not None and resumed.source_images is None  # the saved Fisher, not recomputed
    assert torch.equal(a.adapt(b[2]), resumed.adapt(b[2]))
    again = _released(lr=1e-2)
    assert all(torch.equal(o, again.adapt(x)) for o, x in zip(outs, b[:2]))
    before = _released(lr=1e-2)
    init = _state(before)
    first = before.adapt(b[0])
    before.adapt(b[1])
    before.reset()
    assert all(torch.equal(init[k], v) for k, v in _state(before).items())
    torch.testing.assert_close(before.adapt(b[0]), first)


# --- paper-reading variant ---------------------------------------------------------------------------------------
def _paper(**kw) -> "strategies.Strategy":
    kw.setdefault("views", 2)
    return strategies.create("psmt", make_tiny(), variant="paper", **kw)


def _pinned(mask_value: bool, **kw) -> "strategies.Strategy":
    s = _paper(lr=1e-2, mt=0.9, **kw)
    s.fixed_update_mask = {n: torch.full_like(p, mask_value, dtype=torch.bool) for n, p in s.model.named_parameters()}
    return s


def test_paper_all_ones_update_mask_is_the_plain_mean_teacher(images):
    s = _pinned(True)
    teacher_before = _params(s.teacher)
    s.adapt(images)
    student = _params(s.model)
    assert any(not torch.equal(student[k], teacher_before[k]) for k in student)
    plain = frozen_copy(make_tiny())
    plain.load_state_dict(dict(teacher_before), strict=False)
    ema_update_(plain, s.model, 0.9)
    for k, t in s.teacher.named_parameters():
        torch.testing.assert_close(t, dict(plain.named_parameters())[k], atol=1e-6, rtol=0)


def test_paper_all_zeros_update_mask_keeps_the_teacher_fixed(images):
    s = _pinned(False)
    teacher_before = _params(s.teacher)
    for _ in range(2):
        s.adapt(images)
    assert any(not torch.equal(p, teacher_before[k]) for k, p in s.model.named_parameters())
    assert all(torch.equal(p, teacher_before[k]) for k, p in s.teacher.named_parameters())


def test_masked_ema_and_copy_or_ema_per_element():
    t, s = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = _params(t)
    mask_w = torch.tensor([[True, False, True], [False, False, True]])
    masked_ema_update_(t, s, 0.5, [mask_w, None])
    torch.testing.assert_close(t.weight.detach(), torch.where(mask_w, 0.5 * t0["weight"] + 0.5 * s.weight,
                                                              t0["weight"]).detach())
    torch.testing.assert_close(t.bias.detach(), (0.5 * t0["bias"] + 0.5 * s.bias).detach())
    with pytest.raises(ValueError, match="do not align"):
        masked_ema_update_(t, s, 0.5, [None])
    t1 = _params(t)
    copy_or_ema_update_(t, s, 0.5, {"weight": mask_w})
    torch.testing.assert_close(t.weight.detach(), torch.where(mask_w, s.weight, 0.5 * t1["weight"] + 0.5 * s.weight)
                               .detach())
    torch.testing.assert_close(t.bias.detach(), (0.5 * t1["bias"] + 0.5 * s.bias).detach())


def test_fisher_penalty_zero_at_anchor_and_gradient_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    theta = {"a": torch.randn(3, 4, generator=g, requires_grad=True), "b": torch.randn(5, generator=g,
                                                                                         requires_grad=True)}
    anchor = {k: v.detach().clone() for k, v in theta.items()}
    fisher = {k: torch.rand(v.shape, generator=g) for k, v in theta.items()}
    zero = fisher_penalty(theta, anchor, fisher)
    assert zero.item() == 0.0
    moved = {k: (v.detach() + torch.randn(v.shape, generator=g)).requires_grad_(True) for k, v in theta.items()}
    pen = fisher_penalty(moved, anchor, fisher)
    pen.backward()
    for k in moved:
        torch.testing.assert_close(moved[k].grad, 2 * fisher[k] * (moved[k].detach() - anchor[k]))


def test_diagonal_fisher_is_squared_gradient_per_batch_or_running():
    p = nn.Parameter(torch.zeros(3))
    per_batch, running = DiagonalFisher([("p", p)]), DiagonalFisher([("p", p)], decay=0.5)
    for grad in (torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 0.0, 1.0])):
        p.grad = grad
        per_batch.update_()
        running.update_()
    torch.testing.assert_close(per_batch.values["p"], torch.tensor([9.0, 0.0, 1.0]))
    torch.testing.assert_close(running.values["p"], torch.tensor([5.0, 2.0, 0.5]))


def test_top_fraction_masks_preserve_the_highest_fisher():
    values = {"a": torch.tensor([0.1, 5.0, 0.3, 0.2]), "b": torch.tensor([[4.0, 0.0], [0.05, 3.0]])}
    top = top_fraction_masks(values, 0.25)  # 2 of 8 elements
    assert top["a"].tolist() == [False, True, False, False]
    assert top["b"].tolist() == [[True, False], [False, False]]


def test_paper_teacher_keeps_its_high_fisher_parameters(images):
    s = _paper(lr=1e-2, mt=0.9, preserve_ratio=0.1, ap=0.0)
    teacher_before = _params(s.teacher)
    s.adapt(images)
    preserve = top_fraction_masks(s.batch_fisher.values, 0.1)
    assert sum(int(m.sum()) for m in preserve.values()) > 0
    student = _params(s.model)
    for k, t in s.teacher.named_parameters():
        ema = 0.9 * teacher_before[k] + 0.1 * student[k]
        expect = torch.where(preserve[k], teacher_before[k], ema) if k in preserve else ema
        torch.testing.assert_close(t.detach(), expect, atol=1e-6, rtol=0)


def test_paper_penalty_pulls_the_student_toward_the_anchor(images):
    def drift(weight: float) -> float:
        s = _paper(lr=1e-2, ap=0.0, fisher_weight=weight, fisher_decay=0.5, anchor="source")
        for _ in range(4):
            s.adapt(images)
        return sum(float((p.detach() - s.source_state[n]).square().sum()) for n, p in s.model.named_parameters())

    assert drift(1e6) < drift(0.0)


def test_paper_is_deterministic_and_resets(images):
    runs = []
    for _ in range(2):
        s = _paper(views=3, seed=3, ap=1.01)
        runs.append([s.adapt(images) for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    s = _paper(lr=1e-2, ap=0.0)
    before, first = _state(s), s.adapt(images)
    s.adapt(images)
    s.reset()
    assert all(torch.equal(before[k], v) for k, v in _state(s).items())
    assert not s.batch_fisher.initialised
    torch.testing.assert_close(s.adapt(images), first)
    with pytest.raises(ConfigError, match="anchor"):
        _paper(anchor="previous")
