"""The stream model: a stream is a list of segments (a domain, a session, a held-out check); a segment is batches.

Every batch of a segment is one step of the same kind: ``adapt`` (labels hidden from the strategy), ``train``
(labelled) or ``eval`` (predict only). Segments are materialised lazily on the run's device, so a resumed run
skips finished segments without generating them, and a CIFAR-size segment lives on the device whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ctta.errors import ConfigError
from ctta.registry import Registry

Batch = Tuple[Tensor, Tensor]
Loaded = Tuple[Tensor, Tensor, Optional[Tensor]]  # images, labels, per-sample group index (or None)
StepKind = str  # "adapt" | "train" | "eval"
KINDS = ("adapt", "train", "eval")


@dataclass
class Segment:
    """A run of same-kind steps with one name (e.g. ``gaussian_noise-5``, ``session-3``, ``clean@end``).

    ``load(device)`` returns images (float in [0, 1], N x C x H x W) and int64 labels on ``device``; the
    engine cuts them into batches of ``batch_size`` in order. ``role`` tells the evaluator what the segment
    is for: ``domain`` (a shift the learner meets), ``session``, or ``probe`` (a held-out check).

    ``groups`` names sub-populations inside one segment (the domains of a mixed stream, the sessions evaluated
    by an ``eval`` segment, clean vs. shifted samples): then ``load`` returns ``(x, y, g)`` with ``g`` an int64
    index into ``groups`` per sample, and the evaluator reports each group as well as the segment. An ``eval``
    segment of a learning stream sets ``meta["after"]`` to the name of the last learned segment, so that
    R[i, j] (accuracy on group j after segment i) can be read off the run.
    """

    name: str
    kind: StepKind
    num_samples: int
    batch_size: int
    load: Callable[[torch.device], Batch]
    role: str = "domain"
    meta: Dict[str, Any] = field(default_factory=dict)
    groups: Optional[List[str]] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"segment {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size}")

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def materialise(self, device: torch.device) -> Loaded:
        """The whole segment on ``device``: images, labels and the per-sample group index (None without groups)."""
        out = self.load(device)
        if len(out) == 3:
            x, y, g = out
        else:
            (x, y), g = out, None
        if (g is None) != (self.groups is None):
            raise ConfigError(f"segment {self.name!r}: a group index per sample goes with a list of group names "
                              f"(groups={self.groups!r}, index given: {g is not None})")
        return x, y, g

    def batches(self, device: torch.device) -> Iterator[Batch]:
        """Materialise the segment on ``device`` and yield its (images, labels) batches in order."""
        x, y, _ = self.materialise(device)
        for i in range(0, x.shape[0], self.batch_size):
            yield x[i:i + self.batch_size], y[i:i + self.batch_size]


@dataclass
class Stream:
    """An ordered list of segments plus what a run must know of it: classes, setting and the spec it came from.

    ``provenance`` (not part of ``spec``, which a resumed run compares) records where each domain's data came
    from, e.g. ``{"fog-5": {"source": "files", "path": ".../CIFAR-10-C/fog.npy"}}`` or ``{"source": "generated"}``;
    the run writes it to ``summary.json`` as ``data_sources``.
    """

    name: str
    segments: List[Segment]
    num_classes: int
    setting: str = "tta"
    spec: Dict[str, Any] = field(default_factory=dict)
    reset_each_domain: bool = False
    provenance: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def step_kinds(self) -> FrozenSet[str]:
        return frozenset(s.kind for s in self.segments)

    @property
    def num_steps(self) -> int:
        return sum(s.num_batches for s in self.segments)

    def domains(self) -> List[str]:
        return [s.name for s in self.segments if s.role == "domain"]

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)


STREAMS: Registry[Callable[..., Stream]] = Registry("stream")


def tensor_segment(name: str, kind: StepKind, images: Tensor, labels: Tensor, batch_size: int,
                   role: str = "domain", transform: Optional[Callable[[Tensor, torch.device], Tensor]] = None,
                   meta: Optional[Dict[str, Any]] = None) -> Segment:
    """A segment over in-memory tensors (uint8 or float images); ``transform`` runs once on the device at load."""
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(f"segment {name!r}: {images.shape[0]} images but {labels.shape[0]} labels")

    def load(device: torch.device) -> Batch:
        x = images.to(device, non_blocking=True)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if transform is not None:
            x = transform(x, device)
        return x, labels.to(device, dtype=torch.long, non_blocking=True)

    return Segment(name=name, kind=kind, num_samples=int(images.shape[0]), batch_size=batch_size, load=load,
                   role=role, meta=dict(meta or {}))


def from_batches(batches: Sequence[Batch], kind: StepKind = "adapt", name: str = "custom",
                 num_classes: Optional[int] = None) -> Stream:
    """A one-segment stream from a list of (images, labels) batches, kept in the given batching."""
    if not batches:
        raise ConfigError("from_batches needs at least one (images, labels) batch")
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    sizes = {b[0].shape[0] for b in batches[:-1]}
    bs = batches[0][0].shape[0] if not sizes else sizes.pop()
    if sizes:
        raise ConfigError("from_batches needs equal batch sizes (the last batch may be smaller)")
    n_cls = num_classes if num_classes is not None else int(y.max()) + 1
    return Stream(name=name, segments=[tensor_segment(name, kind, x, y, bs)], num_classes=n_cls,
                  spec={"name": name, "kind": kind, "custom": True})
