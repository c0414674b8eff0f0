"""The stream model: a stream is a list of segments (a domain, a session, a held-out check); a segment is batches.

Every batch of a segment is one step of the same kind: ``adapt`` (labels hidden from the strategy), ``train``
(labelled) or ``eval`` (predict only). Segments are loaded lazily on the run's device, so a resumed run skips
finished segments without generating them. A segment that fits the chunk budget (:data:`CHUNK_BYTES`, a CIFAR
domain) lives on the device whole; a larger one (an ImageNet-C domain) arrives in chunks of whole batches, the
next chunk read and decoded on the host by a background thread while the model works on the current one, so
memory is bounded by the chunk size and never by the segment's or the stream's length (docs/streams.md).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
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
Fetch = Callable[[int, int, bool], Any]  # (start, stop, pin) -> the host part of samples [start, stop)
Finish = Callable[[Any, torch.device], Any]  # (what fetch returned, device) -> images, labels[, groups] on device

CHUNK_BYTES = 512 * 2 ** 20  # auto chunking: a segment whose float images exceed this arrives in chunks this large


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
    load: Optional[Callable[[torch.device], Batch]] = None
    role: str = "domain"
    meta: Dict[str, Any] = field(default_factory=dict)
    groups: Optional[List[str]] = None
    fetch: Optional[Fetch] = None
    finish: Optional[Finish] = None
    image_shape: Optional[Tuple[int, ...]] = None  # C x H x W of one image, when known (sizes the auto chunks)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"segment {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size}")
        if (self.fetch is None) != (self.finish is None):
            raise ConfigError(f"segment {self.name!r}: fetch and finish go together (the host and device halves of "
                              f"a chunk)")
        if self.load is None and self.fetch is None:
            raise ConfigError(f"segment {self.name!r} needs load, or fetch and finish")
        if self.load is None:  # the whole segment as one chunk
            self.load = lambda device: self.finish(self.fetch(0, self.num_samples, torch.device(device).type == "cuda"),
                                                   torch.device(device))

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    @property
    def chunkable(self) -> bool:
        """Whether the segment can arrive in chunks (it has the host / device halves ``fetch`` and ``finish``)."""
        return self.fetch is not None

    def chunk_length(self, chunk_size: Optional[int] = None) -> int:
        """Images per chunk: ``chunk_size`` rounded down to whole batches (at least one), or with ``None`` the
        whole segment when its float images fit :data:`CHUNK_BYTES`, else as many whole batches as fit."""
        n = self.num_samples
        if not self.chunkable:
            return n
        if chunk_size is None:
            if self.image_shape is None:
                return n
            per_image = 4 * math.prod(self.image_shape)
            if n * per_image <= CHUNK_BYTES:
                return n
            chunk_size = CHUNK_BYTES // per_image
        return min(n, max(1, chunk_size // self.batch_size) * self.batch_size)

    def materialise(self, device: torch.device) -> Loaded:
        """The whole segment on ``device``: images, labels and the per-sample group index (None without groups)."""
        return self._loaded(self.load(torch.device(device)))

    def chunks(self, device: torch.device, chunk_size: Optional[int] = None, prefetch: bool = True
               ) -> Iterator[Loaded]:
        """The segment on ``device`` in chunks of :meth:`chunk_length` images (whole batches, in order).

        With ``prefetch`` a background thread fetches (reads, decodes, gathers; pinned for CUDA) the next chunk
        while the caller works on this one; at most two chunks are held. The same samples come out whatever the
        chunk length, so results do not depend on it.
        """
        device = torch.device(device)
        size = self.chunk_length(chunk_size)
        n = self.num_samples
        if size >= n:
            yield self.materialise(device)
            return
        pin = device.type == "cuda"
        bounds = [(a, min(a + size, n)) for a in range(0, n, size)]
        if not prefetch:
            for a, b in bounds:
                yield self._loaded(self.finish(self.fetch(a, b, pin), device))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctta-fetch") as pool:
            pending = pool.submit(self.fetch, *bounds[0], pin)
            for k in range(len(bounds)):
                host = pending.result()
                if k + 1 < len(bounds):
                    pending = pool.submit(self.fetch, *bounds[k + 1], pin)
                yield self._loaded(self.finish(host, device))

    def _loaded(self, out: Any) -> Loaded:
        if len(out) == 3:
            x, y, g = out
        else:
            (x, y), g = out, None
        if (g is None) != (self.groups is None):
            raise ConfigError(f"segment {self.name!r}: a group index per sample goes with a list of group names "
                              f"(groups={self.groups!r}, index given: {g is not None})")
        return x, y, g

    def batches(self, device: torch.device, chunk_size: Optional[int] = None) -> Iterator[Batch]:
        """The segment's (images, labels) batches on ``device``, in order (loaded in chunks, see :meth:`chunks`)."""
        for x, y, _ in self.chunks(device, chunk_size):
            for i in range(0, x.shape[0], self.batch_size):
                yield x[i:i + self.batch_size], y[i:i + self.batch_size]


@dataclass
class Stream:
    """An ordered list of segments plus what a run must know of it: classes, setting and the spec it came from.

    ``provenance`` (not part of ``spec``, which a resumed run compares) records where each domain's data came
    from, e.g. ``{"fog-5": {"source": "files", "path": ".../CIFAR-10-C/fog.npy"}}`` or ``{"source": "generated"}``;
    the run writes it to ``summary.json`` as ``data_sources``. ``output_classes`` (ImageNet-R / -A) says which
    outputs of a larger pretrained model the stream's classes are: the run keeps only those (label k = output
    ``output_classes[k]``), as the reference benchmarks mask the 1000-way logits.
    """

    name: str
    segments: List[Segment]
    num_classes: int
    setting: str = "tta"
    spec: Dict[str, Any] = field(default_factory=dict)
    reset_each_domain: bool = False
    provenance: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    output_classes: Optional[List[int]] = None  # the model outputs label k means (a 200-class subset of a 1000-way model)

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
    """A segment over in-memory tensors (uint8 or float images, or lazily decoded files with the same indexing);
    ``transform`` runs on the device on each chunk (per image: the result must not depend on the chunk)."""
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(f"segment {name!r}: {images.shape[0]} images but {labels.shape[0]} labels")

    def fetch(a: int, b: int, pin: bool) -> Batch:
        x, y = images[a:b], labels[a:b]
        return (x.pin_memory(), y) if pin and not x.is_pinned() else (x, y)

    def finish(host: Batch, device: torch.device) -> Batch:
        x = to_float(host[0], device)
        if transform is not None:
            x = transform(x, device)
        return x, host[1].to(device, dtype=torch.long, non_blocking=True)

    return Segment(name=name, kind=kind, num_samples=int(images.shape[0]), batch_size=batch_size, fetch=fetch,
                   finish=finish, role=role, meta=dict(meta or {}), image_shape=tuple(images.shape[1:]))


def to_float(x: Tensor, device: torch.device) -> Tensor:
    """Host images (uint8, or float in [0, 1]) as float32 in [0, 1] on ``device`` (copied before converting)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


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
