"""Robust batch normalisation (RBN) of RoTTA (Yuan, Xie, Li, CVPR 2023, arXiv 2303.13899, Sec. 3.2).

A BatchNorm layer whose statistics are global estimates updated by an exponential moving average of the batch
statistics, starting from the source ones: in ``train()`` mode each forward sets mu <- (1 - alpha) mu + alpha mu_b,
s2 <- (1 - alpha) s2 + alpha s2_b (s2_b the biased batch variance) and normalises with the updated estimates
(gradients reach the batch statistics); in ``eval()`` mode it normalises with the stored estimates and changes
nothing. As the reference's ``RobustBN1d`` / ``RobustBN2d`` (mariodoebler/test-time-adaptation@8b2ed63,
``classification/methods/rotta.py``, after BIT-DA/RoTTA ``core/utils/bn_layers.py``), written with the same
arithmetic ``(x - mu) / sqrt(s2 + eps) * weight + bias``. The estimates live in the layer's own ``running_mean`` /
``running_var`` buffers (the state dict keeps BatchNorm's keys).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn


class _RobustBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d normalising with EMA-updated global statistics (RBN); ``rbn_alpha`` is the EMA rate."""

    rbn_alpha: float = 0.05

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            b_var, b_mean = torch.var_mean(x, dim=dims, correction=0)
            a = self.rbn_alpha
            mean = (1 - a) * self.running_mean + a * b_mean
            var = (1 - a) * self.running_var + a * b_var
            self.running_mean.copy_(mean.detach())
            self.running_var.copy_(var.detach())
        else:
            mean, var = self.running_mean, self.running_var
        x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is None:
            return x
        return x * self.weight.view(shape) + self.bias.view(shape)


class RobustBatchNorm1d(_RobustBatchNorm, nn.BatchNorm1d):
    """RBN for ``nn.BatchNorm1d`` (statistics over the batch and any length dimension)."""


class RobustBatchNorm2d(_RobustBatchNorm, nn.BatchNorm2d):
    """RBN for ``nn.BatchNorm2d`` (statistics over the batch and the spatial dimensions)."""


_SWAP = {nn.BatchNorm1d: RobustBatchNorm1d, nn.BatchNorm2d: RobustBatchNorm2d,
         RobustBatchNorm1d: RobustBatchNorm1d, RobustBatchNorm2d: RobustBatchNorm2d}


def use_robust_batchnorm_(model: nn.Module, alpha: float) -> List[nn.Module]:
    """In place: every layer of exact type ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` becomes an RBN layer with EMA rate
    ``alpha``, its running statistics (the source ones) as the starting estimates; returns the switched layers.

    Parameters and buffers stay (the state dict is unchanged). A BatchNorm subclass (e.g. a fused norm-activation)
    has its own forward and is left as it is; a layer without running statistics cannot be switched (ValueError).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = []
    for name, m in model.named_modules():
        new = _SWAP.get(type(m))
        if new is None:
            continue
        if m.running_mean is None or m.running_var is None:
            raise ValueError(f"RBN needs running statistics; BatchNorm layer {name!r} has none")
        m.__class__ = new
        m.rbn_alpha = float(alpha)
        out.append(m)
    return out


__all__ = ["RobustBatchNorm1d", "RobustBatchNorm2d", "use_robust_batchnorm_"]
