"""Linear discriminant analysis with a shared covariance, updated exactly and incrementally (FSA's head).

Sufficient statistics, accumulated in float64 from feature batches and never the features themselves:
per-class sums ``s_c`` and counts ``n_c``, and the global second moment ``M = sum_i f_i f_i^T``. From them:

* total covariance (FSA's official code, ``torch.cov(features.T, correction=1)``):
  ``S = (M - N m m^T) / (N - ddof)`` with ``m = sum_c s_c / N``;
* within-class (pooled) covariance (classical LDA, sklearn): ``S = (M - sum_c s_c s_c^T / n_c) / (N - ddof)``.

The covariance used is ``(1 - shrinkage) S + shrinkage * tr(S)/D * I + ridge * I`` (FSA: ridge 1, shrinkage 0;
sklearn's ``shrinkage=a``: shrinkage a, ridge 0, within-class, ddof 0, priors), factorised by Cholesky; the
classifier is ``logit_c(f) = f^T S^-1 mu_c - 1/2 mu_c^T S^-1 mu_c (+ log n_c / N with priors)``.

The same statistics are a ridge regression's (RanPAC, McDonnell et al. 2023): with one-hot targets Y, the Gram matrix
is ``G = H^T H`` (the second moment) and ``Q = H^T Y`` (the class sums, transposed), and the ridge head is
``W = (G + lambda I)^-1 Q`` (:meth:`IncrementalLDA.ridge_weights`, :func:`ridge_solution`); :func:`select_ridge`
picks lambda by the mean squared error on a held-out tail of a batch of features.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import ConfigError

from .incremental import MASK_VALUE

COVARIANCES = ("total", "within")


class IncrementalLDA(nn.Module):
    """Streaming LDA over ``num_classes`` classes of ``dim``-dimensional features (the statistics are buffers, so
    they move with the strategy and enter its state dict); classes never seen get ``-inf`` logits. ``dim=None``
    allocates on the first update (when the feature width is not known in advance)."""

    def __init__(self, dim: Optional[int], num_classes: int, covariance: str = "total", ridge: float = 1.0,
                 shrinkage: float = 0.0, ddof: int = 1, priors: bool = False,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.dtype = dtype  # of the sums and the second moment (float64 unless a caller needs the memory)
        if covariance not in COVARIANCES:
            raise ConfigError(f"LDA covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
        if not 0.0 <= float(shrinkage) <= 1.0:
            raise ConfigError(f"LDA shrinkage must be in [0, 1], got {shrinkage!r}")
        if float(ridge) < 0:
            raise ConfigError(f"LDA ridge must be >= 0, got {ridge!r}")
        self.num_classes = int(num_classes)
        self.covariance, self.ridge, self.shrinkage = covariance, float(ridge), float(shrinkage)
        self.ddof, self.priors = int(ddof), bool(priors)
        self.register_buffer("class_counts", torch.zeros(self.num_classes, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(self.num_classes))
        for name in ("class_sums", "second_moment", "weight"):
            self.register_buffer(name, torch.zeros(0))
        self.dim = 0
        if dim is not None:
            self._allocate(int(dim), self.class_counts.device)
        self._dirty = True

    def _allocate(self, dim: int, device: torch.device) -> None:
        dt = self.dtype
        self.dim = dim
        self.class_sums = torch.zeros(self.num_classes, dim, dtype=dt, device=device)
        self.second_moment = torch.zeros(dim, dim, dtype=dt, device=device)
        self.weight = torch.zeros(self.num_classes, dim, device=device)

    @property
    def ready(self) -> bool:
        return self.dim > 0

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch of features (N x D) with their labels to the statistics (no host sync)."""
        if not self.ready:
            self._allocate(int(features.shape[1]), self.class_counts.device)
        f = features.detach().to(self.dtype)
        y = labels.to(f.device).long()
        self.class_sums.index_add_(0, y, f)
        self.class_counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.second_moment.addmm_(f.T, f)
        self._dirty = True

    @torch.no_grad()
    def update_dense(self, features: Tensor, targets: Tensor) -> None:
        """:meth:`update` with dense targets (N x C, one-hot or soft): ``M += F^T F``, ``sums += (F^T Y)^T``,
        ``counts += sum_i Y_i``, in matmul form (RanPAC's ``G += H^T H``, ``Q += H^T Y``, rounded as its code)."""
        if not self.ready:
            self._allocate(int(features.shape[1]), self.class_counts.device)
        f = features.detach().to(self.dtype)
        t = targets.to(f)
        self.second_moment += f.T @ f
        self.class_sums += (f.T @ t).T
        self.class_counts += t.sum(0).to(self.class_counts.dtype)
        self._dirty = True

    def covariance_matrix(self) -> Tensor:
        """The regularised shared covariance (D x D, float64)."""
        n = self.class_counts.sum()
        if self.covariance == "total":
            total = self.class_sums.sum(0)
            scatter = self.second_moment - torch.outer(total, total) / n.clamp_min(1)
        else:
            safe = self.class_counts.clamp_min(1).unsqueeze(1)
            scatter = self.second_moment - (self.class_sums / safe).T @ self.class_sums
        s = scatter / (n - self.ddof).clamp_min(1)
        eye = torch.eye(self.dim, dtype=s.dtype, device=s.device)
        if self.shrinkage:
            s = (1 - self.shrinkage) * s + self.shrinkage * (torch.trace(s) / self.dim) * eye
        return s + self.ridge * eye

    @torch.no_grad()
    def ridge_weights(self, ridge: float) -> Tensor:
        """Ridge-regression weights (C x D) on one-hot targets: ``((G + ridge I)^-1 Q)^T`` with ``G`` the second
        moment and ``Q`` the transposed class sums (RanPAC's head)."""
        return ridge_solution(self.second_moment, self.class_sums.T, ridge).T

    def means(self) -> Tensor:
        return self.class_sums / self.class_counts.clamp_min(1).unsqueeze(1)

    @torch.no_grad()
    def solve(self) -> Tuple[Tensor, Tensor]:
        """(weight C x D, bias C) in float64 from the current statistics (Cholesky solve); ``forward`` uses float32
        copies. Needs a positive-definite covariance: ridge > 0, or enough samples (no host check per step)."""
        mu = self.means()
        chol, info = torch.linalg.cholesky_ex(self.covariance_matrix())
        coef = torch.cholesky_solve(mu.T, chol).T  # C x D: S^-1 mu_c
        bias = -0.5 * (coef * mu).sum(1)
        if self.priors:
            bias = bias + torch.log(self.class_counts / self.class_counts.sum().clamp_min(1))
        self.weight.copy_(coef.to(self.weight.dtype))
        self.bias.copy_(bias.to(self.bias.dtype).nan_to_num(neginf=0.0))
        self._dirty = False
        return coef, bias

    def forward(self, features: Tensor) -> Tensor:
        """Logits (N x C) of ``features``; classes without samples are masked to ``-inf`` (once any class is known)."""
        if not self.ready:
            return torch.zeros(features.shape[0], self.num_classes, device=features.device, dtype=features.dtype)
        if self._dirty:
            self.solve()
        logits = features.to(self.weight.dtype) @ self.weight.T + self.bias
        seen = self.class_counts > 0
        return logits.masked_fill(~(seen | ~seen.any()).unsqueeze(0), MASK_VALUE)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        sums = state_dict.get(prefix + "class_sums")
        if sums is not None and sums.shape != self.class_sums.shape:
            if sums.numel() == 0:
                self.dim = 0
                for name in ("class_sums", "second_moment", "weight"):
                    setattr(self, name, torch.zeros(0, device=self.class_counts.device))
            else:
                self._allocate(int(sums.shape[1]), self.class_counts.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._dirty = True


def ridge_solution(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """``(gram + ridge I)^-1 cross`` by an LU solve (``torch.linalg.solve``, as RanPAC's code: more stable than an
    inverse; ``gram`` is only positive semi-definite, so Cholesky may fail at ridge 1e-8)."""
    a = gram.clone()
    a.diagonal().add_(float(ridge))
    return torch.linalg.solve(a, cross)


@torch.no_grad()
def select_ridge(features: Tensor, targets: Tensor, ridges: Sequence[float],
                 fit_fraction: float = 0.8) -> Tuple[float, Tensor]:
    """The ridge among ``ridges`` whose solution on the first ``int(N * fit_fraction)`` rows has the least mean
    squared error on the rest (the first minimiser on ties), and every candidate's error (RanPAC's selection)."""
    n_fit = int(features.shape[0] * fit_fraction)
    fit, val = features[:n_fit], features[n_fit:]
    gram, cross = fit.T @ fit, fit.T @ targets[:n_fit]
    losses = torch.stack([F.mse_loss(val @ ridge_solution(gram, cross, r), targets[n_fit:]) for r in ridges])
    return float(ridges[int(torch.argmin(losses))]), losses
