"""Frequent-directions sketch of a stream of column blocks (Liberty, KDD 2013; Ghashami et al. 2016).

The sketch keeps ``B = U diag(sigma)`` (d x r) with ``B B^T ~ A A^T`` for ``A`` = all columns seen so far. Each update
takes the SVD of ``[decay * B, block]``, keeps the top ``r`` directions and shrinks their squared singular values by
the (r+1)-th one. With ``decay = 1`` the error is one-sided and bounded:
``0 <= A A^T - B B^T`` and ``||A A^T - B B^T||_2 <= ||A||_F^2 / (r + 1)``.
CoSO (arXiv 2505.11816) sketches a task's (projected) gradients this way and keeps the energy-dominant directions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def fd_update(basis: Optional[Tensor], sigma: Optional[Tensor], block: Tensor, rank: int,
              decay: float = 1.0) -> Tuple[Tensor, Tensor]:
    """One frequent-directions step: the new ``(basis d x rank, sigma rank)`` after absorbing ``block`` (d x c)."""
    block = block.reshape(block.shape[0], -1)
    merged = block if basis is None else torch.cat([(decay * basis) * sigma, block], dim=1)
    work = merged if merged.dtype == torch.float64 else merged.float()
    u, s, _ = torch.linalg.svd(work, full_matrices=False)
    delta = s[rank] ** 2 if s.numel() > rank else s.new_zeros(())
    shrunk = (s[:rank] ** 2 - delta).clamp_min(0).sqrt()
    u = u[:, :rank]
    if shrunk.numel() < rank:  # fewer columns than the rank so far: pad with zero-energy directions
        pad = rank - shrunk.numel()
        shrunk = torch.cat([shrunk, shrunk.new_zeros(pad)])
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
    return u.to(block.dtype), shrunk.to(block.dtype)


def energy_rank(sigma: Tensor, threshold: float, rule: str = "reach") -> int:
    """Number of leading directions kept for an energy (sigma^2) share ``threshold``.

    ``rule="reach"``: the fewest leading directions whose cumulative share reaches ``threshold`` (GPM-style, the
    paper's description); ``rule="below"``: the official code's count ``sum(cumsum(ratio) < threshold)``, one fewer
    (it keeps nothing when the top direction alone holds the share). A host sync: call it at task ends only.
    """
    if rule not in ("reach", "below"):
        from ctta.errors import ConfigError

        raise ConfigError(f"energy rule must be 'reach' or 'below', got {rule!r}")
    energy = sigma.double() ** 2
    total = energy.sum()
    if float(total) <= 0:
        return 0
    below = int((torch.cumsum(energy / total, dim=0) < threshold).sum())
    if rule == "below":
        return below
    return min(below + 1, int((energy > 0).sum()))


class FrequentDirections:
    """A rank-``rank`` frequent-directions sketch of column blocks of dimension ``dim`` (see the module docstring)."""

    def __init__(self, rank: int, decay: float = 1.0) -> None:
        self.rank = int(rank)
        self.decay = float(decay)
        self.basis: Optional[Tensor] = None
        self.sigma: Optional[Tensor] = None

    def update(self, block: Tensor) -> None:
        self.basis, self.sigma = fd_update(self.basis, self.sigma, block, self.rank, self.decay)

    @property
    def sketch(self) -> Tensor:
        """``B`` (d x rank), with ``B B^T`` approximating the Gram matrix of the columns seen."""
        if self.basis is None or self.sigma is None:
            raise RuntimeError("the sketch has seen no data yet")
        return self.basis * self.sigma
