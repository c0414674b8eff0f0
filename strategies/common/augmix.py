"""AugMix views batched on the device (Hendrycks et al., ICLR 2020), as MEMO and TPT draw them.

Follows the reference benchmark's ``augmentations/transforms_augmix.py`` and ``augmix_ops.py``
(mariodoebler/test-time-adaptation@8b2ed63, after google-research/augmix and zhangmarvin/memo), which works on one PIL
image at a time; here all views of an image are drawn at once with one generator. Per view:
  1. pre-augment: 32 px: random crop with 4 zero-padded pixels + horizontal flip; else RandomResizedCrop(size) +
     flip (scale (0.08, 1), ratio (3/4, 4/3), bilinear);
  2. three chains, each of 1-3 operations drawn uniformly from autocontrast, equalize, posterize, rotate, solarize,
     shear_x, shear_y, translate_x, translate_y, at a level drawn from U(0.1, severity), on 8-bit values (a PIL
     image's), parameterised as ``augmix_ops`` (e.g. rotate by int(3 level) degrees, sign random);
  3. mix = m x + (1 - m) sum_i w_i chain_i, w ~ Dirichlet(1, 1, 1), m ~ Beta(1, 1).
What differs from PIL: the geometric operations sample bilinearly at pixel centres (``grid_sample``), where PIL's
affine transform rounds its own way, and RandomResizedCrop is one bilinear resample without antialiasing. The draws
come from a torch generator, so views are not the reference's (which come from numpy's global state in loader
workers): agreement is statistical (docs/fidelity.md).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

Op = Callable[[Tensor, Tensor, torch.Generator], Tensor]  # (uint8-valued float images V x C x H x W, levels V, g)


def _sign(n: int, g: torch.Generator, device: torch.device) -> Tensor:
    return torch.where(torch.rand(n, generator=g, device=device) > 0.5, -1.0, 1.0)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Sample ``x`` at ``theta @ (u, v, 1)`` for each output pixel centre (u, v) in pixels; zero outside."""
    n, _, h, w = x.shape
    # pixel-centre coordinates -> normalised [-1, 1] (align_corners=False)
    to_px = torch.tensor([[w / 2, 0, w / 2 - 0.5], [0, h / 2, h / 2 - 0.5], [0, 0, 1]], dtype=x.dtype, device=x.device)
    to_norm = torch.linalg.inv(to_px)
    full = torch.cat([theta, theta.new_tensor([0, 0, 1]).expand(n, 1, 3)], dim=1)
    grid = F.affine_grid((to_norm @ full @ to_px)[:, :2], list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).round().clamp(0, 255)


def _translate(x: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    return _affine(x, theta)


def autocontrast(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp_min(1.0)
    return torch.where(hi > lo, ((x - lo) * scale).floor().clamp(0, 255), x)


def equalize(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    from torchvision.transforms.v2 import functional as TF  # imported here: torchvision costs ~3 s at start-up

    return TF.equalize(x.to(torch.uint8)).to(x.dtype)


def posterize(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    bits = 4 - (level * 4 / 10).long()
    keep = (256 - (1 << (8 - bits))).view(-1, 1, 1, 1)
    return (x.to(torch.long) & keep).to(x.dtype)


def rotate(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    deg = (level * 30 / 10).long().to(x.dtype) * _sign(len(x), g, x.device).to(x.dtype)
    rad = deg * math.pi / 180
    c, s = torch.cos(rad), torch.sin(rad)
    h, w = x.shape[-2:]
    cx, cy = w / 2 - 0.5, h / 2 - 0.5
    theta = torch.stack([torch.stack([c, -s, cx - c * cx + s * cy], 1), torch.stack([s, c, cy - s * cx - c * cy], 1)], 1)
    return _affine(x, theta)


def solarize(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    threshold = (256 - (level * 256 / 10).long()).to(x.dtype).view(-1, 1, 1, 1)
    return torch.where(x < threshold, x, 255 - x)


def _shear(x: Tensor, level: Tensor, g: torch.Generator, axis: int) -> Tensor:
    s = level * 0.3 / 10 * _sign(len(x), g, x.device).to(x.dtype)
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, axis, 1 - axis] = s  # PIL's AFFINE (1, s, 0, 0, 1, 0) / (1, 0, 0, s, 1, 0): input = output + s * other
    return _affine(x, theta)


def shear_x(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    return _shear(x, level, g, 0)


def shear_y(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    return _shear(x, level, g, 1)


def _shift(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    return (level * (x.shape[-1] / 3) / 10).long().to(x.dtype) * _sign(len(x), g, x.device).to(x.dtype)


def translate_x(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    return _translate(x, _shift(x, level, g), torch.zeros_like(level))


def translate_y(x: Tensor, level: Tensor, g: torch.Generator) -> Tensor:
    return _translate(x, torch.zeros_like(level), _shift(x, level, g))


AUGMIX_OPS: List[Op] = [autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x,
                        translate_y]


def preaugment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random crop (32 px: 4-pixel zero padding; else RandomResizedCrop) and horizontal flip of each image."""
    n, _, h, w = x.shape
    dev = x.device
    if h == 32 and w == 32:
        padded = F.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (n,), generator=g, device=dev)
        dx = torch.randint(0, 9, (n,), generator=g, device=dev)
        rows = (dy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 8)
        out = padded.gather(2, rows)
        cols = (dx.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        out = out.gather(3, cols)
    else:
        area = torch.empty(n, device=dev).uniform_(0.08, 1.0, generator=g)
        log_r = torch.empty(n, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
        r = log_r.exp()
        bw = (area * r).sqrt().clamp(max=1.0)  # box width / image width
        bh = (area / r).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, generator=g, device=dev) * (1 - bw) + bw / 2) * 2 - 1
        cy = (torch.rand(n, generator=g, device=dev) * (1 - bh) + bh / 2) * 2 - 1
        theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=dev)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = bw, cx, bh, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    flip = torch.rand(n, generator=g, device=dev) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)


def augmix_views(x: Tensor, n_views: int, g: torch.Generator, severity: float = 1.0, width: int = 3,
                 max_depth: int = 3, ops: Optional[List[Op]] = None) -> Tensor:
    """``n_views`` AugMix views of each image of ``x`` (B x C x H x W in [0, 1]): (B * n_views) x C x H x W, the
    views of image b at rows b * n_views .. (b + 1) * n_views - 1."""
    ops = AUGMIX_OPS if ops is None else ops
    dev = x.device
    base = preaugment(x.repeat_interleave(n_views, dim=0), g)
    v = len(base)
    orig = (base * 255).round()  # the PIL image the operations see
    chains = orig.unsqueeze(0).repeat(width, 1, 1, 1, 1).flatten(0, 1)  # chain i of view j at row i * v + j
    depth = torch.randint(1, max_depth + 1, (len(chains),), generator=g, device=dev)
    for step in range(max_depth):
        which = torch.randint(0, len(ops), (len(chains),), generator=g, device=dev)
        level = torch.empty(len(chains), device=dev).uniform_(0.1, severity, generator=g)
        out = chains
        for k, op in enumerate(ops):
            out = torch.where(((which == k) & (depth > step)).view(-1, 1, 1, 1), op(chains, level, g), out)
        chains = out
    w = -torch.rand(width, v, generator=g, device=dev).clamp_min(1e-12).log()  # Dirichlet(1, ..., 1)
    w = (w / w.sum(0, keepdim=True)).view(width, v, 1, 1, 1)
    m = torch.rand(v, generator=g, device=dev).view(v, 1, 1, 1)  # Beta(1, 1)
    mix = (w * chains.view(width, v, *chains.shape[1:]) / 255).sum(0)
    return m * (orig / 255) + (1 - m) * mix


__all__ = ["AUGMIX_OPS", "augmix_views", "preaugment"]
