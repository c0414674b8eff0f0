"""Segments gathered from blocks: rows of image sources, in a given sample order, loaded chunk by chunk.

Every built-in stream describes a segment the same way: blocks (the rows of one source, with their labels, group
and an optional per-image transform such as a corruption generated on the device) and an order over the blocks'
concatenated samples (a shuffle, a Dirichlet order, clean samples mixed into each batch, epochs repeated). A
chunk ``[a, b)`` of that order is fetched on the host (each distinct image once: a tensor gather, or files decoded
by :class:`~ctta.streams.files.FileImages`) and finished on the device (float, transforms, then the order), so a
segment never needs more than one chunk in memory, and the same samples come out whatever the chunk length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ctta.errors import ConfigError

from .base import Segment, StepKind, to_float

TRANSFORM_BATCH = 256  # images per transform call: a corruption's temporaries are ~10x its images


@dataclass
class Block:
    """Rows of one image source with their labels and group; ``transform`` runs on the device, image by image.

    ``images`` is anything indexed by an int64 tensor of rows that returns N x C x H x W uint8 (or float) host
    images and has ``shape``: a tensor, or lazily decoded files (:class:`~ctta.streams.files.FileImages`).
    ``transform`` must not depend on an image's batch mates (the corruptions key their noise per image), since a
    chunk holds any subset of the block.
    """

    images: Any
    rows: Tensor
    labels: Tensor
    group: int = 0
    transform: Optional[Callable[[Tensor], Tensor]] = None

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.labels):
            raise ConfigError(f"a block needs one label per row, got {len(self.rows)} rows and {len(self.labels)} "
                              f"labels")

    def __len__(self) -> int:
        return int(self.rows.shape[0])


class _Host(NamedTuple):
    """A fetched chunk: its distinct images (grouped by block), where each block is, and the chunk order."""

    images: Tensor
    blocks: List[tuple]  # (block index, start, stop) in ``images``
    inverse: Optional[Tensor]  # chunk position -> row of ``images`` (None: identity)
    labels: Tensor
    groups: Tensor


def gathered_segment(name: str, kind: StepKind, blocks: Sequence[Block], batch_size: int,
                     order: Optional[Tensor] = None, groups: Optional[List[str]] = None, role: str = "domain",
                     meta: Optional[Dict[str, Any]] = None) -> Segment:
    """A segment over ``blocks`` in ``order`` (indices into their concatenation; repeats allowed; default: as is).

    With ``groups`` the segment yields the per-sample group index (each block's ``group``) for the evaluator.
    """
    parts = list(blocks)
    sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
    n = int(sizes.sum())
    if n == 0:
        raise ConfigError(f"segment {name!r} would hold no samples")
    part_of = torch.repeat_interleave(torch.arange(len(parts)), sizes)
    local = torch.arange(n) - (torch.cumsum(sizes, 0) - sizes)[part_of]
    if order is not None:
        order = order.long()
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= n):
            raise ConfigError(f"segment {name!r}: the sample order indexes outside its {n} samples")
        part_of, local = part_of[order], local[order]
    labels = torch.cat([p.labels.long() for p in parts])
    labels = labels if order is None else labels[order]
    group_of = torch.tensor([p.group for p in parts], dtype=torch.long)[part_of]
    stride = int(sizes.max())

    def fetch(a: int, b: int, pin: bool) -> _Host:
        key = part_of[a:b] * stride + local[a:b]
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        upart, ulocal = uniq // stride, uniq % stride
        blocks, xs, start = [], [], 0
        for p in torch.unique_consecutive(upart).tolist():
            sel = ulocal[upart == p]
            xs.append(parts[p].images[parts[p].rows[sel]])
            blocks.append((p, start, start + len(sel)))
            start += len(sel)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        identity = len(uniq) == b - a and bool((inverse == torch.arange(b - a)).all())
        if pin:
            x = x.pin_memory()
        return _Host(x, blocks, None if identity else inverse, labels[a:b], group_of[a:b])

    def finish(host: _Host, device: torch.device):
        x = to_float(host.images, device)
        for p, s, e in host.blocks:
            if parts[p].transform is not None:
                for a in range(s, e, TRANSFORM_BATCH):  # bounds a corruption's working memory (per image anyway)
                    x[a:min(a + TRANSFORM_BATCH, e)] = parts[p].transform(x[a:min(a + TRANSFORM_BATCH, e)])
        if host.inverse is not None:
            x = x[host.inverse.to(device, non_blocking=True)]
        y = host.labels.to(device, non_blocking=True)
        if groups is None:
            return x, y
        return x, y, host.groups.to(device, non_blocking=True)

    return Segment(name=name, kind=kind, num_samples=int(part_of.shape[0]), batch_size=batch_size, fetch=fetch,
                   finish=finish, role=role, meta=dict(meta or {}), groups=list(groups) if groups is not None else None,
                   image_shape=tuple(parts[0].images.shape[1:]))
