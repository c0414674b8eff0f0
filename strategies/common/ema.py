"""Mean-teacher mechanics: a frozen copy of a network and its exponential-moving-average update."""
from __future__ import annotations

import copy
from typing import List

import torch
from torch import Tensor, nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters never receive gradients (a teacher or an anchor)."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: teacher <- momentum * teacher + (1 - momentum) * student, over all parameters (CoTTA, PSMT, RMT)."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student do not have the same parameters")
    torch._foreach_lerp_(t_params, [s.detach() for s in s_params], 1.0 - momentum)


@torch.no_grad()
def ensemble_with_source_(params: List[nn.Parameter], source: List[Tensor], momentum: float) -> None:
    """In place: p <- momentum * p + (1 - momentum) * p_source, per tensor (ROID's weight ensembling, written as the
    reference benchmark's ``ema_update_model``: two products and a sum, not a lerp, which rounds differently)."""
    for p, s in zip(params, source):
        p.copy_(momentum * p + (1 - momentum) * s)
