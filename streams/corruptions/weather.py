"""Weather corruptions: brightness and fog (snow and frost to come). Constants: make_cifar_c.py /
make_imagenet_c.py (= imagecorruptions)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ctta.imageops import hsv_to_rgb, rgb_to_hsv

from .core import register_corruption
from .rng import ImageRng


@register_corruption("brightness", cifar10=(0.05, 0.1, 0.15, 0.2, 0.3), imagenet=(0.1, 0.2, 0.3, 0.4, 0.5))
def brightness(x: Tensor, c: float, rng: ImageRng) -> Tensor:
    """Add c to the HSV value channel, clipped to [0, 1] (skimage ``rgb2hsv`` / ``hsv2rgb`` definitions)."""
    hsv = rgb_to_hsv(x)
    v = (hsv[:, 2:3] + c).clamp_(0.0, 1.0)
    return hsv_to_rgb(torch.cat((hsv[:, :2], v), dim=1))


# ---------------------------------------------------------------------------------------------------------------
# Fog. Constants: make_cifar_c.py fog ((.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)) with plasma_fractal(
# mapsize=32); make_imagenet_c.py / imagecorruptions fog ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)) with
# mapsize 256 (imagecorruptions: the next power of two of the largest side, which gives both).

def _plasma_fractal(rng: ImageRng, mapsize: int, wibbledecay: float, dtype: torch.dtype) -> Tensor:
    """Independent diamond-square heightmaps, one per image of ``rng`` (N x mapsize x mapsize) in [0, 1], as the scripts' plasma_fractal.

    Starts from 0 at the corner with ``wibble = 100``; every step fills square centres, then the two diamond
    lattices, each with ``sum / 4 + wibble * U(-wibble, wibble)`` (toroidal neighbours, as ``np.roll``), and divides
    wibble by ``wibbledecay``; finally min-max normalised per map. Same distribution, drawn per image from ``rng``.
    """
    n = rng.n
    maps = torch.zeros(n, mapsize, mapsize, device=rng.device, dtype=dtype)
    step, wibble = mapsize, 100.0

    def wibbled(acc: Tensor) -> Tensor:
        noise = rng.rand(*acc.shape[1:], dtype=dtype) * (2 * wibble) - wibble
        return acc / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        acc = corners + corners.roll(-1, dims=1)
        acc = acc + acc.roll(-1, dims=2)
        maps[:, half::step, half::step] = wibbled(acc)
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        left = centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        maps[:, 0::step, half::step] = wibbled(left)
        top = centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        maps[:, half::step, 0::step] = wibbled(top)
        step //= 2
        wibble /= wibbledecay
    flat = maps.view(n, -1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / flat.max(dim=1, keepdim=True).values).view(n, mapsize, mapsize)


@register_corruption("fog", cifar10=((.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)),
                     imagenet=((1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)))
def fog(x: Tensor, c: Tuple[float, float], rng: ImageRng) -> Tensor:
    """Fog: ``(x + c[0] * plasma[:H, :W]) * max_val / (max_val + c[0])`` with ``max_val`` the image's maximum.

    One plasma fractal (diamond-square, ``wibbledecay = c[1]``) per image, of side the next power of two of the
    largest image side (32 for CIFAR, 256 for 224 x 224 ImageNet, as the scripts), shared by the three channels.
    """
    n, _, h, w = x.shape
    mapsize = 1 << max(int(max(h, w)) - 1, 0).bit_length()
    plasma = _plasma_fractal(rng, mapsize, float(c[1]), x.dtype)[:, None, :h, :w]
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + c[0] * plasma) * max_val / (max_val + c[0])
