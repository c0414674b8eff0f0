"""Per-image random numbers for the corruptions: an image's draws depend on (seed, image key), never on the batch.

``torch.Generator`` streams are consumed in batch order, so an image's noise would change with its position and
its batch mates. Here every number is a counter-based hash of (seed, image key, draw number, element index):
vectorised over the whole batch on any device, identical on CPU and GPU, and the same whether an image is
corrupted alone or among 500. The image key defaults to a hash of the image's 8-bit content (see :func:`content_keys`),
so callers need no bookkeeping; streams may pass dataset indices instead.

The mixer is Wellons' ``lowbias32`` (two rounds per element), computed in int64 with 16-bit split multiplications
so that no product overflows. Uniforms carry 24 bits; normals use Box-Muller over two uniforms.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_GOLDEN = 0x9E3779B9


def _mul32(a: Tensor, c: int) -> Tensor:
    """``(a * c) mod 2^32`` for int64 tensors holding 32-bit values, without int64 overflow."""
    lo = (a & 0xFFFF) * c
    hi = (((a >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def mix32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 integer hash on int64 tensors of 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def content_keys(images: Tensor) -> Tensor:
    """A 32-bit key per image from its 8-bit pixel values (N,), so identical images get identical corruptions."""
    n = images.shape[0]
    u8 = torch.round(images.detach().reshape(n, -1).clamp(0.0, 1.0) * 255.0).to(torch.int64)
    idx = torch.arange(u8.shape[1], device=images.device, dtype=torch.int64)
    weights = mix32(idx + _GOLDEN) & 0xFFFFFF  # 24-bit weights: 255 * 2^24 * numel stays far below 2^63
    return mix32((u8 * weights).sum(dim=1) & _MASK32)


class ImageRng:
    """Random draws for a batch of images, shaped ``(N, *shape)``; each call is a fresh, independent draw."""

    def __init__(self, seed: int, keys: Tensor) -> None:
        if keys.dim() != 1:
            raise ValueError(f"image keys must be a 1-D tensor, got shape {tuple(keys.shape)}")
        self.device = keys.device
        s = int(seed) & ((1 << 64) - 1)
        k = keys.to(torch.int64)
        prefix = mix32(torch.full_like(k, s & _MASK32))
        prefix = mix32(prefix ^ ((s >> 32) & _MASK32))
        prefix = mix32(prefix ^ (k & _MASK32))
        self._prefix = mix32(prefix ^ ((k >> 32) & _MASK32))
        self._draw = 0

    @property
    def n(self) -> int:
        return int(self._prefix.shape[0])

    def bits(self, *shape: int) -> Tensor:
        """Uniform 32-bit integers (as int64), shaped ``(N, *shape)``."""
        self._draw += 1
        numel = math.prod(shape)
        draw = mix32(self._prefix ^ (self._draw * _GOLDEN & _MASK32)).view(-1, 1)
        e = torch.arange(numel, device=self.device, dtype=torch.int64).view(1, -1)
        h = mix32(mix32(e ^ draw) ^ draw)
        return h.view(self.n, *shape)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniform in (0, 1) with 24-bit resolution (never exactly 0 or 1)."""
        return ((self.bits(*shape) >> 8).to(dtype) + 0.5) * (1.0 / (1 << 24))

    def uniform(self, low: float, high: float, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return low + (high - low) * self.rand(*shape, dtype=dtype)

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        """Integers uniform in ``[low, high)`` (numpy's ``randint`` convention), int64."""
        span = int(high) - int(low)
        if span <= 0:
            raise ValueError(f"randint needs low < high, got [{low}, {high})")
        return low + (self.bits(*shape) * span >> 32)

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
        seeds = mix32(self._prefix ^ ((self._draw + 1) * _GOLDEN & _MASK32)).tolist()
        self._draw += 1
        gen = torch.Generator(device=rates.device)
        for i, s in enumerate(seeds):
            gen.manual_seed(int(s))
            out[i] = torch.poisson(rates[i], generator=gen)
        return out
