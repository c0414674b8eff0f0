"""Per-image random numbers for the corruptions: an image's draws depend on (seed, image key), never on the batch.

``torch.Generator`` streams are consumed in batch order, so an image's noise would change with its position and
its batch mates. Here every number is a counter-based hash of (seed, image key, draw number, element index):
vectorised over the whole batch on any device, identical on CPU and GPU, and the same whether an image is
corrupted alone or among 500. The image key defaults to a hash of the image's 8-bit content (see :func:`content_keys`),
so callers need no bookkeeping; streams may pass dataset indices instead.

The mixer is Wellons' ``lowbias32`` (two rounds per element) on int32 tensors, whose products wrap modulo 2^32 on CPU
and GPU alike (a test checks it against Python integers). Uniforms carry 24 bits; normals use Box-Muller over two
uniforms. Shot noise's Poisson draws use a ``torch.Generator`` per image (seeded from the same hash), so they are
batch-independent but differ between CPU and GPU.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_M1, _M2 = 0x7FEB352D, 0x846CA68B - (1 << 32)  # lowbias32's multipliers as signed 32-bit values


def _i32(v: int) -> int:
    """A Python integer's low 32 bits as a signed 32-bit value."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def mix32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 hash on int32 tensors (bit patterns of uint32; products wrap modulo 2^32).

    Right shifts are made logical by masking, since int32 ``>>`` is arithmetic.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def content_keys(images: Tensor) -> Tensor:
    """A 32-bit key per image (int32, N) from its 8-bit pixel values, so identical images get identical corruptions."""
    n = images.shape[0]
    u8 = torch.round(images.detach().reshape(n, -1).clamp(0.0, 1.0) * 255.0).to(torch.int64)
    idx = torch.arange(u8.shape[1], device=images.device, dtype=torch.int32)
    weights = (mix32(idx + 0x5BD1E995).to(torch.int64) & 0xFFFFFF)  # 24-bit: 255 * 2^24 * numel << 2^63
    total = (u8 * weights).sum(dim=1) & 0xFFFFFFFF
    return mix32(torch.where(total >= (1 << 31), total - (1 << 32), total).to(torch.int32))


class ImageRng:
    """Random draws for a batch of images, shaped ``(N, *shape)``; each call is a fresh, independent draw."""

    def __init__(self, seed: int, keys: Tensor) -> None:
        if keys.dim() != 1:
            raise ValueError(f"image keys must be a 1-D tensor, got shape {tuple(keys.shape)}")
        self.device = keys.device
        s = int(seed)
        k = keys.to(torch.int64)
        lo = torch.where((k & 0xFFFFFFFF) >= (1 << 31), (k & 0xFFFFFFFF) - (1 << 32), k & 0xFFFFFFFF)
        hi = torch.where(((k >> 32) & 0xFFFFFFFF) >= (1 << 31), ((k >> 32) & 0xFFFFFFFF) - (1 << 32),
                         (k >> 32) & 0xFFFFFFFF)
        prefix = mix32(torch.full(k.shape, _i32(s), dtype=torch.int32, device=self.device))
        prefix = mix32(prefix ^ _i32(s >> 32))
        prefix = mix32(prefix ^ lo.to(torch.int32))
        self._prefix = mix32(prefix ^ hi.to(torch.int32))
        self._draw = 0

    @property
    def n(self) -> int:
        return int(self._prefix.shape[0])

    def bits(self, *shape: int) -> Tensor:
        """Uniform 32-bit patterns (int32), shaped ``(N, *shape)``; a new draw each call."""
        self._draw += 1
        numel = math.prod(shape)
        draw = mix32(self._prefix ^ _i32(self._draw * 0x9E3779B9)).view(-1, 1)
        e = torch.arange(numel, device=self.device, dtype=torch.int32).view(1, -1)
        h = mix32(mix32(e ^ draw) ^ draw)
        return h.view(self.n, *shape)

    def _u24(self, *shape: int) -> Tensor:
        return (self.bits(*shape) >> 8) & 0xFFFFFF

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniform in (0, 1) with 24-bit resolution (never exactly 0 or 1)."""
        return (self._u24(*shape).to(dtype) + 0.5) * (1.0 / (1 << 24))

    def uniform(self, low: float, high: float, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return low + (high - low) * self.rand(*shape, dtype=dtype)

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        """Integers uniform in ``[low, high)`` (numpy's ``randint`` convention), int64."""
        span = int(high) - int(low)
        if span <= 0:
            raise ValueError(f"randint needs low < high, got [{low}, {high})")
        if span > (1 << 24):
            raise ValueError(f"randint supports ranges up to 2^24, got {span}")
        return low + ((self._u24(*shape).to(torch.int64) * span) >> 24)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal draws (Box-Muller on two 24-bit uniforms, computed in float64)."""
        u1 = self.rand(*shape, dtype=torch.float64)
        u2 = self.rand(*shape, dtype=torch.float64)
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)

    def poisson(self, rates: Tensor, generator_fallback: Optional[bool] = None) -> Tensor:
        """Poisson draws with per-element ``rates`` shaped ``(N, ...)``, returned in the rates' dtype.

        Per image, a ``torch.Generator`` seeded from the image's hash draws ``torch.poisson`` for that image only,
        so the result does not depend on the batch (one small call per image).
        """
        out = torch.empty_like(rates)
        self._draw += 1
        seeds = (mix32(self._prefix ^ _i32(self._draw * 0x9E3779B9)).to(torch.int64) & 0xFFFFFFFF).tolist()
        gen = torch.Generator(device=rates.device)
        for i, s in enumerate(seeds):
            gen.manual_seed(int(s))
            out[i] = torch.poisson(rates[i], generator=gen)
        return out
