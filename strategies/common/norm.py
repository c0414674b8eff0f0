"""Normalisation-layer utilities: find norm layers, switch BatchNorm to test-batch statistics (or to a mix of source
and test statistics), collect affines."""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

NORM_TYPES: Tuple[type, ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def norm_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm, LayerNorm and GroupNorm layer."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES))


def batchnorm_layers(model: nn.Module) -> List[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def norm_affine_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of the affine scale and shift of every norm layer (what TENT adapts)."""
    out = []
    for name, m in norm_layers(model):
        for pn, p in m.named_parameters(recurse=False):
            if pn in ("weight", "bias"):
                out.append((f"{name}.{pn}" if name else pn, p))
    return out


def is_top_layer(name: str) -> bool:
    """The norm layers SAR does not adapt: inside a ResNet's ``layer4``, a ViT-B's ``blocks.9``-``blocks.11``, or the
    ViT's final ``norm`` (a ``norm`` module outside the blocks). ``name``: the module's qualified name."""
    parts = name.split(".")
    if "layer4" in parts:
        return True
    if any(a == "blocks" and b in ("9", "10", "11") for a, b in zip(parts, parts[1:])):
        return True
    return parts[-1] == "norm" and "blocks" not in parts


def sar_parameters(model: nn.Module, freeze_top: bool = True) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of the norm affines SAR (and DeYO, which keeps its choice) adapts, in module order."""
    return [(n, p) for n, p in norm_affine_parameters(model)
            if not (freeze_top and is_top_layer(n.rsplit(".", 1)[0] if "." in n else ""))]


def use_batch_statistics(model: nn.Module) -> None:
    """Make every BatchNorm normalise with the current batch's statistics, leaving its running buffers untouched.

    ``train()`` with ``track_running_stats=False`` makes torch pass no running stats to ``batch_norm``:
    batch statistics are used and the stored source statistics are neither read nor updated.
    """
    for m in batchnorm_layers(model):
        m.train()
        m.track_running_stats = False


class _GroupedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, with ``groups > 1``, normalises each consecutive group of the batch with its own statistics.

    Lets several augmented views go through a network in one forward while each view keeps the batch statistics
    it would have had in a forward of its own (as in CoTTA's per-view teacher passes).
    """

    groups: int = 1

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        g = self.groups
        if g <= 1 or not self.training or self.track_running_stats:
            return super().forward(x)
        n, c, h, w = x.shape
        xg = x.reshape(g, n // g, c, h, w)
        var, mean = torch.var_mean(xg, dim=(1, 3, 4), keepdim=True, correction=0)
        y = (xg - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)
        return y.reshape(n, c, h, w)


class view_grouped_batchnorm:
    """Context manager: inside it, the model's BatchNorm2d layers use per-group statistics for ``groups`` groups."""

    def __init__(self, model: nn.Module, groups: int) -> None:
        self.layers = [m for m in model.modules() if type(m) in (nn.BatchNorm2d, _GroupedBatchNorm2d)]
        self.groups = groups

    def __enter__(self) -> "view_grouped_batchnorm":
        for m in self.layers:
            m.__class__ = _GroupedBatchNorm2d
            m.groups = self.groups
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.layers:
            m.groups = 1
            m.__class__ = nn.BatchNorm2d
            if "groups" in m.__dict__:
                del m.__dict__["groups"]




class _SourcePriorBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d normalising with ``(1 - alpha)`` x its stored (source) statistics + ``alpha`` x the batch's.

    The batch's statistics are the ones torch's BatchNorm would store with momentum 1 (mean and unbiased variance,
    ``torch.batch_norm_update_stats``); the stored source buffers are read, never written.
    """

    prior_alpha: float = 0.1

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        a = self.prior_alpha
        test_mean = torch.zeros_like(self.running_mean)
        test_var = torch.ones_like(self.running_var)
        torch.batch_norm_update_stats(x, test_mean, test_var, 1.0)
        mean = (1 - a) * self.running_mean + a * test_mean
        var = (1 - a) * self.running_var + a * test_var
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def mix_source_statistics_(model: nn.Module, alpha: float) -> int:
    """In place: every ``nn.BatchNorm2d`` of ``model`` normalises with ``(1 - alpha) source + alpha test`` statistics
    (Schneider et al., NeurIPS 2020, the source statistics as a prior); returns how many layers were switched.

    The layers keep their parameters and buffers (the state dict is unchanged); only layers whose type is exactly
    ``nn.BatchNorm2d`` are switched (a subclass, e.g. a fused norm-activation, has its own forward).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n = 0
    for m in model.modules():
        if type(m) in (nn.BatchNorm2d, _SourcePriorBatchNorm2d):
            m.__class__ = _SourcePriorBatchNorm2d
            m.prior_alpha = float(alpha)
            m.eval()
            n += 1
    return n
