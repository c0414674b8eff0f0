"""Weather corruptions: brightness, fog and snow (frost to come). Constants: make_cifar_c.py /
make_imagenet_c.py (= imagecorruptions)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ctta.imageops import hsv_to_rgb, rgb_to_hsv

from .core import quantize_8bit, register_corruption
from .filters import clipped_zoom, motion_blur_filter, round_8bit
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


# ---------------------------------------------------------------------------------------------------------------
# Snow. Constants (loc, scale, zoom, threshold, blur radius, blur sigma, blend): make_cifar_c.py snow
# (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
# (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8); make_imagenet_c.py / imagecorruptions
# snow (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
# (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55); blur angle np.random.uniform(-135, -45).

_CV2_GRAY = (0.299, 0.587, 0.114)  # cv2.cvtColor(COLOR_RGB2GRAY) on float images


def _snow_layer(rng: ImageRng, h: int, w: int, c: Tuple[float, ...], dtype: torch.dtype) -> Tensor:
    """The scripts' snow layer (N x 1 x H x W): ``normal(loc=c[0], scale=c[1])``, ``clipped_zoom`` by c[2], zeroed
    below c[3], clipped, stored as uint8 (truncated) for Wand, motion-blurred (radius c[4], sigma c[5], angle
    ``U(-135, -45)``) and read back from ImageMagick's 8-bit output (rounded)."""
    layer = c[0] + c[1] * rng.randn(h, w, dtype=torch.float64)
    layer = clipped_zoom(layer[:, None], float(c[2]))
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer).clamp_(0.0, 1.0)
    layer = quantize_8bit(layer).to(dtype)
    angle = rng.uniform(-135.0, -45.0, dtype=torch.float64)
    return round_8bit(motion_blur_filter(layer, float(c[4]), float(c[5]), angle))


@register_corruption("snow", cifar10=((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                                      (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                                      (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
                     imagenet=((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
                               (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
                               (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)))
def snow(x: Tensor, c: Tuple[float, ...], rng: ImageRng) -> Tensor:
    """Snow: ``c[6] x + (1 - c[6]) max(x, 1.5 gray(x) + 0.5) + snow + rot180(snow)`` with one snow layer per image.

    ``gray`` is OpenCV's RGB2GRAY (0.299, 0.587, 0.114); the layer is :func:`_snow_layer` (the scripts' Wand
    pipeline, including its two 8-bit conversions; ``imagecorruptions`` skips the first and rounds the second,
    and blurs the untrimmed zoom before cropping its top-left, at most one pixel larger here).
    """
    n, _, h, w = x.shape
    layer = _snow_layer(rng, h, w, c, x.dtype)
    gray = (x * x.new_tensor(_CV2_GRAY).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, gray * 1.5 + 0.5)
    return x + layer + layer.flip(-2, -1)
