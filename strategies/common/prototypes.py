"""Class prototypes (running means of penultimate features), their training-free calibration and a cosine head.

Calibration follows TEEN (Wang et al., "Few-Shot Class-Incremental Learning via Training-Free Prototype
Calibration", NeurIPS 2023; code github.com/wangkiw/TEEN, ``models/teen/Network.py: soft_calibration``), the
mechanism CSFA's "fuse emerging prototypes with base representations" describes: for a new class prototype ``p``
(L2-normalised) and the normalised base prototypes ``b_j``,

    w_j   = softmax_j(tau * cos(p, b_j))
    delta = normalise(sum_j w_j b_j)
    p'    = (1 - lam) * p + lam * delta

``lam`` (TEEN's ``shift_weight``; 0.1 for CIFAR-100) and ``tau`` (``softmax_t``; 16) are the knobs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import last_linear
from ctta.errors import UnsupportedError


def feature_dim(model: nn.Module) -> int:
    """Width D of ``model``'s penultimate features (``feature_dim`` attribute, else the last Linear's input)."""
    d = getattr(model, "feature_dim", None)
    if isinstance(d, int) and d > 0:
        return d
    last = last_linear(model)
    if last is None:
        raise UnsupportedError(f"cannot tell the feature width of {type(model).__name__}: it has no feature_dim "
                               f"and no nn.Linear head")
    return int(last.in_features)


class PrototypeMemory(nn.Module):
    """Per-class feature sums and counts (buffers, on device): exact class means whatever the batching."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("sums", torch.zeros(num_classes, dim))
        self.register_buffer("counts", torch.zeros(num_classes))

    @torch.no_grad()
    def update(self, features: Tensor, y: Tensor) -> None:
        """Add a labelled batch of features (no host sync)."""
        y = y.to(self.sums.device).long()
        self.sums.index_add_(0, y, features.detach().to(self.sums.dtype))
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=self.counts.dtype))

    def means(self) -> Tensor:
        """C x D class means (zero rows for classes without samples)."""
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    def present(self) -> Tensor:
        """Boolean C mask of the classes with at least one sample."""
        return self.counts > 0


def calibrate(new: Tensor, base: Tensor, shift_weight: float, temperature: float,
              base_mask: Optional[Tensor] = None) -> Tensor:
    """TEEN/CSFA calibration of prototypes ``new`` (N x D) towards the base prototypes ``base`` (B x D).

    ``base_mask`` (B, bool) restricts the fusion to some rows of ``base`` (the rows of other classes get zero
    weight); the result is unnormalised as in the reference (a cosine head normalises it anyway).
    """
    p = F.normalize(new, dim=-1)
    b = F.normalize(base, dim=-1)
    sim = temperature * p @ b.T
    if base_mask is not None:
        sim = sim.masked_fill(~base_mask.to(sim.device).unsqueeze(0), float("-inf"))
    delta = F.normalize(sim.softmax(dim=-1) @ b, dim=-1)
    return (1.0 - shift_weight) * p + shift_weight * delta


def cosine_logits(features: Tensor, prototypes: Tensor, scale: float) -> Tensor:
    """``scale * cos(feature, prototype)`` for every pair: N x C (zero prototypes give zero logits)."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T


def nearest_mean_logits(features: Tensor, means: Tensor) -> Tensor:
    """Nearest-mean-of-exemplars scores (iCaRL): ``-|| f / ||f|| - mu_c ||^2`` for every feature and mean, N x C."""
    f = features.flatten(1)
    f = f / f.norm(dim=1, keepdim=True)
    return -(means.unsqueeze(0) - f.unsqueeze(1)).pow(2).sum(2)


__all__ = ["PrototypeMemory", "calibrate", "cosine_logits", "feature_dim", "nearest_mean_logits"]
