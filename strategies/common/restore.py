"""Stochastic restore (CoTTA): reset a random fraction of weights to their source values to limit forgetting."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn


@torch.no_grad()
def stochastic_restore_(
    model: nn.Module,
    source: Mapping[str, Tensor],
    probability: float,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Each element of every trainable weight/bias returns to ``source`` with ``probability``; masks drawn on the device."""
    if probability <= 0.0:
        return
    for name, p in model.named_parameters():
        if not p.requires_grad or name.rsplit(".", 1)[-1] not in ("weight", "bias"):
            continue
        mask = torch.rand(p.shape, device=p.device, generator=generator) < probability
        p.copy_(torch.where(mask, source[name].to(p.dtype), p))


@torch.no_grad()
def masked_restore_(model: nn.Module, source: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Where ``masks[name]`` is True, the parameter ``name`` returns to its ``source`` value (a chosen, not random,
    restore: PSMT's released code restores the elements with the lowest Fisher information)."""
    for name, p in model.named_parameters():
        m = masks.get(name)
        if m is not None:
            p.copy_(torch.where(m, source[name].to(p.dtype), p))
