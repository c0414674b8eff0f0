"""RoTTA's category-balanced memory bank with timeliness and uncertainty (CSTU; Yuan, Xie, Li, CVPR 2023,
arXiv 2303.13899, Sec. 3.3 and Algorithm 1).

The bank holds at most ``capacity`` test images, each with its pseudo-label, its uncertainty u (the entropy of the
teacher's prediction) and its age A (how many insertions it has seen, its own included). Each item scores
``S = lambda_t / (1 + exp(-A / capacity)) + lambda_u * u / ln C``: old and uncertain items score high. A new item
(A = 0) of class y is stored
  * outright if class y holds fewer than capacity / C items and the bank is not full;
  * else in place of the highest-scoring item of the majority classes (class y under capacity / C, bank full), or of
    class y itself (class y at or over capacity / C), provided that item scores more than the new one; otherwise
    the new item is dropped.
After every insertion attempt all items age by one. Ties go to the last item in class-major order, as the
reference's ``>=`` (mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/rotta.py`` ``CSTU``, after
BIT-DA/RoTTA ``core/utils/memory.py``); scores are computed in Python floats with the same expression.

The images live in one device buffer of ``capacity`` slots; the labels, uncertainties and insertion times on the
host (one host read of the batch's labels and uncertainties per batch, as the reference's ``.item()`` per sample).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

Entry = Tuple[int, float, int]  # (slot, uncertainty, insertion time)


class CategoryBalancedMemory(nn.Module):
    """CSTU: ``add`` one test sample at a time, ``get`` the stored images (class-major order) and their ages."""

    def __init__(self, capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0) -> None:
        super().__init__()
        self.capacity, self.num_classes = int(capacity), int(num_classes)
        self.per_class = self.capacity / self.num_classes
        self.lambda_t, self.lambda_u = float(lambda_t), float(lambda_u)
        self.register_buffer("images", torch.zeros(0))
        self.entries: List[List[Entry]] = [[] for _ in range(self.num_classes)]
        self.free: List[int] = list(range(self.capacity))
        self.calls = 0  # insertion attempts so far: an item's age is calls - its insertion time

    # --- the rule -----------------------------------------------------------------------------------------------
    def score(self, age: int, uncertainty: float) -> float:
        """S = lambda_t / (1 + exp(-age / capacity)) + lambda_u * uncertainty / ln C (timeliness + uncertainty)."""
        return self.lambda_t * 1 / (1 + math.exp(-age / self.capacity)) \
            + self.lambda_u * uncertainty / math.log(self.num_classes)

    def occupancy(self) -> int:
        return sum(len(c) for c in self.entries)

    def per_class_counts(self) -> List[int]:
        return [len(c) for c in self.entries]

    def add(self, image: Tensor, label: int, uncertainty: float) -> bool:
        """Offer one sample; returns whether it was stored. Every item ages by one afterwards."""
        stored = self._make_room(label, self.score(0, uncertainty))
        if stored:
            slot = self.free.pop(0)
            self._write(slot, image)
            self.entries[label].append((slot, float(uncertainty), self.calls))
        self.calls += 1
        return stored

    def _make_room(self, label: int, new_score: float) -> bool:
        """Whether the new item may go in, evicting the item the rule picks when needed."""
        if len(self.entries[label]) < self.per_class:
            if self.occupancy() < self.capacity:
                return True
            counts = self.per_class_counts()
            majority = [c for c, n in enumerate(counts) if n == max(counts)]
            return self._evict(majority, new_score)
        return self._evict([label], new_score)

    def _evict(self, classes: List[int], new_score: float) -> bool:
        """Remove the highest-scoring item of ``classes`` if it scores more than ``new_score``; True when room."""
        best: Optional[Tuple[int, int]] = None
        best_score = 0.0
        for c in classes:
            for i, (_, u, t) in enumerate(self.entries[c]):
                s = self.score(self.calls - t, u)
                if best is None or s >= best_score:
                    best, best_score = (c, i), s
        if best is None:
            return True
        if best_score > new_score:
            slot = self.entries[best[0]].pop(best[1])[0]
            self.free.append(slot)
            return True
        return False

    def _write(self, slot: int, image: Tensor) -> None:
        if self.images.dim() == 1:  # first image: the buffer takes its shape, dtype and device
            self.images = torch.zeros(self.capacity, *image.shape, dtype=image.dtype, device=image.device)
        self.images[slot].copy_(image.detach())

    # --- reading ------------------------------------------------------------------------------------------------
    def get(self) -> Tuple[Tensor, Tensor]:
        """(images, ages / capacity as float32), class by class in insertion order (the reference's order)."""
        slots = [s for c in self.entries for (s, _, _) in c]
        ages = [(self.calls - t) / self.capacity for c in self.entries for (_, _, t) in c]
        index = torch.tensor(slots, dtype=torch.long, device=self.images.device)
        return self.images.index_select(0, index), torch.tensor(ages, dtype=torch.float32, device=self.images.device)

    def labels(self) -> List[int]:
        """The stored items' pseudo-labels, in the order of :meth:`get`."""
        return [c for c, items in enumerate(self.entries) for _ in items]

    # --- state: the host part travels as extra state, the image buffer takes the saved shape --------------------
    def host_state(self) -> Dict[str, Any]:
        return {"entries": [list(c) for c in self.entries], "free": list(self.free), "calls": self.calls}

    def load_host_state(self, state: Dict[str, Any]) -> None:
        self.entries = [[tuple(e) for e in c] for c in state["entries"]]  # type: ignore[misc]
        self.free, self.calls = list(state["free"]), int(state["calls"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        saved = state_dict.get(prefix + "images")
        if saved is not None and saved.shape != self.images.shape:
            self.images = torch.zeros_like(saved, device=self.images.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def timeliness_weights(ages: Tensor) -> Tensor:
    """RoTTA's time-aware reweighting of the memory samples' loss: exp(-A) / (1 + exp(-A)), A = age / capacity."""
    return torch.exp(-ages) / (1 + torch.exp(-ages))


__all__ = ["CategoryBalancedMemory", "timeliness_weights"]
