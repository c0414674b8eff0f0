"""Memory banks over a target set and their k-nearest-neighbour look-ups (AaD, ViLAaD; also NRC/SHOT-style methods).

The official AaD code indexes its feature and score banks by the sample's position in the target data set. The
engine hands a strategy only images, reshuffled every epoch, so :class:`SampleBank` recovers that index from the
images themselves: each image gets a key (a fixed random projection of the image, average-pooled to at most
16 x 16), and a batch is matched to the bank's keys by nearest key; a key within ``tol`` (relative) of a stored one
is the same sample and gets its slot, any other a new slot. For the ``sfda`` stream the target images are the same
tensors every epoch (the corruption is seeded), so after the first epoch every slot is one data-set index, as in
the official code. What differs: the official code fills the whole bank with the source model's outputs before
adapting; here a slot is filled when its sample is first seen, and look-ups ignore slots not filled yet.

No host synchronisation per step: slots, counts and masks stay on the device; the bank grows (doubling) only when
a host-side upper bound on the number of filled slots says it may be full, which costs one read of the count.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG_INF = float("-inf")


def knn_indices(query: Tensor, bank: Tensor, k: int, valid: Optional[Tensor] = None,
                exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The ``k`` bank rows most similar (dot product) to each query row: ``(indices B x k, mask B x k)``.

    ``valid`` (bank size, bool) marks usable rows; ``exclude`` (B, long) is a row each query must not pick
    (its own slot). ``mask`` is False where fewer than ``k`` usable rows exist (those indices are meaningless).
    """
    sim = query @ bank.t()
    if valid is not None:
        sim = sim.masked_fill(~valid.unsqueeze(0), NEG_INF)
    if exclude is not None:
        sim = sim.scatter(1, exclude.view(-1, 1), NEG_INF)
    k_eff = min(int(k), bank.shape[0])
    values, index = sim.topk(k_eff, dim=1)
    return index, values > NEG_INF


def neighbour_attraction(probs: Tensor, neighbour_probs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """AaD's attraction: ``-mean_i sum_k <p_i, s_ik>`` over the k neighbours' (bank) predictions s (B x k x C).

    The official code writes it as ``sum KL(s || p)`` with ``p`` passed un-logged to ``F.kl_div``, which equals
    ``sum s log s - <p, s>``: the same gradient, shifted by a constant.
    """
    dots = (probs.unsqueeze(1) * neighbour_probs).sum(-1)  # B x k
    if mask is not None:
        dots = dots * mask.to(dots.dtype)
    return -dots.sum(1).mean()


def batch_dispersion(probs: Tensor) -> Tensor:
    """AaD's dispersion: ``mean_i sum_{j != i} <p_i, p_j>`` over the batch (gradients flow through both sides)."""
    gram = probs @ probs.t()
    return (gram.sum(1) - gram.diagonal()).mean()


def decay(iteration: int, max_iter: Optional[int], power: float, gamma: float = 10.0) -> float:
    """``(1 + gamma * iteration / max_iter) ** (-power)``; 1 when ``max_iter`` is unknown (no schedule)."""
    if not max_iter:
        return 1.0
    return float((1.0 + gamma * min(iteration, max_iter) / max_iter) ** (-power))


class SampleBank(nn.Module):
    """Per-sample tables (``features``, ``scores``, ...) over a target set, indexed by slots recovered from images.

    ``slots(x)`` gives each image its slot (new images get new ones); ``write(name, slots, values)`` stores rows;
    ``table(name)`` reads a table; ``neighbours(feats, slots, k)`` gives the k most similar filled slots in the
    ``features`` table, each sample's own slot excluded. Everything is a buffer, so the bank moves with ``.to()`` and
    is part of the strategy's checkpoint (buffers are resized on load: a bank has the size it had when saved).
    """

    def __init__(self, key_dim: int = 64, tol: float = 1e-3, seed: int = 0, min_capacity: int = 256) -> None:
        super().__init__()
        self.key_dim, self.tol, self.seed, self.min_capacity = int(key_dim), float(tol), int(seed), int(min_capacity)
        self.register_buffer("keys", torch.zeros(0, self.key_dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._proj: Optional[Tensor] = None
        self._upper: Optional[int] = 0  # host-side upper bound of ``count`` (None: unknown, read it once)

    # --- identities ---------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    def _tables(self) -> Dict[str, Tensor]:
        return {n[6:]: b for n, b in self._buffers.items() if n.startswith("table_") and b is not None}

    def image_keys(self, x: Tensor) -> Tensor:
        """N x key_dim keys: the images pooled to at most 16 x 16, times a fixed seeded Gaussian projection."""
        x = x.detach().float()
        if x.dim() == 4 and max(x.shape[-2:]) > 16:
            x = F.adaptive_avg_pool2d(x, (min(16, x.shape[-2]), min(16, x.shape[-1])))
        flat = x.flatten(1)
        if self._proj is None or self._proj.shape[0] != flat.shape[1] or self._proj.device != flat.device:
            gen = torch.Generator().manual_seed(self.seed)  # drawn on the host: the same keys on every device
            self._proj = torch.randn(flat.shape[1], self.key_dim, generator=gen).to(flat.device)
        return flat @ self._proj

    def _reserve(self, n: int, device: torch.device) -> None:
        """Make room for ``n`` more slots; reads the count (one sync) only when the bound says the bank may be full."""
        if self._upper is None or self._upper + n > self.capacity:
            self._upper = int(self.count)
            need = self._upper + n + max(n, self._upper // 2)  # slack: the next read comes >= count/2 samples later
            if need > self.capacity:
                self._resize(max(2 * self.capacity, need, self.min_capacity), device)
        self._upper += n

    def _resize(self, capacity: int, device: torch.device) -> None:
        for name, buf in list(self._buffers.items()):
            if buf is None or name == "count":
                continue
            grown = torch.zeros(capacity, *buf.shape[1:], dtype=buf.dtype, device=device)
            grown[:buf.shape[0]] = buf.to(device)
            self._buffers[name] = grown

    @torch.no_grad()
    def slots(self, x: Tensor) -> Tensor:
        """Slot index (long, on x's device) of each image of ``x``; images not in the bank get new slots."""
        keys = self.image_keys(x)
        n = keys.shape[0]
        self._reserve(n, keys.device)
        if self.keys.device != keys.device:
            self.to(keys.device)
        filled = torch.arange(self.capacity, device=keys.device) < self.count
        dist = torch.cdist(keys, self.keys).masked_fill(~filled.unsqueeze(0), float("inf"))
        dmin, nearest = dist.min(dim=1)
        found = dmin <= self.tol * keys.norm(dim=1).clamp_min(1e-12)
        new = ~found
        fresh = self.count + new.long().cumsum(0) - 1
        slot = torch.where(found, nearest, fresh)
        self.keys[slot] = keys
        self.count += new.long().sum()
        return slot

    # --- tables -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write(self, name: str, slot: Tensor, values: Tensor) -> None:
        """Store ``values`` (N x ...) at ``slot`` in table ``name`` (created on first write)."""
        attr = f"table_{name}"
        buf = self._buffers.get(attr)
        if buf is None or buf.shape[1:] != values.shape[1:]:
            buf = torch.zeros(self.capacity, *values.shape[1:], dtype=values.dtype, device=values.device)
            self.register_buffer(attr, buf)
        buf[slot] = values.detach().to(buf.dtype)

    def table(self, name: str) -> Tensor:
        """Table ``name`` (capacity x ...); rows at or beyond ``count`` are unfilled."""
        buf = self._buffers.get(f"table_{name}")
        if buf is None:
            raise KeyError(f"the bank has no table {name!r}; write to it first")
        return buf

    def filled(self) -> Tensor:
        """Bool mask (capacity) of the filled slots."""
        return torch.arange(self.capacity, device=self.keys.device) < self.count

    def neighbours(self, feats: Tensor, slot: Tensor, k: int, table: str = "features") -> Tuple[Tensor, Tensor]:
        """``(indices, mask)`` of the ``k`` filled slots whose ``table`` rows are most similar to ``feats``."""
        return knn_indices(feats, self.table(table), k, valid=self.filled(), exclude=slot)

    # --- checkpoints: buffers take the saved size ---------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        device = self.keys.device
        for name in list(self._buffers):
            if name.startswith("table_") and prefix + name not in state_dict:
                del self._buffers[name]
        for key, value in state_dict.items():
            if not key.startswith(prefix) or "." in key[len(prefix):]:
                continue
            name = key[len(prefix):]
            if name == "keys" or name.startswith("table_"):
                self._buffers[name] = torch.zeros_like(value, device=device)
        self._upper = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


__all__ = ["SampleBank", "batch_dispersion", "decay", "knn_indices", "neighbour_attraction"]
