"""Cost meters: wall time (with one device sync per segment), images/s, peak device memory, trainable parameters."""
from __future__ import annotations

import resource
import sys
import time
from typing import Dict, Iterable

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CostMeter:
    """Times segments and tracks peak memory: CUDA allocator peak on a GPU, process peak RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: Dict[str, float] = {"adapt": 0.0, "train": 0.0, "eval": 0.0}
        self.images: Dict[str, int] = {"adapt": 0, "train": 0, "eval": 0}
        self.steps: Dict[str, int] = {"adapt": 0, "train": 0, "eval": 0}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._t0 = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop(self, kind: str, images: int, steps: int) -> float:
        """End the timed span started by :meth:`start`; returns its seconds."""
        synchronize(self.device)
        dt = time.perf_counter() - self._t0
        self.seconds[kind] += dt
        self.images[kind] += images
        self.steps[kind] += steps
        return dt

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024 if sys.platform != "darwin" else rss / 2**20

    def memory_kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss"

    def summary(self, trainable: Iterable[nn.Parameter] = ()) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for k in ("adapt", "train", "eval"):
            if self.images[k]:
                out[f"{k}_images_per_s"] = self.images[k] / max(self.seconds[k], 1e-12)
                out[f"{k}_ms_per_step"] = 1000 * self.seconds[k] / max(self.steps[k], 1)
        out["peak_memory_mb"] = self.peak_memory_mb()
        out["trainable_parameters"] = int(sum(p.numel() for p in trainable))
        out["adaptation_steps"] = self.steps["adapt"] + self.steps["train"]
        return out
