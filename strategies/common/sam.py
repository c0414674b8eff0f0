"""Sharpness-aware updates: the SAM perturbation and GSAM's surrogate-gap guided descent direction.

SAM (Foret et al., ICLR 2021): climb to ``w + e`` with ``e = rho * g / ||g||`` (``g`` the gradient at ``w``, the norm
taken over all parameters together), take the gradient ``g_p`` there, come back to ``w`` and descend along ``g_p``.

GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022; reference code
github.com/juntang-zhuang/GSAM, ``gsam/gsam.py``): additionally decompose the *original* gradient ``g`` into its
component parallel to ``g_p`` and the orthogonal rest ``g_orth = g - (<g, g_p> / ||g_p||^2) g_p``, and descend
along ``g_p - alpha * g_orth``. Ascending along ``g_orth`` lowers the surrogate gap ``f(w + e) - f(w)`` without
changing the perturbed loss to first order. ``alpha = 0`` is SAM. The reference code keeps ``rho`` on a schedule
tied to the learning rate; an online adaptation stream has no schedule, so ``rho`` is a constant here.

Everything stays on the device (no host syncs); a zero gradient gives a zero perturbation and a zero direction.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor, nn


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of all ``tensors`` taken together (a 0-d tensor on their device)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def inner(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product of two parameter-shaped lists, as one 0-d tensor."""
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def gradients(loss: Tensor, params: Sequence[nn.Parameter]) -> List[Tensor]:
    """d loss / d params, zeros for parameters the loss does not reach."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


@torch.no_grad()
def sam_perturbation(grads: Sequence[Tensor], rho: float, eps: float = 1e-12) -> List[Tensor]:
    """SAM's ascent step ``e = rho * g / (||g|| + eps)``."""
    scale = rho / (global_norm(grads) + eps)
    return [g * scale for g in grads]


@torch.no_grad()
def surrogate_gap_direction(grads: Sequence[Tensor], perturbed: Sequence[Tensor], alpha: float,
                            eps: float = 1e-12) -> List[Tensor]:
    """GSAM's descent direction ``g_p - alpha * (g - (<g, g_p> / ||g_p||^2) g_p)``."""
    coef = inner(grads, perturbed) / (inner(perturbed, perturbed) + eps)
    return [gp - alpha * (g - coef * gp) for g, gp in zip(grads, perturbed)]


def perturbed_gradients(params: Sequence[nn.Parameter], closure: Callable[[bool], Tensor], rho: float,
                        eps: float = 1e-12) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """SAM's two gradients: ``g`` at ``w`` and ``g_p`` at ``w + rho g / (||g|| + eps)``.

    ``closure(perturbed)`` runs a forward and returns the scalar loss; it is called with ``False`` at ``w`` and with
    ``True`` at ``w + e``. The parameters are back at ``w`` on return, bit for bit (their values are copied back, as
    SAM's ``second_step`` does, not ``e`` subtracted). Returns (the detached loss at ``w``, ``g``, ``g_p``).
    """
    params = list(params)
    with torch.enable_grad():
        loss = closure(False)
        g = gradients(loss, params)
    e = sam_perturbation(g, rho, eps)
    with torch.no_grad():
        old = [p.detach().clone() for p in params]
        for p, d in zip(params, e):
            p.add_(d)
    try:
        with torch.enable_grad():
            g_p = gradients(closure(True), params)
    finally:
        with torch.no_grad():
            for p, w in zip(params, old):
                p.copy_(w)
    return loss.detach(), g, g_p


def sam_step(params: Sequence[nn.Parameter], closure: Callable[[bool], Tensor], rho: float,
             eps: float = 1e-12) -> Tensor:
    """Put SAM's direction ``g_p`` in ``p.grad`` of every parameter (the caller then runs its optimizer's ``step``);
    see :func:`perturbed_gradients`. Returns the (detached) loss at ``w``."""
    params = list(params)
    loss, _, g_p = perturbed_gradients(params, closure, rho, eps)
    for p, d in zip(params, g_p):
        p.grad = d
    return loss


def gsam_step(params: Sequence[nn.Parameter], closure: Callable[[bool], Tensor], rho: float, alpha: float,
              eps: float = 1e-12) -> Tensor:
    """Put GSAM's direction in ``p.grad`` of every parameter (the caller then runs its optimizer's ``step``).

    ``closure(perturbed)`` runs a forward and returns the scalar loss; it is called with ``False`` at ``w`` and with
    ``True`` at ``w + e``. The parameters are back at ``w`` on return. Returns the (detached) loss at ``w``.
    """
    params = list(params)
    loss, g, g_p = perturbed_gradients(params, closure, rho, eps)
    direction = surrogate_gap_direction(g, g_p, alpha, eps)
    for p, d in zip(params, direction):
        p.grad = d
    return loss


__all__ = ["global_norm", "gradients", "gsam_step", "inner", "perturbed_gradients", "sam_perturbation", "sam_step",
           "surrogate_gap_direction"]
