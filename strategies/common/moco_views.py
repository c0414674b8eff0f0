"""MoCo-v2 "light" views, batched on the device: AdaContrast's weak (flip) and strong (jitter, grey, blur, flip) views.

Follows ``get_augmentation("moco-v2-light")`` / ``"plain"`` of the reference benchmark
(mariodoebler/test-time-adaptation@8b2ed63, ``augmentations/transforms_adacontrast.py``), there torchvision on each PIL
image in the data loader. Here every image gets its own draw (as per-image loader transforms do) and the ops run on
float tensors: ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 (the four ops in a random order per image, torchvision's
tensor formulas), RandomGrayscale(0.2), Gaussian blur with p = 0.5 and sigma ~ U[0.1, 2] (PIL's ``GaussianBlur(radius=
sigma)``, written as a separable Gaussian of that sigma, edge-replicated), horizontal flip with p = 0.5. The weak view
at CIFAR size (Resize(32) + RandomCrop(32) of a 32 x 32 image) is the flip alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ctta.imageops import grayscale, shift_hue


def _u(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> Tensor:
    """``n`` draws of U[lo, hi) on ``device``."""
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def hflip(x: Tensor, p: float, g: torch.Generator) -> Tensor:
    """Each image mirrored left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def _jitter_op(op: int, x: Tensor, f: Tensor) -> Tensor:
    """One ColorJitter op with per-image factors ``f`` (N): 0 brightness, 1 contrast, 2 saturation, 3 hue."""
    fv = f.view(-1, 1, 1, 1)
    if op == 0:
        return (fv * x).clamp(0, 1)
    if op == 1:
        mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return (fv * x + (1 - fv) * mean).clamp(0, 1)
    if op == 2:
        return (fv * x + (1 - fv) * grayscale(x)).clamp(0, 1)
    return shift_hue(x, f)


def color_jitter(x: Tensor, p: float, strength: float, hue: float, g: torch.Generator) -> Tensor:
    """RandomApply([ColorJitter(strength x3, hue)], p): per image, the four ops in a random order with own factors."""
    n, dev = x.shape[0], x.device
    apply = torch.rand(n, generator=g, device=dev) < p
    order = torch.rand(n, 4, generator=g, device=dev).argsort(dim=1)  # a random permutation per image
    factors = torch.stack([_u(n, 1 - strength, 1 + strength, g, dev) for _ in range(3)] + [_u(n, -hue, hue, g, dev)], 1)
    out = x
    for stage in range(4):
        mixed = out
        for op in range(4):
            here = (order[:, stage] == op).view(-1, 1, 1, 1)
            mixed = torch.where(here, _jitter_op(op, out, factors[:, op]), mixed)
        out = mixed
    return torch.where(apply.view(-1, 1, 1, 1), out, x)


def gaussian_blur(x: Tensor, p: float, sigma_lo: float, sigma_hi: float, g: torch.Generator) -> Tensor:
    """Per image, with probability ``p``, a separable Gaussian blur of sigma ~ U[lo, hi] (edges replicated)."""
    n, c, h, w = x.shape
    sigma = _u(n, sigma_lo, sigma_hi, g, x.device)
    apply = torch.rand(n, generator=g, device=x.device) < p
    radius = int(math.ceil(3 * sigma_hi))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C) x (2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)
    return torch.where(apply.view(-1, 1, 1, 1), y, x)


def weak_view(x: Tensor, g: torch.Generator) -> Tensor:
    """The "plain" view at the image's own size: a random horizontal flip."""
    return hflip(x, 0.5, g)


def strong_view(x: Tensor, g: torch.Generator, jitter_p: float = 0.8, gray_p: float = 0.2,
                blur_p: float = 0.5) -> Tensor:
    """The "moco-v2-light" view: colour jitter, greyscale, Gaussian blur, flip, each image drawn on its own."""
    y = color_jitter(x, jitter_p, 0.4, 0.1, g)
    gray = torch.rand(x.shape[0], generator=g, device=x.device) < gray_p
    y = torch.where(gray.view(-1, 1, 1, 1), grayscale(y).expand_as(y), y)
    y = gaussian_blur(y, blur_p, 0.1, 2.0, g)
    return hflip(y, 0.5, g)


__all__ = ["color_jitter", "gaussian_blur", "hflip", "strong_view", "weak_view"]
