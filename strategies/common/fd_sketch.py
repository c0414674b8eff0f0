"""Frequent-directions sketch of a stream of column blocks (Liberty, KDD 2013; Ghashami et al. 2016).

The sketch keeps ``B = U diag(sigma)`` (d x r) with ``B B^T ~ A A^T`` for ``A`` = all columns seen so far. Each update
takes the SVD of ``[decay * B, block]``, keeps the top ``r`` directions and shrinks their squared singular values by
the (r+1)-th one. With ``decay = 1`` the error is one-sided and bounded:
``0 <= A A^T - B B^T`` and ``||A A^T - B B^T||_2 <= ||A||_F^2 / (r + 1)``.
CoSO (arXiv 2505.11816) sketches a task's (projected) gradients this way and keeps the energy-dominant directions.
Its official sketch (``DoubleSVD`` in github.com/quinn-ch/CoSO ``coso/coso_projector.py``) first shrinks each
incoming block by the block's own (r+1)-th singular value (keeping its top ``r`` directions) and only then merges
and shrinks again: ``shrink_block=True``. The bound above still holds (each shrink by ``delta`` removes at least
``(r + 1) delta`` of squared Frobenius mass), the sketch is just coarser than the textbook one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def shrink_top(u: Tensor, s: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """The top ``rank`` directions of an SVD ``(u, s)`` with ``sigma_i^2`` shrunk by ``sigma_{rank+1}^2`` (0 when
    there is no (rank+1)-th value), padded with zero-energy directions to ``rank`` columns."""
    delta = s[rank] ** 2 if s.numel() > rank else s.new_zeros(())
    shrunk = (s[:rank] ** 2 - delta).clamp_min(0).sqrt()
    u = u[:, :rank]
    if shrunk.numel() < rank:  # fewer columns than the rank so far: pad with zero-energy directions
        pad = rank - shrunk.numel()
        shrunk = torch.cat([shrunk, shrunk.new_zeros(pad)])
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
    return u, shrunk


def fd_update(basis: Optional[Tensor], sigma: Optional[Tensor], block: Tensor, rank: int,
              decay: float = 1.0, shrink_block: bool = False,
              block_svd: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """One frequent-directions step: the new ``(basis d x rank, sigma rank)`` after absorbing ``block`` (d x c).

    ``shrink_block``: first reduce ``block`` to its top ``rank`` directions shrunk by its own (rank+1)-th singular
    value (CoSO's ``DoubleSVD``), then merge; ``block_svd`` = ``(u, s)`` of ``block`` when the caller has it already
    (CoSO takes the gradient's SVD for its projector anyway)."""
    block = block.reshape(block.shape[0], -1)
    dtype = torch.float64 if block.dtype == torch.float64 else torch.float32
    incoming = block.to(dtype)
    if shrink_block:
        if block_svd is None:
            bu, bs, _ = torch.linalg.svd(incoming, full_matrices=False)
        else:
            bu, bs = block_svd[0].to(dtype), block_svd[1].to(dtype)
        bu, bs = shrink_top(bu, bs, rank)
        if basis is None:  # the first block is the sketch (already of rank ``rank``, nothing more to shrink)
            return bu.to(block.dtype), bs.to(block.dtype)
        incoming = bu * bs
    merged = incoming if basis is None else torch.cat([((decay * basis) * sigma).to(dtype), incoming], dim=1)
    u, s, _ = torch.linalg.svd(merged, full_matrices=False)
    u, shrunk = shrink_top(u, s, rank)
    return u.to(block.dtype), shrunk.to(block.dtype)


def energy_rank(sigma: Tensor, threshold: float, rule: str = "below") -> int:
    """Number of leading directions kept for an energy (sigma^2) share ``threshold``.

    ``rule="below"`` (default): the official CoSO count ``sum(cumsum(ratio) < threshold)``
    (``CoSOProjector.update_historical_space``), which keeps nothing when the top direction alone holds the share;
    ``rule="reach"``: the fewest leading directions whose cumulative share reaches ``threshold`` (GPM-style), one
    more unless that would be a zero-energy direction. A host sync: call it at task ends only.
    """
    if rule not in ("reach", "below"):
        from ctta.errors import ConfigError

        raise ConfigError(f"energy rule must be 'reach' or 'below', got {rule!r}")
    energy = sigma.double() ** 2
    total = energy.sum()
    if float(total) <= 0:
        return 0
    below = int((torch.cumsum(energy / total, dim=0) < threshold).sum())
    nonzero = int((energy > 0).sum())  # rounding can leave the share just under 1: never a zero-energy direction
    return min(below if rule == "below" else below + 1, nonzero)


class FrequentDirections:
    """A rank-``rank`` frequent-directions sketch of column blocks of dimension ``dim`` (see the module docstring)."""

    def __init__(self, rank: int, decay: float = 1.0, shrink_block: bool = False) -> None:
        self.rank = int(rank)
        self.decay = float(decay)
        self.shrink_block = bool(shrink_block)
        self.basis: Optional[Tensor] = None
        self.sigma: Optional[Tensor] = None

    def update(self, block: Tensor) -> None:
        self.basis, self.sigma = fd_update(self.basis, self.sigma, block, self.rank, self.decay, self.shrink_block)

    @property
    def sketch(self) -> Tensor:
        """``B`` (d x rank), with ``B B^T`` approximating the Gram matrix of the columns seen."""
        if self.basis is None or self.sigma is None:
            raise RuntimeError("the sketch has seen no data yet")
        return self.basis * self.sigma
