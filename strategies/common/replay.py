"""Memories of past labelled samples: a reservoir buffer (ER, ER-ACE, DER / DER++), an unbounded store (joint
training) and GDumb's greedy class-balanced memory.

The first two live on the device, allocate on the first batch, and take batches without a host sync: the only
host-side state is the number of samples seen, which the batch shapes give. The greedy memory reads each batch's
labels on the host (its rule is per sample).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError


def per_sample_elements(n: int, *tensors: Tensor) -> int:
    """Elements of ``n`` rows of each of ``tensors`` (row-major memories; empty ones count 0)."""
    return sum(n * (t[0].numel() if t.dim() else 1) for t in tensors if t.numel())


class ReservoirBuffer(nn.Module):
    """Reservoir sampling (Vitter's algorithm R): after n samples were offered, each is held with probability
    ``capacity / n`` and the buffer never holds more than ``capacity``.

    A batch is processed as if its samples arrived one by one: sample i (0-based count ``t`` of all seen) goes to
    slot ``t`` while the buffer fills, else to slot ``j ~ U{0..t}`` when ``j < capacity``; when two samples of the
    same batch draw the same slot the later one wins, exactly as in the sequential algorithm.

    Each held sample also carries a task id (``add(..., task=...)``; without one, the buffer's ``task`` attribute,
    0 unless a learner sets it at each session): methods such as AdaB²N need the task of every replayed sample.
    ``sample`` leaves the task ids of what it drew in ``last_tasks``; ``sample_with_tasks`` returns them.

    A sample may also carry the network's logits at insertion (``add(..., logits=...)``, DER's dark knowledge): kept
    as written, never refreshed; ``sample_with_logits`` draws them with their samples.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"buffer capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.seen = 0  # samples offered so far (host int, from batch shapes)
        self.task = 0  # task id stamped on samples added without an explicit one
        self.last_tasks: Optional[Tensor] = None  # task ids of the last ``sample`` draw
        # one extra row absorbs the writes of samples that are not kept; non-persistent: the content travels in
        # ``state()``, since the shapes are only known after the first batch
        self.register_buffer("x", torch.empty(0), persistent=False)
        self.register_buffer("y", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("t", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("z", torch.empty(0), persistent=False)  # logits at insertion (allocated on first use)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def _allocate(self, x: Tensor) -> None:
        self.x = torch.zeros((self.capacity + 1, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self.y = torch.zeros(self.capacity + 1, dtype=torch.long, device=x.device)
        self.t = torch.zeros(self.capacity + 1, dtype=torch.long, device=x.device)

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, generator: Optional[torch.Generator] = None,
            task: Optional[int | Tensor] = None, logits: Optional[Tensor] = None) -> None:
        """Offer the batch ``(x, y)`` to the reservoir; ``task`` (an int or one id per sample) defaults to
        ``self.task``; ``logits`` (one row per sample), when given, are stored with the samples kept."""
        b = int(x.shape[0])
        if b == 0:
            return
        if self.x.numel() == 0:
            self._allocate(x)
        dev = self.x.device
        t = torch.arange(self.seen, self.seen + b, device=dev)  # 0-based arrival index
        u = torch.rand(b, device=dev, generator=generator)
        j = torch.minimum((u * (t + 1).to(u.dtype)).long(), t)  # uniform on {0..t}
        slot = torch.where(t < self.capacity, t, j)
        keep = slot < self.capacity
        # last writer wins: drop a kept sample when a later kept one of this batch takes the same slot
        order = torch.arange(b, device=dev)
        later = order.unsqueeze(0) > order.unsqueeze(1)  # [i, k]: k comes after i
        clash = (slot.unsqueeze(0) == slot.unsqueeze(1)) & later & keep.unsqueeze(0)
        keep = keep & ~clash.any(dim=1)
        slot = torch.where(keep, slot, torch.full_like(slot, self.capacity))
        self.x.index_copy_(0, slot, x.detach().to(self.x.dtype))
        self.y.index_copy_(0, slot, y.detach().long())
        if isinstance(task, Tensor):
            tasks = task.detach().to(dev, torch.long).expand(b).contiguous()
        else:
            tasks = torch.full((b,), self.task if task is None else int(task), dtype=torch.long, device=dev)
        self.t.index_copy_(0, slot, tasks)
        if logits is not None:
            if self.z.numel() == 0:
                self.z = torch.zeros((self.capacity + 1, *logits.shape[1:]), dtype=logits.dtype, device=dev)
            self.z.index_copy_(0, slot, logits.detach().to(self.z.dtype))
        self.seen += b

    @torch.no_grad()
    def sample(self, k: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """``min(k, len)`` samples drawn uniformly without replacement (their task ids go to ``last_tasks``)."""
        x, y, _ = self.sample_with_tasks(k, generator)
        return x, y

    @torch.no_grad()
    def sample_with_tasks(self, k: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """As :meth:`sample`, also returning the task id of each sample drawn."""
        idx = self.draw(k, generator)
        t = self.t[idx] if self.t.numel() else torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)
        self.last_tasks = t
        return self.x[idx], self.y[idx], t

    @torch.no_grad()
    def sample_with_logits(self, k: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """As :meth:`sample`, also returning the logits stored with each sample drawn (``add(..., logits=...)``)."""
        if len(self) and self.z.numel() == 0:
            raise RuntimeError("this buffer holds no logits: add batches with add(..., logits=...)")
        idx = self.draw(k, generator)
        self.last_tasks = self.t[idx]
        return self.x[idx], self.y[idx], self.z[idx]

    def draw(self, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Slots of ``min(k, len)`` samples drawn uniformly without replacement."""
        n = len(self)
        return torch.randperm(n, device=self.x.device, generator=generator)[:min(k, n)]

    def items(self) -> Tuple[Tensor, Tensor]:
        """Everything held (for tests and reports)."""
        n = len(self)
        return self.x[:n], self.y[:n]

    def stored_elements(self) -> int:
        """Elements held (images, labels, task ids, logits of the samples held; not the spare row): the cost report."""
        return per_sample_elements(len(self), self.x, self.y, self.t, self.z)

    def tasks(self) -> Tensor:
        """The task id of every sample held (aligned with :meth:`items`)."""
        return self.t[:len(self)]

    def logits(self) -> Tensor:
        """The logits stored with every sample held (aligned with :meth:`items`; empty when none were given)."""
        return self.z[:len(self)] if self.z.numel() else self.z

    def state(self) -> Dict[str, Any]:
        x, y = self.items()
        out = {"seen": self.seen, "x": x.clone(), "y": y.clone(), "t": self.tasks().clone()}
        if self.z.numel():
            out["z"] = self.logits().clone()
        return out

    def load_state(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        self.seen = int(state["seen"])
        x, y = state["x"], state["y"]
        if x.numel() == 0:
            self.x, self.y = torch.empty(0, device=self.x.device), torch.empty(0, dtype=torch.long,
                                                                                 device=self.y.device)
            self.t = torch.empty(0, dtype=torch.long, device=self.y.device)
            self.z = torch.empty(0, device=self.x.device)
            return
        self._allocate(x.to(self.x.device))
        self.x[:x.shape[0]] = x.to(self.x.device)
        self.y[:y.shape[0]] = y.to(self.y.device)
        t = state.get("t")  # absent in states written before task ids were stored: all task 0
        if t is not None:
            self.t[:t.shape[0]] = t.to(self.t.device)
        z = state.get("z")  # present only in buffers that store logits
        if z is None:
            self.z = torch.empty(0, device=self.x.device)
        else:
            self.z = torch.zeros((self.capacity + 1, *z.shape[1:]), dtype=z.dtype, device=self.x.device)
            self.z[:z.shape[0]] = z.to(self.z.device)


class GrowingStore(nn.Module):
    """Every sample offered, kept (capacity doubling as it grows): the memory of joint training."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.register_buffer("x", torch.empty(0), persistent=False)
        self.register_buffer("y", torch.empty(0, dtype=torch.long), persistent=False)

    def __len__(self) -> int:
        return self.size

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor) -> None:
        b = int(x.shape[0])
        need = self.size + b
        if self.x.numel() == 0 or need > self.x.shape[0]:
            cap = max(need, 2 * (self.x.shape[0] if self.x.numel() else 0), 64)
            nx = torch.zeros((cap, *x.shape[1:]), dtype=x.dtype, device=x.device)
            ny = torch.zeros(cap, dtype=torch.long, device=x.device)
            if self.size:
                nx[:self.size] = self.x[:self.size]
                ny[:self.size] = self.y[:self.size]
            self.x, self.y = nx, ny
        self.x[self.size:need] = x.detach()
        self.y[self.size:need] = y.detach().long()
        self.size = need

    @torch.no_grad()
    def sample(self, k: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """``k`` samples drawn uniformly with replacement (cheap on a large store)."""
        idx = torch.randint(0, max(self.size, 1), (k if self.size else 0,), device=self.x.device, generator=generator)
        return self.x[idx], self.y[idx]

    def items(self) -> Tuple[Tensor, Tensor]:
        return self.x[:self.size], self.y[:self.size]

    def stored_elements(self) -> int:
        """Elements held (images and labels of the samples stored, not the capacity allocated): the cost report."""
        return per_sample_elements(self.size, self.x, self.y)

    def clear(self) -> None:
        self.size = 0
        self.x = torch.empty(0, device=self.x.device)
        self.y = torch.empty(0, dtype=torch.long, device=self.y.device)

    def state(self) -> Dict[str, Any]:
        x, y = self.items()
        return {"x": x.clone(), "y": y.clone()}

    def load_state(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        self.clear()
        if state["x"].numel():
            self.add(state["x"].to(self.x.device), state["y"].to(self.y.device))


class GreedyClassBalancedBuffer(nn.Module):
    """GDumb's greedy class-balancing sampler (Prabhu, Torr, Dokania, ECCV 2020, Alg. 1): a sample of class ``y``
    enters while the memory has room; once it is full, only if ``y`` holds fewer than ``capacity / |classes seen|``
    samples (``y`` counted among the seen), in the place of a uniformly drawn sample of the largest class (ties:
    the lowest label).

    Samples are offered one by one in batch order. The images live in one device buffer of ``capacity`` slots; the
    labels and the per-class slot lists on the host (one host read of a batch's labels per batch); the eviction
    draws come from the CPU generator given to ``add``.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"buffer capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.slots: Dict[int, list] = {}  # class -> slots holding it, in insertion order
        self.free = list(range(capacity))
        self.register_buffer("x", torch.empty(0), persistent=False)  # content travels in ``state()``

    def __len__(self) -> int:
        return self.capacity - len(self.free)

    def stored_elements(self) -> int:
        """Elements held (images and labels of the samples stored): the cost report."""
        return per_sample_elements(len(self), self.x) + len(self)

    def counts(self) -> Dict[int, int]:
        """Samples held per class seen (a class whose samples were all evicted counts 0)."""
        return {c: len(s) for c, s in self.slots.items()}

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Offer the batch ``(x, y)`` sample by sample to the greedy rule."""
        if int(x.shape[0]) == 0:
            return
        if self.x.numel() == 0:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype, device=x.device)
        writes: Dict[int, int] = {}  # slot -> the batch index written there (a later sample may evict an earlier)
        for i, c in enumerate(y.tolist()):
            held = self.slots.setdefault(int(c), [])
            if self.free:
                slot = self.free.pop(0)
            elif len(held) < self.capacity / len(self.slots):
                largest = max(self.slots, key=lambda k: (len(self.slots[k]), -k))
                victims = self.slots[largest]
                slot = victims.pop(int(torch.randint(len(victims), (1,), generator=generator)))
            else:
                continue
            held.append(slot)
            writes[slot] = i
        if writes:
            dev = self.x.device
            into, take = torch.tensor(list(writes), device=dev), torch.tensor(list(writes.values()), device=x.device)
            self.x.index_copy_(0, into, x.detach()[take].to(dev, self.x.dtype))

    def items(self) -> Tuple[Tensor, Tensor]:
        """Everything held, class by class (ascending labels), each class in insertion order."""
        order = [(s, c) for c in sorted(self.slots) for s in self.slots[c]]
        dev = self.x.device
        if not order:
            return self.x[:0], torch.empty(0, dtype=torch.long, device=dev)
        idx = torch.tensor([s for s, _ in order], device=dev)
        return self.x.index_select(0, idx), torch.tensor([c for _, c in order], dtype=torch.long, device=dev)

    def state(self) -> Dict[str, Any]:
        return {"x": self.x.clone(), "slots": {c: list(s) for c, s in self.slots.items()}, "free": list(self.free)}

    def load_state(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        self.x = state["x"].clone().to(self.x.device)
        self.slots = {int(c): list(s) for c, s in state["slots"].items()}
        self.free = list(state["free"])
