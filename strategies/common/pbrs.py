"""Prediction-balanced reservoir sampling (PBRS; Gong et al., NOTE, NeurIPS 2022): a memory of test samples that
stays balanced over pseudo-classes and time-uniform within each class, for temporally correlated streams.

Rule per incoming sample of pseudo-class c (seen-counter n_c incremented first): while the memory is not full, add
it. When full: if c is not among the largest classes, evict a uniformly chosen sample of a uniformly chosen largest
class and add it; else (c is a largest class) add it in place of a uniformly chosen sample of c with probability
m_c / n_c (m_c: samples of c held), otherwise drop it. As NOTE's ``PBRS`` (TaesikGong/NOTE; LINs-lab/ttab @ 19cb3ce
``ttab/model_adaptation/note.py``), with the same draws from a ``random.Random`` in the same order (``choice``,
``randrange``, ``uniform``), so a reference seeded alike keeps the same samples; the memory reads out class by class,
each in insertion order, as its ``get_memory``.

The bookkeeping is on the host (per-class lists of slot numbers); the images stay on their device in one tensor of
``capacity`` slots, written once per batch.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor


class PBRS:
    """Class-balanced reservoir over ``capacity`` slots; ``add(x, pseudo_labels)`` per batch, ``images()`` to read."""

    def __init__(self, capacity: int, num_classes: int, seed: int = 0) -> None:
        self.capacity, self.num_classes = int(capacity), int(num_classes)
        self.rng = random.Random(seed)
        self.slots: List[List[int]] = [[] for _ in range(self.num_classes)]
        self.counter = [0] * self.num_classes
        self.bank: Optional[Tensor] = None

    def occupancy(self) -> int:
        return sum(len(s) for s in self.slots)

    def per_class(self) -> List[int]:
        return [len(s) for s in self.slots]

    def _place(self, c: int) -> Optional[int]:
        """The slot the next sample of class ``c`` goes to (after any eviction), or None when it is dropped."""
        self.counter[c] += 1
        if self.occupancy() < self.capacity:
            return self.occupancy()  # slots fill 0, 1, ... before the memory is first full; none is freed before
        sizes = self.per_class()
        largest = [i for i, n in enumerate(sizes) if n == max(sizes)]
        if c not in largest:
            victim = self.rng.choice(largest)
            return self.slots[victim].pop(self.rng.randrange(0, len(self.slots[victim])))
        if self.rng.uniform(0, 1) <= sizes[c] / self.counter[c]:
            return self.slots[c].pop(self.rng.randrange(0, len(self.slots[c])))
        return None

    def add(self, x: Tensor, pseudo_labels: Sequence[int]) -> None:
        """Offer the samples of batch ``x`` in order, with their pseudo-labels (host integers)."""
        if self.bank is None:
            self.bank = x.new_zeros((self.capacity, *x.shape[1:]))
        written: Dict[int, int] = {}
        for i, c in enumerate(pseudo_labels):
            slot = self._place(int(c))
            if slot is not None:
                self.slots[int(c)].append(slot)
                written[slot] = i  # the last sample written to a slot wins
        if written:
            index = torch.tensor(list(written.keys()), device=x.device)
            rows = torch.tensor(list(written.values()), device=x.device)
            self.bank.index_copy_(0, index, x.index_select(0, rows).to(self.bank.dtype))

    def images(self) -> Tensor:
        """The held samples, class by class, each class in insertion order."""
        if self.bank is None:
            raise RuntimeError("PBRS memory is empty")
        order = [s for cls in self.slots for s in cls]
        return self.bank.index_select(0, torch.tensor(order, device=self.bank.device))

    def state(self) -> Dict[str, Any]:
        return {"slots": [list(s) for s in self.slots], "counter": list(self.counter), "rng": self.rng.getstate(),
                "bank": None if self.bank is None else self.bank.clone()}

    def load(self, state: Optional[Dict[str, Any]]) -> None:
        if state is None:
            return
        self.slots = [list(s) for s in state["slots"]]
        self.counter = list(state["counter"])
        self.rng.setstate(state["rng"])
        self.bank = None if state["bank"] is None else state["bank"].clone()


__all__ = ["PBRS"]
