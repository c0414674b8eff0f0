"""Class-wise Gaussian statistics of features (mean and covariance per class) and sampling from them.

The feature-replay mechanism of classifier alignment (SLCA, Zhang et al., ICCV 2023, arXiv 2303.05118; reference
code GengDavid/SLCA ``models/base.py: _compute_class_mean`` and LAMDA-PILOT ``models/slca.py``): after a class's
session its features are summarised once by a mean and a covariance (``torch.cov`` in float64, plus ``shrink * I``
so the Cholesky factor exists), and a head can later be trained on samples of every stored class without keeping
any image. The same store serves any head trained or calibrated on class Gaussians (e.g. FSA / RanPAC-like heads).

Layout as the references keep it: means in float64 (C x D), covariances in float32 (C x D x D: 4 C D^2 bytes, e.g.
236 MB for 100 classes of ViT-B/16's 768-d features). Sampling follows ``torch.distributions.MultivariateNormal``:
``mean + L eps`` with ``L = cholesky(cov)`` and ``eps`` standard normal drawn by ``Tensor.normal_`` (same numbers as
that class's ``sample`` under the same generator state, but from an explicit generator).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class ClassGaussians(nn.Module):
    """Per-class mean (float64) and covariance (float32) buffers, set from a class's features by :meth:`fit`."""

    def __init__(self, num_classes: int, dim: int, shrink: float = 1e-4) -> None:
        super().__init__()
        self.shrink = float(shrink)
        self.register_buffer("means", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("covs", torch.zeros(num_classes, dim, dim))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def fit(self, features: Tensor, y: Tensor) -> None:
        """Set (replace) the statistics of every class in ``y`` from its rows of ``features`` (N x D): the mean and
        the unbiased covariance in float64, plus ``shrink * I`` (a class needs two samples for a covariance)."""
        y = y.to(features.device).long()
        eye = torch.eye(features.shape[1], dtype=torch.float64, device=features.device)
        for c in torch.unique(y).tolist():
            f = features[y == c].double()
            self.means[c] = f.mean(0).to(self.means.device)
            cov = torch.cov(f.T) if f.shape[0] > 1 else torch.zeros_like(eye)
            self.covs[c] = (cov + self.shrink * eye).to(self.covs)
            self.counts[c] = f.shape[0]

    def present(self) -> Tensor:
        """Boolean C mask of the classes whose statistics are stored."""
        return self.counts > 0

    @torch.no_grad()
    def sample(self, c: int, n: int, generator: Optional[torch.Generator] = None, mean_scale: float = 1.0) -> Tensor:
        """``n`` float32 draws (n x D) from N(``mean_scale`` * mean_c, cov_c), as ``MultivariateNormal(mean, cov)
        .sample((n,))`` draws them from ``generator``'s state (the mean scaled in float64, then cast)."""
        dev = self.covs.device
        mean = (self.means[c] * mean_scale).float()
        tril = torch.linalg.cholesky(self.covs[c].float())
        eps = torch.empty(n, mean.shape[0], dtype=mean.dtype, device=dev).normal_(generator=generator)
        return mean + torch.matmul(tril, eps.unsqueeze(-1)).squeeze(-1)


__all__ = ["ClassGaussians"]
