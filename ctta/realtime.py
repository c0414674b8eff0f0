"""Realtime evaluation (Alfarra et al., ICML 2023, "Evaluation of Test-Time Adaptation Under Computational Time
Constraints"): the stream does not wait for the method.

Batches arrive at a fixed rate: one per reference time, the time of one forward pass (``strategy.predict`` on the
batch, measured in the same run) or ``batch / rate`` for an explicit ``rate`` in images/s. A method that needs
C = its adapt time / the reference time adapts on a batch and, while busy, the next ceil(C) - 1 batches pass: they
are predicted with ``predict`` (the current state, no adaptation). C is measured on every adapted batch (so a
faster implementation is rewarded), or fixed with ``relative_cost`` (deterministic: exactly every ceil(C)-th batch
is adapted on, for tests and for comparing machines). The reference is the median of the recent forward timings
(three at the start, then every predicted batch's), so it follows the machine's load; a cost within 5 % above
an integer counts as that integer (timer noise). The busy count carries across domain boundaries, as the stream
is one stream; ``train`` and ``eval`` steps are not affected.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .errors import ConfigError

PROTOCOLS = ("offline", "realtime", "both")


def check_realtime(protocol: str, relative_cost: Any, rate: Any) -> None:
    """One-line errors for ``run.protocol``, ``run.relative_cost`` and ``run.stream_rate``."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"run.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    for name, v in (("run.relative_cost", relative_cost), ("run.stream_rate", rate)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ConfigError(f"{name} must be a positive number or null, got {v!r}")
    if relative_cost is not None and rate is not None:
        raise ConfigError("give run.relative_cost (fixed) or run.stream_rate (measured against a rate), not both")


class RealtimeClock:
    """Decides per adapt batch whether the method is free to adapt on it; counts what it did (:meth:`summary`)."""

    WINDOW = 64  # forward timings the reference is the median of
    TOLERANCE = 0.05  # a cost within 5 % above an integer counts as that integer (timer noise)

    def __init__(self, device: torch.device, relative_cost: Optional[float] = None,
                 rate: Optional[float] = None) -> None:
        self.device, self.fixed, self.rate = device, relative_cost, rate
        self.busy = 0  # batches still to pass while the method works
        self.adapted = self.predicted = 0
        self.reference_s: Optional[float] = None
        self.forwards: list = []  # recent forward (predict) timings, seconds
        self.costs: list = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _reference(self, predict: Callable[[Tensor], Tensor], x: Tensor) -> float:
        if self.rate is not None:
            return x.shape[0] / self.rate
        if not self.forwards:  # one warm-up, then three forwards; every predicted batch adds its own timing
            with torch.no_grad():
                predict(x)
                for _ in range(3):
                    self._timed(predict, x, record=True)
        self.reference_s = statistics.median(self.forwards[-self.WINDOW:])
        return self.reference_s

    def _timed(self, fn: Callable[[Tensor], Tensor], x: Tensor, record: bool = False) -> Tuple[Tensor, float]:
        self._sync()
        t = time.perf_counter()
        out = fn(x)
        self._sync()
        dt = time.perf_counter() - t
        if record:
            self.forwards.append(dt)
        return out, dt

    def _busy_for(self, cost: float) -> int:
        return max(1, math.ceil(cost - self.TOLERANCE)) - 1

    def step(self, adapt: Callable[[Tensor], Tensor], predict: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """The logits of batch ``x``: adapted on when the method is free, else predicted with the current state."""
        if self.busy > 0:
            self.busy -= 1
            self.predicted += 1
            with torch.no_grad():
                if self.fixed is not None or self.rate is not None:
                    return predict(x)
                return self._timed(predict, x, record=True)[0]  # the reference follows the machine's load
        self.adapted += 1
        if self.fixed is not None:
            self.busy = max(1, math.ceil(self.fixed - 1e-9)) - 1
            return adapt(x)
        ref = self._reference(predict, x)
        out, dt = self._timed(adapt, x)
        cost = dt / max(ref, 1e-12)
        self.costs.append(cost)
        self.busy = self._busy_for(cost)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"busy": self.busy, "adapted": self.adapted, "predicted": self.predicted,
                "reference_s": self.reference_s, "costs": list(self.costs), "forwards": self.forwards[-self.WINDOW:]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.busy, self.adapted, self.predicted = int(state["busy"]), int(state["adapted"]), int(state["predicted"])
        self.reference_s, self.costs = state.get("reference_s"), list(state.get("costs", []))
        self.forwards = list(state.get("forwards", []))

    def summary(self) -> Dict[str, Any]:
        """``relative_cost`` (given, or the mean measured), the adapted / predicted batch counts and the reference."""
        cost = self.fixed if self.fixed is not None else (statistics.fmean(self.costs) if self.costs else None)
        total = self.adapted + self.predicted
        return {"relative_cost": cost, "measured": self.fixed is None, "adapted_batches": self.adapted,
                "predicted_batches": self.predicted, "adapted_share": self.adapted / total if total else None,
                "reference_ms": None if self.reference_s is None else 1000 * self.reference_s,
                "stream_rate": self.rate}
