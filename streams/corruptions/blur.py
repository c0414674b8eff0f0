"""Blur corruptions: defocus, glass, motion, zoom and (extra) gaussian blur. Constants: make_cifar_c.py /
make_imagenet_c.py (= imagecorruptions), cited per function."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from .core import quantize_8bit, register_corruption
from .filters import (filter_channels, gaussian_1d, gaussian_filter, motion_blur_filter, round_8bit,
                      zoom_matrix)
from .rng import ImageRng


def _defocus_kernel(radius: float, alias_blur: float) -> Tensor:
    """The scripts' ``disk(radius, alias_blur)``: a normalised disk on a 17 x 17 grid (radius <= 8; else
    (2r+1)^2), then ``cv2.GaussianBlur(ksize=(3, 3) (radius <= 8) or (5, 5), sigmaX=alias_blur)`` on the kernel image
    itself, which uses OpenCV's sampled Gaussian ``exp(-(i - (k-1)/2)^2 / (2 sigma^2))`` and BORDER_REFLECT_101.
    """
    half, ks = (8, 3) if radius <= 8 else (int(radius), 5)
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).to(torch.float64)
    disk = (disk / disk.sum()).to(torch.float32).to(torch.float64)  # the scripts build it in float32
    g = gaussian_1d(alias_blur, ks // 2)
    return filter_channels(disk.view(1, 1, *disk.shape), torch.outer(g, g), "reflect101")[0, 0]


@register_corruption("defocus_blur", cifar10=((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
                     imagenet=((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)))
def defocus_blur(x: Tensor, c: Tuple[float, float], rng: ImageRng) -> Tensor:
    """Defocus: every channel filtered with an anti-aliased disk of radius c[0] (alias blur sigma c[1]).

    As ``cv2.filter2D(x[:, :, d], -1, disk(*c))`` in the scripts: correlation with BORDER_REFLECT_101 padding.
    """
    return filter_channels(x, _defocus_kernel(float(c[0]), float(c[1])), "reflect101")


@register_corruption("gaussian_blur", cifar10=(0.4, 0.6, 0.7, 0.8, 1), imagenet=(1, 2, 3, 4, 6))
def gaussian_blur(x: Tensor, c: float, rng: ImageRng) -> Tensor:
    """Gaussian blur of standard deviation c per channel (extra corruption of the original release).

    As ``skimage.filters.gaussian(x, sigma=c, multichannel=True)``, i.e. ``scipy.ndimage.gaussian_filter`` with
    sigma (c, c, 0), ``truncate=4.0`` (radius ``int(4 c + 0.5)``) and ``mode='nearest'``; applied separably.
    """
    return gaussian_filter(x, float(c), 4.0, "nearest")



# ---------------------------------------------------------------------------------------------------------------
# Glass blur. Constants (sigma, max_delta, iterations): make_cifar_c.py glass_blur (0.05, 1, 1), (0.25, 1, 1),
# (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2); make_imagenet_c.py / imagecorruptions glass_blur (0.7, 1, 2), (0.9, 2, 1),
# (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2).

def _local_shuffle(x: Tensor, d: int, iterations: int, rng: ImageRng) -> Tensor:
    """The scripts' local pixel shuffle, vectorised: every pixel (h, w) with ``d < h <= H - d``, ``d < w <= W - d``
    swaps (all channels) with ``(h + dy, w + dx)``, ``dx, dy`` uniform integers in ``[-d, d - 1]`` (``np.random.randint
    (-d, d)``, upper bound exclusive), once per iteration.

    The scripts swap one pixel at a time in reverse raster order. Here the pixels are split into ``(2d + 1)^2``
    phases by ``(h mod (2d + 1), w mod (2d + 1))``: within a phase the swap windows ``[h - d, h + d - 1]`` are
    disjoint and hold no other pixel of the phase, so its swaps commute and run at once for the whole batch. Same
    swaps and offset distribution; only the order in which overlapping swaps compose differs (phases, descending).
    """
    n, ch, h, w = x.shape
    if h - d <= d or w - d <= d:
        return x
    out = x.reshape(n, ch, h * w).clone()
    stride = 2 * d + 1
    dev = x.device
    for _ in range(iterations):
        for ph in range(stride - 1, -1, -1):
            for pw in range(stride - 1, -1, -1):
                hs = torch.arange(d + 1, h - d + 1, device=dev)
                ws = torch.arange(d + 1, w - d + 1, device=dev)
                hs, ws = hs[hs % stride == ph], ws[ws % stride == pw]
                if hs.numel() == 0 or ws.numel() == 0:
                    continue
                shape = (n, hs.numel(), ws.numel())
                dy = rng.randint(-d, d, *shape[1:])
                dx = rng.randint(-d, d, *shape[1:])
                a = (hs.view(1, -1, 1) * w + ws.view(1, 1, -1)).expand(shape).reshape(n, 1, -1).expand(n, ch, -1)
                b = ((hs.view(1, -1, 1) + dy) * w + ws.view(1, 1, -1) + dx).reshape(n, 1, -1).expand(n, ch, -1)
                va, vb = out.gather(2, a), out.gather(2, b)
                out.scatter_(2, a, vb)
                out.scatter_(2, b, va)
    return out.view(n, ch, h, w)


@register_corruption("glass_blur", cifar10=((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
                     imagenet=((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)))
def glass_blur(x: Tensor, c: Tuple[float, int, int], rng: ImageRng) -> Tensor:
    """Glass: Gaussian blur (sigma c[0]) stored as uint8, c[2] rounds of local pixel swaps within c[1], blur again.

    The blurs are the scripts' ``skimage gaussian(multichannel=True)`` (SciPy, ``mode='nearest'``, truncate 4), as
    :func:`gaussian_blur`; the first result is truncated to 8 bits (``np.uint8(... * 255)``); the swaps are
    :func:`_local_shuffle` (vectorised in phases; see there for the one difference from the sequential loop).
    """
    sigma, d, iters = float(c[0]), int(c[1]), int(c[2])
    x = quantize_8bit(gaussian_filter(x, sigma, 4.0, "nearest").clamp(0.0, 1.0))
    return gaussian_filter(_local_shuffle(x, d, iters, rng), sigma, 4.0, "nearest")


# ---------------------------------------------------------------------------------------------------------------
# Zoom blur. Constants: make_cifar_c.py zoom_blur (np.arange(1, 1.06 .. 1.26, 0.01)) and make_imagenet_c.py /
# imagecorruptions zoom_blur (np.arange(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02),
# (1, 1.31, 0.03)); a level is the (start, stop, step) of that np.arange.

# The scripts' clipped_zoom along one axis, shared with snow (filters.zoom_matrix); kept under its old name.
_zoom_matrix = zoom_matrix


@register_corruption("zoom_blur", cifar10=((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01),
                                           (1, 1.26, 0.01)),
                     imagenet=((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02),
                               (1, 1.31, 0.03)))
def zoom_blur(x: Tensor, c: Tuple[float, float, float], rng: ImageRng) -> Tensor:
    """Zoom blur: the mean of the image and its centre zooms by every factor in ``np.arange(*c)``.

    As the scripts: ``(x + sum_z clipped_zoom(x, z)) / (len(zooms) + 1)``, each zoom being SciPy's ``zoom(order=1)``
    of a centre crop (bilinear = separable linear interpolation, applied here as two small matrices per factor to
    the whole batch). ``imagecorruptions`` keeps the top-left ``H x W`` of the zoom instead of the centre: at most one
    pixel of shift. Non-square images are cropped per axis.
    """
    h, w = x.shape[-2:]
    zooms = np.arange(*c)
    out = x.clone()
    for z in zooms:
        zh = _zoom_matrix(h, float(z), x.device, x.dtype)
        zw = _zoom_matrix(w, float(z), x.device, x.dtype)
        out += torch.einsum("uh,nchw,vw->ncuv", zh, x, zw)
    return out / (len(zooms) + 1)


# ---------------------------------------------------------------------------------------------------------------
# Motion blur. Constants (radius, sigma): make_cifar_c.py motion_blur (6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5);
# make_imagenet_c.py / imagecorruptions motion_blur (10, 3), (15, 5), (15, 8), (15, 12), (20, 15); angle
# np.random.uniform(-45, 45) per image in both.

@register_corruption("motion_blur", cifar10=((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
                     imagenet=((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)))
def motion_blur(x: Tensor, c: Tuple[float, float], rng: ImageRng) -> Tensor:
    """Motion blur: ImageMagick's ``motion_blur(radius=c[0], sigma=c[1], angle=U(-45, 45))`` per image.

    The scripts run Wand's ``MagickMotionBlurImage`` on the PNG and decode its 8-bit result:
    :func:`~.filters.motion_blur_filter` is that filter (one-sided Gaussian over ``2 c[0] + 1`` taps along the
    angle, edge pixels beyond the border), and the result is rounded to 8 bits as ImageMagick writes it.
    ``imagecorruptions``' NumPy ``_motion_blur`` is the same filter except that it stops (drops the remaining taps,
    unnormalised) once a shift reaches the image size, which only images smaller than the kernel width meet.
    """
    angle = rng.uniform(-45.0, 45.0, dtype=torch.float64)
    return round_8bit(motion_blur_filter(x, float(c[0]), float(c[1]), angle))
