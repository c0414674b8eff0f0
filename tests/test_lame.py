"""LAME: output-only (no state change), a probability simplex, labels that follow the feature clusters, the three
affinities against hand computations, the reference's energy and stopping rule on a hand-computed case, the
reference's defaults (rbf, k = 5), and the backbone feature API it relies on."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctta import strategies
from ctta.errors import ConfigError, UnsupportedError
from ctta.strategies.lame import affinity_matrix, lame_energy, laplacian_optimization, pairwise_distances

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
    with pytest.raises(ConfigError, match="hyperparameter affinity='cosine'"):
        strategies.create("lame", make_tiny(), affinity="cosine")


def _by_hand(p, w, tol, max_steps=100):
    """The reference's iterations in plain Python floats: u = -log(p + 1e-10), Y0 = softmax(-u); P = W Y_prev,
    Y = softmax(-u + P), E = sum(u Y) - sum(P Y) + sum(Y log Y); stop after iteration i + 1 (i > 1) at a relative
    change of E <= tol. Returns (iterations run, Y, energies)."""
    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [v / sum(e) for v in e]

    n, k = len(p), len(p[0])
    u = [[-math.log(v + 1e-10) for v in row] for row in p]
    y = [softmax([-v for v in row]) for row in u]
    old, energies = math.inf, []
    for i in range(max_steps):
        pw = [[sum(w[a][b] * y[b][c] for b in range(n)) for c in range(k)] for a in range(n)]
        y = [softmax([pw[a][c] - u[a][c] for c in range(k)]) for a in range(n)]
        e = sum(u[a][c] * y[a][c] - pw[a][c] * y[a][c] + y[a][c] * math.log(y[a][c])
                for a in range(n) for c in range(k))
        energies.append(e)
        if i > 1 and abs(e - old) <= tol * abs(old):
            return i + 1, y, energies
        old = e
    return max_steps, y, energies


HAND_P = [[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]]
HAND_W = [[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]  # two pairs of mutual neighbours


def test_energy_and_stopping_rule_match_the_reference_on_a_hand_computed_case():
    """4 samples, 2 classes, a fixed kernel. E_t = -sum_i log sum_c p_ic exp(P_ic) (as Y_t = softmax(log p + P)):
    for t = 1, P = W p, e.g. row 0: log(0.9 e^0.4 + 0.1 e^0.6). Relative changes of E: 1.1e-2 (t = 3), 8.7e-3 (4),
    6.6e-4 (5), so at tol 1e-3 the rule fires after 5 iterations. (The former rule, KL(Y||p) - 1/2 Y.W Y_new, has
    E_1 = -1.1719 and fires after 3.)"""
    p = torch.tensor(HAND_P, dtype=torch.float64)
    w = torch.tensor(HAND_W, dtype=torch.float64)
    unary = -(p + 1e-10).log()
    res = laplacian_optimization(unary, w, max_steps=20, tol=1e-3, return_energies=True)
    steps, y_hand, e_hand = _by_hand(HAND_P, HAND_W, 1e-3)
    assert steps == 5 and int(res.steps) == 5
    expected = [-2.207171747, -2.478033377, -2.506414005, -2.528146867, -2.529817032]
    assert e_hand == pytest.approx(expected, abs=1e-8)
    closed_e1 = -sum(math.log(sum(HAND_P[i][c] * math.exp(sum(HAND_W[i][j] * HAND_P[j][c] for j in range(4)))
                                  for c in range(2))) for i in range(4))
    assert closed_e1 == pytest.approx(expected[0], abs=1e-8)
    torch.testing.assert_close(res.energies[:5], torch.tensor(expected, dtype=torch.float64), atol=1e-8, rtol=0)
    assert torch.all(res.energies[5:] == res.energies[4])  # frozen once stopped
    torch.testing.assert_close(res.log_y.exp(), torch.tensor(y_hand, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(res.log_y.exp()[:, 0], torch.tensor([0.917293376, 0.605714337, 0.165229104,
                                                                    0.113543158], dtype=torch.float64),
                               atol=1e-8, rtol=0)
    # lame_energy is that energy: the previous iterate's pairwise term, no 1/2
    y4 = laplacian_optimization(unary, w, max_steps=4, tol=0.0).log_y.exp()
    y5 = res.log_y.exp()
    assert lame_energy(y5, unary, w @ y4).item() == pytest.approx(expected[4], abs=1e-8)
    # tol 0: the rule never fires before the energy stops changing; an unreachable tol runs every iteration
    assert int(laplacian_optimization(unary, w, max_steps=7, tol=-1.0).steps) == 7


def test_stopping_without_host_sync_is_the_references_break():
    """Float32, tol 1e-8, a 30-sample rbf batch: same iterations and bit-identical Y as a loop that stops on
    ``.item()`` like the reference; more iterations than needed change nothing."""
    g = torch.Generator().manual_seed(2)
    f = F.normalize(torch.randn(30, 4, generator=g), dim=1)
    unary = -(torch.randn(30, 3, generator=g).softmax(1) + 1e-10).log()
    w = affinity_matrix(f, "rbf", 5)
    y, old, ran = (-unary).softmax(1), float("inf"), 100
    for i in range(100):
        pw = w @ y
        y = (pw - unary).softmax(1)
        e = lame_energy(y, unary, pw).item()
        if i > 1 and abs(e - old) <= 1e-8 * abs(old):
            ran = i + 1
            break
        old = e
    res = laplacian_optimization(unary, w)
    assert 3 <= ran < 100 and int(res.steps) == ran
    assert torch.equal(res.log_y, y.clamp_min(torch.finfo(y.dtype).tiny).log())
    assert torch.equal(laplacian_optimization(unary, w, max_steps=ran).log_y, res.log_y)
    # the fixed point y = softmax(-u + W y), approximately (stopped by the energy rule)
    torch.testing.assert_close(res.log_y, (w @ res.log_y.exp() - unary).log_softmax(1), atol=1e-2, rtol=0)


def test_default_is_the_references_rbf_with_its_sigma_rule():
    """Defaults of the reference (rbf, k = 5, no symmetrisation, lambda 1, 100 steps, tol 1e-8); sigma is the mean
    distance to the 5th nearest sample with the sample itself counted; the unary is -log(p + 1e-10)."""
    g = torch.Generator().manual_seed(3)
    n = 12
    x = torch.randn(n, 6, generator=g)
    logits = 3 * torch.randn(n, 3, generator=g)
    s = strategies.create("lame", FeaturesAreInputs(logits))
    assert (s.affinity, s.knn, s.force_symmetry, s.bound_lambda, s.max_steps, s.tol) == ("rbf", 5, False, 1.0, 100,
                                                                                         1e-8)
    f = F.normalize(x, dim=1).double()
    d = [[math.dist(f[i].tolist(), f[j].tolist()) for j in range(n)] for i in range(n)]
    sigma = sum(sorted(row)[4] for row in d) / n  # sorted(row)[0] is the sample itself
    w = torch.tensor([[math.exp(-d[i][j] ** 2 / (2 * sigma ** 2)) for j in range(n)] for i in range(n)])
    torch.testing.assert_close(affinity_matrix(F.normalize(x, dim=1), "rbf", 5), w.float(), atol=1e-6, rtol=0)
    unary = -(logits.softmax(1) + 1e-10).log()
    expected = laplacian_optimization(unary.double(), w.double()).log_y
    torch.testing.assert_close(s.adapt(x).double(), expected, atol=1e-4, rtol=0)
    # an underflowing probability counts as 1e-10: with lambda 0 the output is log((p + 1e-10) / (1 + 2e-10))
    out = strategies.create("lame", FeaturesAreInputs(torch.tensor([[0.0, -60.0]])), bound_lambda=0.0).adapt(
        torch.ones(1, 2))
    assert out[0, 1].item() == pytest.approx(math.log(1e-10), rel=1e-5)


def test_distances_are_exact_differences():
    """||f_i - f_j|| from the differences: zero diagonal, symmetric, an rbf kernel with ones on its diagonal (the
    matmul expansion of torch.cdist gives neither at batch 200)."""
    g = torch.Generator().manual_seed(4)
    f = F.normalize(torch.randn(200, 64, generator=g).relu(), dim=1)
    d = pairwise_distances(f)
    assert torch.equal(d, d.t()) and torch.equal(torch.diagonal(d), torch.zeros(200))
    assert torch.equal(d[3, 7], (f[3] - f[7]).norm())
    w = affinity_matrix(f, "rbf", 5)
    assert torch.equal(w, w.t()) and torch.equal(torch.diagonal(w), torch.ones(200))


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
