"""Realtime evaluation (Alfarra et al., ICML 2023, "Evaluation of Test-Time Adaptation Under Computational Time
Constraints"): the stream does not wait for the method.

Batches arrive at a fixed rate: one per reference time, the time of one forward pass (``strategy.predict`` on the
batch, measured in the same run) or ``batch / rate`` for an explicit ``rate`` in images/s. A method that needs
C = its adapt time / the reference time adapts on a batch and, while busy, the next ceil(C) - 1 batches pass: they
are predicted with ``predict`` (the current state, no adaptation). C is measured on every adapted batch (so a
faster implementation is rewarded), or fixed with ``relative_cost`` (deterministic: exactly every ceil(C)-th batch
is adapted on, for tests and for comparing machines). The busy count carries across domain boundaries, as the
stream is one stream; ``train`` and ``eval`` steps are not affected.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Dict, Optional

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

    def __init__(self, device: torch.device, relative_cost: Optional[float] = None,
                 rate: Optional[float] = None) -> None:
        self.device, self.fixed, self.rate = device, relative_cost, rate
        self.busy = 0  # batches still to pass while the method works
        self.adapted = self.predicted = 0
        self.reference_s: Optional[float] = None
        self.costs: list = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _reference(self, predict: Callable[[Tensor], Tensor], x: Tensor) -> float:
        if self.rate is not None:
            return x.shape[0] / self.rate
        if self.reference_s is None:  # one warm-up, then the median of three forwards
            with torch.no_grad():
                predict(x)
                times = []
                for _ in range(3):
                    self._sync()
                    t = time.perf_counter()
                    predict(x)
                    self._sync()
                    times.append(time.perf_counter() - t)
            self.reference_s = statistics.median(times)
        return self.reference_s

    def step(self, adapt: Callable[[Tensor], Tensor], predict: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """The logits of batch ``x``: adapted on when the method is free, else predicted with the current state."""
        if self.busy > 0:
            self.busy -= 1
            self.predicted += 1
            with torch.no_grad():
                return predict(x)
        self.adapted += 1
        if self.fixed is not None:
            self.busy = max(1, math.ceil(self.fixed - 1e-9)) - 1
            return adapt(x)
        ref = self._reference(predict, x)
        self._sync()
        t = time.perf_counter()
        out = adapt(x)
        self._sync()
        cost = (time.perf_counter() - t) / max(ref, 1e-12)
        self.costs.append(cost)
        self.busy = max(1, math.ceil(cost - 1e-9)) - 1
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"busy": self.busy, "adapted": self.adapted, "predicted": self.predicted,
                "reference_s": self.reference_s, "costs": list(self.costs)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.busy, self.adapted, self.predicted = int(state["busy"]), int(state["adapted"]), int(state["predicted"])
        self.reference_s, self.costs = state.get("reference_s"), list(state.get("costs", []))

    def summary(self) -> Dict[str, Any]:
        """``relative_cost`` (given, or the mean measured), the adapted / predicted batch counts and the reference."""
        cost = self.fixed if self.fixed is not None else (statistics.fmean(self.costs) if self.costs else None)
        total = self.adapted + self.predicted
        return {"relative_cost": cost, "measured": self.fixed is None, "adapted_batches": self.adapted,
                "predicted_batches": self.predicted, "adapted_share": self.adapted / total if total else None,
                "reference_ms": None if self.reference_s is None else 1000 * self.reference_s,
                "stream_rate": self.rate}
