"""A fixed simplex equiangular tight frame (ETF) classifier and the dot-regression loss.

Yang, Chen, Li, Xie, Lin, Tao; "Neural Collapse Inspired Feature-Classifier Alignment for Few-Shot Class
Incremental Learning" (ICLR 2023, github.com/NeuralCollapseApplications/FSCIL), used by Mamba-FSCIL: the classifier
is a random simplex ETF fixed at construction (K unit vectors with pairwise cosine -1/(K-1), the geometry of neural
collapse), so prototypes of classes met later are reserved from the start; features are L2-normalised and pulled
onto their class's vector with the dot-regression loss ``0.5 * mean((<f, w_y> - 1)^2)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import ConfigError


def simplex_etf(num_classes: int, dim: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A (dim x num_classes) simplex ETF: ``sqrt(K/(K-1)) * U (I - 11^T/K)`` with ``U`` a random orthonormal
    (dim x K) basis (QR of a uniform matrix, as the official code); needs ``dim >= K >= 2``."""
    k = int(num_classes)
    if k < 2 or dim < k:
        raise ConfigError(f"a simplex ETF of {k} classes needs 2 <= classes <= feature dim, got dim={dim}")
    q, _ = torch.linalg.qr(torch.rand(dim, k, generator=generator, dtype=torch.float64))
    centre = torch.eye(k, dtype=torch.float64) - torch.full((k, k), 1.0 / k, dtype=torch.float64)
    return (math.sqrt(k / (k - 1)) * q @ centre).float()


class ETFClassifier(nn.Module):
    """Logits = cosine between the feature and each ETF vector; the ETF is a buffer (never trained)."""

    def __init__(self, dim: int, num_classes: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.register_buffer("weight", simplex_etf(num_classes, dim, generator))

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(features, dim=1) @ self.weight

    def targets(self, y: Tensor) -> Tensor:
        """The ETF vectors of labels ``y`` (N x dim)."""
        return self.weight.t()[y]


def balance_scales(y: Tensor, num_classes: int) -> Tensor:
    """Per-sample target lengths ``sqrt(gamma / n_y)`` with ``gamma`` = batch size / classes present and ``n_y`` the
    count of the sample's class in the batch (the official ETF head's ``with_len`` rectification: rarer classes in a
    batch get longer targets). Computed on the device, no host sync."""
    counts = torch.bincount(y, minlength=num_classes).float()
    gamma = y.numel() / (counts > 0).sum().clamp_min(1).float()
    return torch.sqrt(gamma / counts.clamp_min(1))[y]


def dot_regression_loss(features: Tensor, targets: Tensor, target_norm: Optional[Tensor] = None,
                        feature_norm: Optional[Tensor] = None) -> Tensor:
    """``0.5 * mean((<f_i, t_i> - m_i h_i)^2 / h_i)`` for L2-normalised features ``f`` and targets ``t``; ``m``
    (target length) and ``h`` (feature length) default to 1 (the DR loss of Yang et al. 2023, Eq. 6)."""
    dot = (features * targets).sum(dim=1)
    m = torch.ones_like(dot) if target_norm is None else target_norm
    h = torch.ones_like(dot) if feature_norm is None else feature_norm
    return 0.5 * torch.mean((dot - m * h) ** 2 / h)
