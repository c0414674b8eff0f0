"""Cost meters: wall time (with one device sync per segment), images/s, peak device memory, trainable parameters."""
from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from torch import nn


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: ``5`` into ``/proc/self/clear_refs``), so a run's peak is
    its own, not that of a run before it in the same process; False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss_mb() is not None
    except OSError:
        return False


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident set size since its start or the last :func:`reset_peak_rss` (Linux ``VmHWM``),
    MiB; None where ``/proc`` does not give it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


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
        self._own_rss_peak = False  # CPU: the peak RSS was reset at the start of this run
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self._own_rss_peak = reset_peak_rss()
        self._t0 = 0.0
        self.trainable_peak = 0  # the most parameters the strategy trained at any segment end
        self._peak_before = 0.0  # peak of the earlier part of a resumed run (same memory kind)

    def state_dict(self) -> Dict[str, object]:
        """The totals so far, for a checkpoint: a resumed run adds to them (:meth:`load_state_dict`)."""
        return {"seconds": dict(self.seconds), "images": dict(self.images), "steps": dict(self.steps),
                "peak_memory_mb": self.peak_memory_mb(), "memory_kind": self.memory_kind(),
                "trainable_peak": self.trainable_peak}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Continue from the totals of :meth:`state_dict` (an interrupted run's time, images and steps)."""
        for name in ("seconds", "images", "steps"):
            saved = state.get(name) or {}
            getattr(self, name).update({k: type(getattr(self, name)[k])(v) for k, v in saved.items()
                                        if k in getattr(self, name)})
        self.trainable_peak = int(state.get("trainable_peak") or 0)
        if state.get("memory_kind") == self.memory_kind():  # a CUDA peak and a process RSS do not compare
            self._peak_before = float(state.get("peak_memory_mb") or 0.0)

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

    def elapsed(self) -> float:
        """Seconds since :meth:`start`, after a device sync (one host sync: call it rarely)."""
        synchronize(self.device)
        return time.perf_counter() - self._t0

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return max(self._peak_before, torch.cuda.max_memory_allocated(self.device) / 2**20)
        own = peak_rss_mb() if self._own_rss_peak else None
        if own is not None:
            return max(self._peak_before, own)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(self._peak_before, rss / 1024 if sys.platform != "darwin" else rss / 2**20)

    def memory_kind(self) -> str:
        """``cuda_max_allocated``; ``process_peak_rss`` (reset at the run's start); ``process_peak_rss_since_start``
        (the process's, where the peak cannot be reset: it includes earlier runs of the same process)."""
        if self.device.type == "cuda":
            return "cuda_max_allocated"
        return "process_peak_rss" if self._own_rss_peak else "process_peak_rss_since_start"

    def note_trainable(self, trainable: Iterable[nn.Parameter]) -> None:
        """Keep the largest number of trainable parameters seen (called at each segment end: methods such as APER or
        RanPAC train in the first session only and hold no optimizer at the run's end)."""
        self.trainable_peak = max(self.trainable_peak, int(sum(p.numel() for p in trainable)))

    def summary(self, trainable: Iterable[nn.Parameter] = ()) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for k in ("adapt", "train", "eval"):
            if self.images[k]:
                out[f"{k}_images_per_s"] = self.images[k] / max(self.seconds[k], 1e-12)
                out[f"{k}_ms_per_step"] = 1000 * self.seconds[k] / max(self.steps[k], 1)
                out[f"{k}_seconds"] = float(self.seconds[k])
        out["peak_memory_mb"] = self.peak_memory_mb()
        out["trainable_parameters"] = max(self.trainable_peak, int(sum(p.numel() for p in trainable)))
        out["adaptation_steps"] = self.steps["adapt"] + self.steps["train"]
        return out


def duration_text(seconds: float) -> str:
    """A rough human duration: '40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunEstimate:
    """The expected duration of a run, logged once at INFO from one measured batch of its first adapt/train segment.

    The timed batch is the segment's second (its first pays the warm-up: lazy initialisation, cuDNN autotuning), or
    its only one; that costs two host syncs per run and nothing on any other batch. ``segments`` are those still to
    run (a resumed run counts only what is left); eval images are counted apart (forward passes only).
    """

    def __init__(self, meter: CostMeter, label: str, segments: Sequence[Any],
                 logger: Optional[logging.Logger] = None) -> None:
        self.meter, self.label = meter, label
        self.images = sum(int(s.num_samples) for s in segments if s.kind != "eval")
        self.eval_images = sum(int(s.num_samples) for s in segments if s.kind == "eval")
        self.log = logger or logging.getLogger("ctta.engine")
        self.done = self.images == 0
        self.message: Optional[str] = None
        self._mark = 0.0

    def after_batch(self, segment: Any, index: int, batch_images: int) -> None:
        """Call after batch ``index`` (0-based) of ``segment``; returns at once except on the one timed batch."""
        if self.done or segment.kind == "eval":
            return
        if index == 0 and segment.num_batches > 1:
            self._mark = self.meter.elapsed()
            return
        seconds = self.meter.elapsed() - (self._mark if index else 0.0)
        self.done = True
        rate = batch_images / max(seconds, 1e-9)
        self.message = (f"{self.label}: about {duration_text(self.images / rate)} for {self.images} images at "
                        f"{rate:.0f} img/s (measured on batch {index + 1} of {segment.name}"
                        + (f"; plus {self.eval_images} eval images, forward passes only" if self.eval_images else "")
                        + "; loading or generating each domain's data comes on top)")
        self.log.info("%s", self.message)
