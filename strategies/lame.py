"""LAME: Laplacian Adjusted Maximum-likelihood Estimation (Boudiaf, Mueller, Ben Ayed, Bertinetto; CVPR 2022).

"Parameter-free Online Test-time Adaptation": the model is never changed (no parameter, no BatchNorm statistic);
only its output on each test batch is adjusted. Per batch x (algorithm of the paper, as in fiveai/LAME
``src/adaptation/lame.py``):
  1. with the frozen source model (BatchNorm on its source statistics): log-probabilities log p and penultimate
     features f; the features are L2-normalised;
  2. an affinity W between the batch's samples: kNN (w_ij = 1 if j is one of the k nearest neighbours of i), rbf
     (exp(-d_ij^2 / (2 sigma^2)), sigma = mean distance to the k-th nearest sample, the sample itself counted) or linear
     (f_i . f_j);
  3. minimise E(Y) = sum_i KL(y_i || p_i) - (lambda / 2) sum_ij w_ij y_i.y_j over assignments Y on the simplex by the
     concave-convex procedure, starting from Y = p:  Y <- softmax(log p + lambda W Y), until the relative change
     of E is below 1e-8 (at most 100 iterations);
  4. the output is log Y (so softmax of it is Y).

Choices, and why:
- Affinity kNN with k = 5 is the default (the paper's recommended setting; the released code's default config
  names rbf, whose sigma option it ignores, computing sigma from the k-th neighbour as here).
- The energy checked for convergence is E(Y) above, evaluated at the new Y, for which the update is the exact
  concave-convex step when W is symmetric positive semi-definite (rbf, linear), so E decreases. The released code
  evaluates its energy with the pairwise term of the previous Y; the stopping points differ at the 1e-8 level.
- No host synchronisation: the iterations run on the device up to ``max_steps``, and a device-side flag freezes Y
  once the energy has converged (same result as stopping; a 200 x 200 affinity makes the 100 small matmuls cheap).
- ``predict`` (eval steps) also returns LAME's output: LAME has no state, so this changes nothing.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import features_and_logits
from ctta.errors import ConfigError

from .base import Strategy, register

AFFINITIES = ("knn", "rbf", "linear")


def knn_affinity(features: Tensor, knn: int) -> Tensor:
    """W[i, j] = 1 if j is one of the ``knn`` nearest neighbours of i (i itself excluded), else 0; not symmetric."""
    n = features.shape[0]
    dist = torch.cdist(features, features)
    k = min(knn + 1, n)
    index = dist.topk(k, dim=1, largest=False).indices[:, 1:]  # the nearest is the sample itself
    return torch.zeros(n, n, device=features.device, dtype=features.dtype).scatter_(1, index, 1.0)


def rbf_affinity(features: Tensor, knn: int) -> Tensor:
    """Gaussian kernel exp(-d^2 / (2 sigma^2)); sigma = mean over i of the distance to i's k-th nearest (i first)."""
    n = features.shape[0]
    dist = torch.cdist(features, features)
    kth = dist.topk(min(knn, n), dim=1, largest=False).values[:, -1]
    sigma = kth.mean().clamp_min(1e-12)  # a batch of one (or duplicates) would give 0 / 0
    return torch.exp(-dist.square() / (2 * sigma.square()))


def linear_affinity(features: Tensor) -> Tensor:
    """Inner products f_i . f_j (cosine similarities for normalised features)."""
    return features @ features.t()


def affinity_matrix(features: Tensor, kind: str = "knn", knn: int = 5) -> Tensor:
    """LAME's affinity on L2-normalised ``features`` (N x D) -> N x N."""
    if kind == "knn":
        return knn_affinity(features, knn)
    if kind == "rbf":
        return rbf_affinity(features, knn)
    if kind == "linear":
        return linear_affinity(features)
    raise ConfigError(f"unknown LAME affinity {kind!r}; expected one of {', '.join(AFFINITIES)}")


def lame_energy(y: Tensor, log_p: Tensor, pairwise: Tensor, bound_lambda: float = 1.0) -> Tensor:
    """E(Y) = sum_i KL(y_i || p_i) - (lambda / 2) sum_ij w_ij y_i.y_j, with ``pairwise`` = W Y (a 0-dim tensor)."""
    log_y = y.clamp_min(1e-20).log()
    return (y * (log_y - log_p)).sum() - 0.5 * bound_lambda * (y * pairwise).sum()


def laplacian_optimization(log_p: Tensor, kernel: Tensor, bound_lambda: float = 1.0, max_steps: int = 100,
                           tol: float = 1e-8, return_energies: bool = False) -> Tuple[Tensor, Tensor]:
    """Concave-convex iterations Y <- softmax(log p + lambda W Y) from Y = p, frozen once E's relative change <= tol.

    Returns ``(log Y, energies)``: energies (max_steps) holds E after each iteration (constant once converged) when
    ``return_energies``, else is empty. No host synchronisation: convergence is a device-side flag.
    """
    y = log_p.softmax(dim=1)
    log_y = log_p.log_softmax(dim=1)
    pairwise = bound_lambda * (kernel @ y)
    old_e = torch.full((), float("inf"), device=log_p.device, dtype=log_p.dtype)
    done = torch.zeros((), dtype=torch.bool, device=log_p.device)
    energies = []
    for i in range(max_steps):
        exponent = log_p + pairwise
        cand_log_y = exponent.log_softmax(dim=1)
        cand_y = cand_log_y.exp()
        cand_pairwise = bound_lambda * (kernel @ cand_y)
        e = lame_energy(cand_y, log_p, cand_pairwise, 1.0)  # pairwise already carries lambda
        log_y = torch.where(done, log_y, cand_log_y)
        pairwise = torch.where(done, pairwise, cand_pairwise)
        energy = torch.where(done, old_e, e)
        if return_energies:
            energies.append(energy)
        if i > 1:
            done = done | ((e - old_e).abs() <= tol * old_e.abs())
        old_e = energy
    stacked = torch.stack(energies) if energies else log_p.new_zeros(0)
    return log_y, stacked


@register
class LAME(Strategy):
    """Output-only adaptation: Laplacian-regularised re-labelling of each batch, the source model kept frozen."""

    name = "lame"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, affinity: str = "knn", knn: int = 5, force_symmetry: bool = False,
                 bound_lambda: float = 1.0, max_steps: int = 100, tol: float = 1e-8, seed: int = 0) -> None:
        super().__init__(model, seed)
        affinity = str(affinity).lower()
        if affinity not in AFFINITIES:
            raise ConfigError(f"unknown LAME affinity {affinity!r}; expected one of {', '.join(AFFINITIES)}")
        if int(knn) < 1:
            raise ConfigError(f"LAME knn must be >= 1, got {knn}")
        self.affinity, self.knn, self.force_symmetry = affinity, int(knn), bool(force_symmetry)
        self.bound_lambda, self.max_steps, self.tol = float(bound_lambda), int(max_steps), float(tol)
        self.model.eval().requires_grad_(False)  # source statistics in BatchNorm, nothing trainable
        if not (hasattr(model, "features_and_logits")
                or (hasattr(model, "forward_features") and hasattr(model, "forward_head"))):
            from ctta.errors import UnsupportedError

            raise UnsupportedError(f"lame needs the backbone's penultimate features; {type(model).__name__} has no "
                                   f"features_and_logits / forward_features+forward_head")
        self.remember_initial_state()

    def train(self, mode: bool = True) -> "LAME":  # the source model stays in eval mode whatever the caller does
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """log Y: LAME's assignment of the batch, as log-probabilities (softmax of the output is Y)."""
        feats, logits = features_and_logits(self.model, x)
        dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        log_p = logits.to(dtype).log_softmax(dim=1)
        feats = F.normalize(feats.to(dtype).flatten(1), p=2, dim=1)
        kernel = affinity_matrix(feats, self.affinity, self.knn)
        if self.force_symmetry:
            kernel = 0.5 * (kernel + kernel.t())
        log_y, _ = laplacian_optimization(log_p, kernel, self.bound_lambda, self.max_steps, self.tol)
        return log_y

    @torch.no_grad()
    def adapt(self, x: Tensor) -> Tensor:
        return self.predict(x)
