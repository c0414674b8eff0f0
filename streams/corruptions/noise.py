"""Noise corruptions (gaussian, shot, impulse): drawn independently for every element (pixel and channel), as
``np.random`` / skimage do. Constants: make_cifar_c.py / make_imagenet_c.py (= imagecorruptions)."""
from __future__ import annotations


import torch
from torch import Tensor

from .core import register_corruption
from .rng import ImageRng


@register_corruption("gaussian_noise", cifar10=(0.04, 0.06, 0.08, 0.09, 0.10),
                     imagenet=(0.08, 0.12, 0.18, 0.26, 0.38))
def gaussian_noise(x: Tensor, c: float, rng: ImageRng) -> Tensor:
    """Additive Gaussian noise of standard deviation c: ``x + N(0, c^2)``."""
    return x + c * rng.randn(*x.shape[1:], dtype=x.dtype)


@register_corruption("shot_noise", cifar10=(500, 250, 100, 75, 50), imagenet=(60, 25, 12, 5, 3))
def shot_noise(x: Tensor, c: float, rng: ImageRng) -> Tensor:
    """Poisson (photon) noise at c photons per unit intensity: ``Poisson(x * c) / c``."""
    return rng.poisson(x * c) / c


@register_corruption("impulse_noise", cifar10=(0.01, 0.02, 0.03, 0.05, 0.07),
                     imagenet=(0.03, 0.06, 0.09, 0.17, 0.27))
def impulse_noise(x: Tensor, c: float, rng: ImageRng) -> Tensor:
    """Salt-and-pepper noise (skimage ``random_noise(mode='s&p', amount=c)``): each element flips with p = c to 0 or 1.

    As skimage: ``flipped = U <= amount``, ``salted = U' <= salt_vs_pepper (0.5)``, drawn per element.
    """
    flipped = rng.rand(*x.shape[1:], dtype=x.dtype) <= c
    salted = rng.rand(*x.shape[1:], dtype=x.dtype) <= 0.5
    return torch.where(flipped, salted.to(x.dtype), x)


@register_corruption("speckle_noise", cifar10=(0.06, 0.1, 0.12, 0.16, 0.2), imagenet=(0.15, 0.2, 0.35, 0.45, 0.6))
def speckle_noise(x: Tensor, c: float, rng: ImageRng) -> Tensor:
    """Multiplicative (speckle) noise, an extra corruption of the original release: ``x + x * N(0, c^2)``.

    Constants: make_cifar_c.py / make_imagenet_c.py (= imagecorruptions) ``speckle_noise``.
    """
    return x + x * (c * rng.randn(*x.shape[1:], dtype=x.dtype))
