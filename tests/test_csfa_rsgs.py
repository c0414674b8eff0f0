"""CSFA (calibrated prototype head), RSGS (entropy-filtered GSAM) and their combination csfa_rsgs (arXiv 2506.05736)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny
from ctta import strategies
from ctta.errors import ConfigError
from ctta.strategies.common.sam import gsam_step
from ctta.strategies.rsgs import masked_entropy


class FeatNet(nn.Module):
    """Features = the input itself (N x D), a linear head: prototypes are exactly the class means of the inputs."""

    def __init__(self, dim: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class LNNet(nn.Module):
    """Per-sample normalisation only (LayerNorm), so a sample's gradient never depends on the other samples."""

    def __init__(self, dim: int = 6, hidden: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.3, 0.3)
            self.fc.weight.mul_(4.0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.lin(x)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_csfa_changes_no_weights() -> None:
    model = make_tiny(num_classes=6)
    before = copy.deepcopy(model.state_dict())
    st = strategies.create("csfa", model)
    st.learn(_images(8, 0), torch.tensor([0, 1] * 4))
    st.adapt(_images(8, 1))
    st.learn(_images(4, 2), torch.tensor([2, 3, 2, 3]))
    st.adapt(_images(8, 3))
    st.predict(_images(8, 4))
    after = st.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in st.model.parameters())
    assert bool(st.fixed[:4].all()) and not bool(st.fixed[4:].any())


def test_calibrated_prototypes_equal_hand_fusion() -> None:
    lam, tau = 0.3, 2.0
    st = strategies.create("csfa", FeatNet(), shift_weight=lam, temperature=tau)
    base_x = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    st.learn(base_x, torch.tensor([0, 0, 1, 1]))
    st.predict(base_x)                      # closes the base session
    new_x = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    st.learn(new_x, torch.tensor([2, 2]))
    st.predict(new_x)                       # closes session 1: calibration

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    b0, b1 = unit(np.array([2.0, 0.0, 0.0])), unit(np.array([0.0, 1.0, 1.0]))
    p = unit(np.array([1.0, 0.5, 0.0]))
    s = np.array([tau * p @ b0, tau * p @ b1])
    w = np.exp(s) / np.exp(s).sum()
    delta = unit(w[0] * b0 + w[1] * b1)
    expected = (1 - lam) * p + lam * delta
    assert torch.allclose(st.prototypes[2], torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    # base prototypes are the plain class means; later sessions do not touch them
    assert torch.allclose(st.prototypes[0], torch.tensor([2.0, 0.0, 0.0]))
    assert torch.allclose(st.prototypes[1], torch.tensor([0.0, 1.0, 1.0]))
    # the head is the cosine to the calibrated prototypes, unseen classes masked
    logits = st.predict(torch.tensor([[1.0, 0.5, 0.0]]))
    assert torch.isinf(logits[0, 3:]).all()
    assert int(logits.argmax()) == 2


@pytest.mark.parametrize("name", ["csfa", "rsgs", "csfa_rsgs"])
def test_unseen_classes_never_predicted(name: str) -> None:
    st = strategies.create(name, make_tiny(num_classes=8))
    st.learn(_images(6, 0), torch.tensor([5, 1, 5, 1, 5, 1]))
    for seed in range(3):
        out = st.adapt(_images(16, 10 + seed))
        assert set(out.argmax(1).tolist()) <= {1, 5}
        assert torch.isinf(st.predict(_images(16, 20 + seed))[:, [0, 2, 3, 4, 6, 7]]).all()
    st.learn(_images(2, 1), torch.tensor([3, 3]))
    out = st.predict(_images(32, 30))
    assert set(out.argmax(1).tolist()) <= {1, 3, 5}
    assert torch.isfinite(out[:, [1, 3, 5]]).all()


def _rsgs(model: nn.Module, e_margin: float) -> strategies.Strategy:
    return strategies.create("rsgs", model, e_margin=e_margin, lr=0.5, momentum=0.0, rho=0.05, alpha=0.3)


def test_rsgs_filtered_samples_contribute_nothing() -> None:
    model = LNNet()
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        ent = masked_entropy(model(x))
    thr = float(ent.median())
    keep = ent < thr
    assert 0 < int(keep.sum()) < len(x)
    e_margin = thr / math.log(4)

    full = _rsgs(copy.deepcopy(model), e_margin)
    full.adapt(x)
    assert torch.equal(full.last_keep, keep)
    subset = _rsgs(copy.deepcopy(model), e_margin)
    subset.adapt(x[keep])
    assert subset.last_keep.all()
    unfiltered = _rsgs(copy.deepcopy(model), 10.0)
    unfiltered.adapt(x)

    initial = model.norm.weight.detach()
    assert not torch.allclose(full.model.norm.weight, initial)             # the update did something
    for a, b in ((full.model.norm.weight, subset.model.norm.weight), (full.model.norm.bias, subset.model.norm.bias)):
        assert torch.allclose(a, b, atol=1e-6)                            # ... and only the kept samples drove it
    assert not torch.allclose(unfiltered.model.norm.weight, subset.model.norm.weight, atol=1e-4)
    # nothing but the norm affines moved
    assert torch.equal(full.model.lin.weight, model.lin.weight) and torch.equal(full.model.fc.weight, model.fc.weight)


def test_rsgs_nothing_reliable_means_no_change() -> None:
    model = LNNet()
    st = strategies.create("rsgs", copy.deepcopy(model), e_margin=1e-6, momentum=0.0)
    st.adapt(torch.randn(8, 6))
    assert not st.last_keep.any()
    assert torch.equal(st.model.norm.weight, model.norm.weight)


def test_gsam_step_matches_hand_computation_on_a_quadratic() -> None:
    rho, alpha, lr = 0.2, 0.4, 0.1
    a = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
    b = np.array([1.0, -2.0, 0.5])
    w0 = np.array([0.3, 0.7, -1.2])
    w = nn.Parameter(torch.tensor(w0))
    at, bt = torch.tensor(a), torch.tensor(b)
    opt = torch.optim.SGD([w], lr=lr)
    loss = gsam_step([w], lambda perturbed: 0.5 * w @ at @ w - bt @ w, rho, alpha)
    assert torch.equal(w.detach(), torch.tensor(w0))                      # back at w after the perturbation
    opt.step()

    g = a @ w0 - b
    e = rho * g / np.linalg.norm(g)
    gp = a @ (w0 + e) - b
    g_orth = g - (g @ gp) / (gp @ gp) * gp
    expected = w0 - lr * (gp - alpha * g_orth)
    assert abs(float(loss) - (0.5 * w0 @ a @ w0 - b @ w0)) < 1e-12
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=0, atol=1e-12)
    assert abs(g_orth @ gp) < 1e-10


def test_bad_hyperparameters_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="shift_weight"):
        strategies.create("csfa", make_tiny(), shift_weight=1.5)
    with pytest.raises(ConfigError, match="rho"):
        strategies.create("rsgs", make_tiny(), rho=0.0)


def test_csfa_rsgs_reset_restores_prototypes_and_affines() -> None:
    st = strategies.create("csfa_rsgs", make_tiny(num_classes=6))
    w0 = st.model.bn1.weight.detach().clone()
    st.learn(_images(8, 0), torch.tensor([0, 1] * 4))
    for seed in range(3):
        st.adapt(_images(16, seed))
    assert bool(st.fixed[:2].all())
    st.reset()
    assert not bool(st.fixed.any()) and not bool(st.seen.seen.any())
    assert torch.equal(st.model.bn1.weight, w0)


def _recording(st: strategies.Strategy, seen_log: list) -> strategies.Strategy:
    """Wrap the step methods so each returned prediction is logged with the classes labelled so far."""
    labelled: set = set()
    learn, adapt, predict = st.learn, st.adapt, st.predict

    def rec_learn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        labelled.update(y.tolist())
        return learn(x, y)

    def rec(fn):  # noqa: ANN001, ANN202
        def call(x: torch.Tensor) -> torch.Tensor:
            out = fn(x)
            seen_log.append((set(out.argmax(1).tolist()), set(labelled)))
            return out
        return call

    st.learn, st.adapt, st.predict = rec_learn, rec(adapt), rec(predict)  # type: ignore[method-assign]
    return st


@pytest.mark.parametrize("name", ["csfa", "csfa_rsgs", pytest.param("rsgs", marks=pytest.mark.slow)])
def test_digits_gilcd_end_to_end(name: str) -> None:
    import ctta.streams
    from ctta.engine import run

    stream = ctta.streams.create("digits_gilcd", base_classes=4, classes_per_stage=2, shots=3, num_stages=2,
                                 base_per_class=10, adapt_per_class=8, eval_per_class=8,
                                 corruptions="gaussian_noise", severities=[1, 3, 5])
    log: list = []
    result = run(stream, _recording(strategies.create(name, make_tiny(num_classes=10)), log), device="cpu",
                 progress=False)
    matrix = result.summary["accuracy_matrix"]
    assert len(matrix["rows"]) == 3 and matrix["values"][2][2] is not None
    assert log and all(predicted <= labelled for predicted, labelled in log)


@pytest.mark.parametrize("name", ["rsgs", "csfa_rsgs"])
def test_rsgs_model_recovery_resets_to_the_initial_weights_below_the_loss_ema_threshold(name: str) -> None:
    """SAR's model recovery: when the EMA of the perturbed loss falls below reset_constant (0.2) after an update, the
    adapted parameters and the optimiser return to their initial state and the EMA is forgotten."""
    def make(**kw):  # noqa: ANN003, ANN202
        if name == "rsgs":
            return strategies.create("rsgs", copy.deepcopy(LNNet()), e_margin=10.0, lr=0.5, rho=0.05, **kw)
        st = strategies.create("csfa_rsgs", make_tiny(num_classes=4), e_margin=10.0, lr=0.5, **kw)
        st.learn(_images(8, 0), torch.tensor([0, 1, 2, 3] * 2))
        return st

    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(0)) * 2 if name == "rsgs" else _images(16, 1)
    st = make()
    upd = st.update
    initial = [p.detach().clone() for p in upd.params]
    st.adapt(x)
    assert upd.reset_constant == 0.2 and bool(upd.ema_set) and float(upd.ema) > 0.2   # a high EMA: no reset
    assert int(upd.recoveries) == 0 and any(not torch.equal(p, p0) for p, p0 in zip(upd.params, initial))
    assert any(s["momentum_buffer"].abs().sum() > 0 for s in upd.optimizer.state.values())
    upd.ema.fill_(0.0)  # force the average down: 0.9 * 0 + 0.1 * loss < 0.2 for any loss below ln 4
    st.adapt(x)
    assert int(upd.recoveries) == 1 and not bool(upd.ema_set)
    assert all(torch.equal(p, p0) for p, p0 in zip(upd.params, initial))
    assert all(float(s["momentum_buffer"].abs().sum()) == 0 for s in upd.optimizer.state.values())
    # after a recovery the next step is a fresh strategy's first step (a zero buffer is SGD's empty start)
    fresh = make()
    st.adapt(x)
    fresh.adapt(x)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(upd.params, fresh.update.params))
    # reset_constant 0: no recovery whatever the average
    off = make(reset_constant=0.0)
    off.adapt(x)
    off.update.ema.fill_(0.0)
    off.adapt(x)
    assert int(off.update.recoveries) == 0 and any(not torch.equal(p, p0) for p, p0 in zip(off.update.params, initial))
