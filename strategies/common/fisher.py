"""Diagonal Fisher information (EWC style) and what is built on it: a Fisher-weighted quadratic penalty and masks.

The empirical diagonal Fisher of a parameter is the squared gradient of the loss (Kirkpatrick et al., PNAS 2017).
:class:`DiagonalFisher` keeps it per parameter on the device, either per batch (``decay=0``) or as a running
average ``F <- decay * F + (1 - decay) * g**2``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn


class DiagonalFisher:
    """Running diagonal Fisher information of named parameters, from their squared gradients."""

    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]], decay: float = 0.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"fisher decay must be in [0, 1), got {decay}")
        self.params: Dict[str, nn.Parameter] = dict(named_params)
        self.decay = float(decay)
        self.values: Dict[str, Tensor] = {n: torch.zeros_like(p, memory_format=torch.preserve_format).detach()
                                          for n, p in self.params.items()}
        self.initialised = False

    @torch.no_grad()
    def update_(self) -> None:
        """Fold in the squared current ``.grad`` of every parameter (missing gradients count as zero)."""
        names = [n for n, p in self.params.items() if p.grad is not None]
        if not names:
            return
        vals = [self.values[n] for n in names]
        sq = [self.params[n].grad.detach().square() for n in names]
        if self.decay == 0.0 or not self.initialised:
            torch._foreach_copy_(vals, sq)
        else:
            torch._foreach_lerp_(vals, sq, 1.0 - self.decay)
        self.initialised = True

    def to(self, device: torch.device) -> "DiagonalFisher":
        self.values = {n: v.to(device) for n, v in self.values.items()}
        return self

    def state_dict(self) -> Dict[str, object]:
        return {"values": {n: v.clone() for n, v in self.values.items()}, "initialised": self.initialised}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        values = state["values"]
        assert isinstance(values, Mapping)
        for n, v in values.items():
            self.values[n].copy_(v)
        self.initialised = bool(state["initialised"])


def fisher_penalty(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> Tensor:
    """EWC's quadratic penalty ``sum_i F_i (theta_i - theta*_i)**2`` over the names in ``fisher``.

    Its gradient with respect to theta is ``2 F (theta - theta*)``; zero at the anchor.
    """
    terms = [(fisher[n] * (params[n] - anchor[n].detach()).square()).sum() for n in fisher]
    if not terms:
        raise ValueError("fisher_penalty needs at least one parameter")
    return torch.stack(terms).sum()


@torch.no_grad()
def top_fraction_masks(values: Mapping[str, Tensor], fraction: float) -> Dict[str, Tensor]:
    """Boolean masks marking the elements whose value is in the global top ``fraction`` (strictly above the threshold).

    The threshold is the ``(1 - fraction)`` quantile over all elements of all tensors, found with ``kthvalue`` on
    the device (no host sync; works beyond ``torch.quantile``'s 16M-element limit). ``fraction=0`` marks nothing.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if not values:
        return {}
    if fraction <= 0.0:
        return {k: torch.zeros_like(v, dtype=torch.bool) for k, v in values.items()}
    if fraction >= 1.0:
        return {k: torch.ones_like(v, dtype=torch.bool) for k, v in values.items()}
    flat = torch.cat([v.detach().reshape(-1).float() for v in values.values()])
    k = max(1, flat.numel() - int(round(fraction * flat.numel())))  # elements above the k-th smallest: the top part
    threshold = flat.kthvalue(k).values
    return {name: v > threshold for name, v in values.items()}


def masks_for(model: nn.Module, masks: Mapping[str, Tensor], invert: bool = False) -> List[Optional[Tensor]]:
    """Masks aligned with ``model.parameters()`` (``None`` where no mask is given), optionally inverted."""
    out: List[Optional[Tensor]] = []
    for name, _ in model.named_parameters():
        m = masks.get(name)
        out.append(None if m is None else (~m if invert else m))
    return out
