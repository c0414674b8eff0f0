"""LAME: output-only (no state change), a probability simplex, labels that follow the feature clusters, the three
affinities against hand computations, decreasing energy, and the backbone feature API it relies on."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctta import strategies
from ctta.errors import ConfigError, UnsupportedError
from ctta.strategies.lame import affinity_matrix, lame_energy, laplacian_optimization

from conftest import make_tiny


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class FeaturesAreInputs(nn.Module):
    """A 'backbone' whose penultimate features are its inputs and whose logits are a given table (per sample)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.table[: f.shape[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("affinity", ["knn", "rbf", "linear"])
def test_lame_changes_no_parameter_or_buffer_and_returns_a_simplex(tiny_model, images, affinity):
    before = _state(tiny_model)
    s = strategies.create("lame", tiny_model, affinity=affinity)
    outs = [s.adapt(images) for _ in range(3)]
    after = _state(tiny_model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny_model.training and not any(p.requires_grad for p in tiny_model.parameters())
    y = outs[0].exp()
    assert torch.all(y >= 0) and torch.allclose(y.sum(1), torch.ones(len(images)), atol=1e-5)
    torch.testing.assert_close(outs[0].softmax(1), y)
    assert torch.equal(outs[0], outs[2])
    torch.testing.assert_close(s.predict(images), outs[0])


def test_lame_uses_source_batchnorm_statistics(tiny_model, images):
    """The unary term is the frozen source model's (eval-mode BN): with no neighbours LAME returns its softmax."""
    s = strategies.create("lame", make_tiny(), affinity="knn", bound_lambda=0.0)
    torch.testing.assert_close(s.adapt(images), tiny_model(images).log_softmax(1))
    s.train()
    assert not s.model.training


def test_lame_labels_follow_the_clusters_where_the_unary_is_wrong():
    torch.manual_seed(0)
    n_per, d = 12, 8
    centres = torch.eye(d)[:2] * 3.0
    x = torch.cat([centres[c] + 0.05 * torch.randn(n_per, d) for c in range(2)])
    truth = torch.arange(2).repeat_interleave(n_per)
    logits = F.one_hot(truth, 2).float() * 1.0  # mildly confident, right ...
    wrong = torch.tensor([0, 5, n_per + 2, n_per + 7])  # ... except for a minority of each cluster
    logits[wrong] = 1.0 - logits[wrong]
    model = FeaturesAreInputs(logits)
    assert (model(x).argmax(1) != truth).sum() == 4
    for affinity in ("knn", "rbf"):
        out = strategies.create("lame", model, affinity=affinity, knn=5).adapt(x)
        assert torch.equal(out.argmax(1), truth), affinity


def test_affinities_match_a_hand_computation():
    f = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    # distances: d01 = sqrt(0.4), d12 = sqrt(0.8), d02 = sqrt(2), d03 = 2, d13 = sqrt(3.6), d23 = sqrt(2)
    knn = affinity_matrix(f, "knn", 1)
    assert torch.equal(knn, torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))
    lin = affinity_matrix(f, "linear")
    torch.testing.assert_close(lin, f @ f.t())
    assert lin[0, 1].item() == pytest.approx(0.8) and lin[0, 3].item() == pytest.approx(-1.0)
    # rbf with k = 2: the 2nd nearest (itself first) is the nearest other sample: d01, d01, d12, d23
    sigma = (2 * math.sqrt(0.4) + math.sqrt(0.8) + math.sqrt(2.0)) / 4
    rbf = affinity_matrix(f, "rbf", 2)
    assert rbf[0, 1].item() == pytest.approx(math.exp(-0.4 / (2 * sigma ** 2)), rel=1e-5)
    assert rbf[0, 3].item() == pytest.approx(math.exp(-4.0 / (2 * sigma ** 2)), rel=1e-5)
    torch.testing.assert_close(torch.diagonal(rbf), torch.ones(4))
    for kind in ("knn", "rbf", "linear"):  # a batch of one stays finite (rbf: no 0 / 0 bandwidth)
        one = strategies.create("lame", make_tiny(), affinity=kind).adapt(torch.rand(1, 3, 8, 8))
        assert torch.isfinite(one).all() and one.shape == (1, 4)
    with pytest.raises(ConfigError, match="unknown LAME affinity 'cosine'"):
        affinity_matrix(f, "cosine")
    with pytest.raises(ConfigError, match="unknown LAME affinity"):
        strategies.create("lame", make_tiny(), affinity="cosine")


@pytest.mark.parametrize("affinity", ["rbf", "linear"])
def test_energy_decreases_over_the_iterations(affinity):
    g = torch.Generator().manual_seed(1)
    f = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    log_p = (2 * torch.randn(40, 5, generator=g)).log_softmax(1)
    w = affinity_matrix(f, affinity, 5)
    log_y, energies = laplacian_optimization(log_p, w, max_steps=30, return_energies=True)
    assert energies.shape == (30,)
    assert torch.all(energies[1:] <= energies[:-1] + 1e-5)
    assert energies[-1] < energies[0]
    y = log_y.exp()
    torch.testing.assert_close(energies[-1], lame_energy(y, log_p, w @ y))
    # near the fixed point y = softmax(log p + W y) (stopped by the energy criterion, so only approximately)
    torch.testing.assert_close(log_y, (log_p + w @ y).log_softmax(1), atol=1e-2, rtol=0)


def test_converged_iterations_are_frozen_without_host_sync():
    """Running more iterations than needed gives the same answer as stopping at convergence."""
    g = torch.Generator().manual_seed(2)
    f = F.normalize(torch.randn(30, 4, generator=g), dim=1)
    log_p = torch.randn(30, 3, generator=g).log_softmax(1)
    w = affinity_matrix(f, "rbf", 5)
    a, ea = laplacian_optimization(log_p, w, max_steps=100, return_energies=True)
    flat = torch.nonzero(ea[1:] == ea[:-1]).flatten()
    assert len(flat) > 0, "should converge well within 100 iterations"
    b, _ = laplacian_optimization(log_p, w, max_steps=int(flat[0]) + 2)
    torch.testing.assert_close(a, b)


def test_lame_on_registered_backbones_and_missing_features():
    from ctta import backbones

    for name in ("resnet20_cifar", "tiny_cnn"):
        model = backbones.create(name, num_classes=5)
        out = strategies.create("lame", model).adapt(torch.rand(12, 3, 32, 32))
        assert out.shape == (12, 5) and torch.allclose(out.exp().sum(1), torch.ones(12), atol=1e-5)

    class NoFeatures(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3]

    with pytest.raises(UnsupportedError, match="penultimate features"):
        strategies.create("lame", NoFeatures())
