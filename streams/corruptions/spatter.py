"""Spatter (extra corruption of the original release): water drops (levels with c[5] = 0) or mud (c[5] = 1).

Both start from a liquid layer: per image, ``N(c[0], c[1])`` noise of the image's size, Gaussian-blurred (skimage
``gaussian``, sigma c[2]) and zeroed below c[3]. Water draws the drops' rims: the scripts' OpenCV chain ``Canny(50,
150)`` -> ``distanceTransform(DIST_L2, 5)`` -> truncate at 20 -> ``blur(3 x 3)`` -> ``equalizeHist`` -> emboss
``filter2D`` -> ``blur(3 x 3)``, multiplied by the layer, normalised, scaled by c[4] and added in pale turquoise.
Mud blurs the layer's mask (sigma c[4]), keeps it where >= 0.8 and blends in mud brown.

Each OpenCV step is re-implemented batched in torch with OpenCV's integer rules (Sobel with BORDER_REPLICATE, L1
magnitude, tangent-sector non-maximum suppression, 8-connected hysteresis; the 5 x 5 chamfer distance with OpenCV's
fixed-point weights 1, 1.4, 2.1969 in its two raster passes, each row's horizontal recursion done as a cumulative
minimum; equalizeHist's float32 LUT), so a layer gives the same rims as cv2 up to rare rounding ties.

Constants: make_cifar_c.py spatter ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1,
0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)); make_imagenet_c.py /
imagecorruptions spatter ((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
(0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import register_corruption
from .filters import filter_channels, gaussian_filter, pad2d
from .rng import ImageRng

_TG22 = 13573  # OpenCV canny.cpp: round(tan(22.5 deg) * 2^15)
_CANNY_SHIFT = 15
_DIST_SHIFT = 16
_DIST_INIT = (1 << 31) - 1  # OpenCV INIT_DIST0 (INT_MAX): outside the image / not reached yet
_DIST_HV, _DIST_DIAG, _DIST_KNIGHT = (round(v * (1 << _DIST_SHIFT)) for v in (1.0, 1.4, 2.1969))
_EMBOSS = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
_WATER = (175 / 255.0, 238 / 255.0, 238 / 255.0)  # "pale turquoise", added to channels 0, 1, 2 as the scripts do
_MUD = (63 / 255.0, 42 / 255.0, 20 / 255.0)


def canny(img: Tensor, low: int, high: int) -> Tensor:
    """``cv2.Canny(img, low, high)`` (aperture 3, L1 gradient) of N x H x W integer-valued images: a bool edge map."""
    n, h, w = img.shape
    x = pad2d(img.to(torch.int64)[:, None], 1, 1, "nearest")[:, 0]  # Sobel with BORDER_REPLICATE
    dx = (x[:, :-2, 2:] + 2 * x[:, 1:-1, 2:] + x[:, 2:, 2:]) - (x[:, :-2, :-2] + 2 * x[:, 1:-1, :-2] + x[:, 2:, :-2])
    dy = (x[:, 2:, :-2] + 2 * x[:, 2:, 1:-1] + x[:, 2:, 2:]) - (x[:, :-2, :-2] + 2 * x[:, :-2, 1:-1] + x[:, :-2, 2:])
    mag = dx.abs() + dy.abs()
    mp = F.pad(mag, (1, 1, 1, 1))  # magnitudes outside the image are 0
    centre = mp[:, 1:-1, 1:-1]

    def at(oy: int, ox: int) -> Tensor:
        return mp[:, 1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    ax, ay = dx.abs(), dy.abs() << _CANNY_SHIFT
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg22x + (ax << (_CANNY_SHIFT + 1)))
    same_sign = (dx ^ dy) >= 0  # s = 1: compare (y - 1, x - 1) and (y + 1, x + 1); else the other diagonal
    diag = torch.where(same_sign, (centre > at(-1, -1)) & (centre > at(1, 1)),
                       (centre > at(-1, 1)) & (centre > at(1, -1)))
    peak = torch.where(horizontal, (centre > at(0, -1)) & (centre >= at(0, 1)),
                       torch.where(vertical, (centre > at(-1, 0)) & (centre >= at(1, 0)), diag))
    weak = peak & (mag > low)
    edges = weak & (mag > high)
    while True:  # hysteresis: grow the strong edges through 8-connected weak ones
        before = edges
        for _ in range(4):
            edges = weak & (F.max_pool2d(edges[:, None].to(torch.float32), 3, 1, 1)[:, 0] > 0)
        if torch.equal(edges, before):
            return edges


def _row_scan(cand: Tensor, step: int) -> Tensor:
    """``t[j] = min(cand[j], t[j - 1] + step)`` along the last axis, all rows at once (a cumulative minimum)."""
    k = torch.arange(cand.shape[-1], device=cand.device, dtype=torch.int64) * step
    return torch.cummin(cand - k, dim=-1).values + k


def distance_transform(background: Tensor) -> Tensor:
    """``cv2.distanceTransform(src, cv2.DIST_L2, 5)`` where ``background`` (N x H x W bool) marks the zero pixels.

    OpenCV's 5 x 5 chamfer in fixed point (weights 1, 1.4, 2.1969 times 2^16), its forward then backward raster
    pass; outside the image counts as unreached. Unreached pixels (no zero pixel at all) keep a huge distance.
    """
    n, h, w = background.shape
    a, b, c = _DIST_HV, _DIST_DIAG, _DIST_KNIGHT
    init = torch.full((n, h + 4, w + 4), _DIST_INIT, dtype=torch.int64, device=background.device)
    t = init.clone()
    zero = background.to(torch.int64)
    for i in range(h):  # forward pass: neighbours above and to the left
        r = i + 2
        up1, up2 = t[:, r - 1], t[:, r - 2]
        cand = torch.stack((up2[:, 1:w + 1] + c, up2[:, 3:w + 3] + c, up1[:, 0:w] + c, up1[:, 1:w + 1] + b,
                            up1[:, 2:w + 2] + a, up1[:, 3:w + 3] + b, up1[:, 4:w + 4] + c)).amin(dim=0)
        cand = torch.where(zero[:, i] > 0, torch.zeros_like(cand), cand)
        t[:, r, 2:w + 2] = _row_scan(cand, a)
    for i in range(h - 1, -1, -1):  # backward pass: neighbours below and to the right
        r = i + 2
        dn1, dn2 = t[:, r + 1], t[:, r + 2]
        cand = torch.stack((t[:, r, 2:w + 2], dn2[:, 3:w + 3] + c, dn2[:, 1:w + 1] + c, dn1[:, 4:w + 4] + c,
                            dn1[:, 3:w + 3] + b, dn1[:, 2:w + 2] + a, dn1[:, 1:w + 1] + b,
                            dn1[:, 0:w] + c)).amin(dim=0)
        t[:, r, 2:w + 2] = _row_scan(cand.flip(-1), a).flip(-1)
    return t[:, 2:h + 2, 2:w + 2].to(torch.float64) / (1 << _DIST_SHIFT)


def equalize_hist(img: Tensor) -> Tensor:
    """``cv2.equalizeHist`` of N x H x W images holding integers 0..255 (int64 in, int64 out), per image."""
    n = img.shape[0]
    flat = img.reshape(n, -1)
    total = flat.shape[1]
    hist = torch.zeros(n, 256, dtype=torch.int64, device=img.device).scatter_add_(1, flat, torch.ones_like(flat))
    cdf = hist.cumsum(dim=1)
    first = flat.amin(dim=1, keepdim=True)
    h0 = hist.gather(1, first)
    scale = 255.0 / (total - h0).clamp_min(1).to(torch.float32)  # float32, as OpenCV
    lut = torch.round((cdf - h0).to(torch.float32) * scale).clamp_(0, 255).to(torch.int64)
    lut = torch.where(torch.arange(256, device=img.device) <= first, torch.zeros_like(lut), lut)
    out = lut.gather(1, flat).view_as(img)
    return torch.where((h0 == total).view(n, 1, 1), first.view(n, 1, 1).expand_as(img), out)


def _box3(x: Tensor) -> Tensor:
    """``cv2.blur(x, (3, 3))`` of N x H x W values (BORDER_REFLECT_101), unrounded: the sum times 1 / 9, as OpenCV."""
    total = filter_channels(x[:, None].double(), torch.ones(3, 3, dtype=torch.float64), "reflect101")[:, 0]
    return total * (1.0 / 9.0)


def water_rims(liquid: Tensor) -> Tensor:
    """The scripts' water mask before normalisation: ``liquid_u8 * dist`` for N x H x W liquid layers in [0, 1]."""
    layer = torch.floor(liquid * 255.0).clamp_(0, 255)  # (liquid * 255).astype(np.uint8)
    edges = canny(layer, 50, 150)
    dist = distance_transform(edges).clamp_max(20.0).to(torch.float32)  # cv2.threshold(THRESH_TRUNC, 20)
    dist = torch.floor(_box3(dist.double()).to(torch.float32)).to(torch.int64)  # blur, .astype(np.uint8)
    dist = equalize_hist(dist)
    dist = filter_channels(dist[:, None].double(), _EMBOSS, "reflect101")[:, 0]
    dist = torch.round(dist).clamp_(0, 255)  # filter2D(..., cv2.CV_8U): saturate_cast<uchar>
    dist = torch.round(_box3(dist)).clamp_(0, 255)  # blur on uint8 rounds
    return layer * dist


def _liquid_layer(rng: ImageRng, h: int, w: int, c: Tuple[float, ...]) -> Tensor:
    """``N(c[0], c[1])`` noise blurred by skimage ``gaussian(sigma=c[2])`` (nearest, truncate 4), zeroed below c[3]."""
    layer = c[0] + c[1] * rng.randn(h, w, dtype=torch.float64)
    layer = gaussian_filter(layer[:, None], float(c[2]), 4.0, "nearest")[:, 0]
    return torch.where(layer < c[3], torch.zeros_like(layer), layer)


@register_corruption("spatter", cifar10=((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                                         (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                                         (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
                     imagenet=((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0),
                               (0.65, 0.3, 2, 0.68, 0.5, 0), (0.65, 0.3, 1, 0.65, 1.5, 1),
                               (0.67, 0.4, 1, 0.65, 1.5, 1)))
def spatter(x: Tensor, c: Tuple[float, ...], rng: ImageRng) -> Tensor:
    """Water or mud spatter (c[5] = 0 or 1): one liquid layer per image, shared by the channels.

    Water: ``x + c[4] * m / max(m) * turquoise`` with ``m`` the layer times its rim map (an image whose layer is all
    zero, where the scripts divide 0 by 0, stays unchanged). Mud: ``x * (1 - m) + m * brown`` with ``m`` the
    layer's mask blurred by sigma c[4], zeroed below 0.8.
    """
    n, _, h, w = x.shape
    liquid = _liquid_layer(rng, h, w, c)
    if c[5] == 0:
        m = water_rims(liquid)
        peak = m.flatten(1).amax(dim=1).view(n, 1, 1)
        m = torch.where(peak > 0, m / peak.clamp_min(1e-12), torch.zeros_like(m)) * c[4]
        colour = torch.tensor(_WATER, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x + m[:, None].to(x.dtype) * colour
    mask = (liquid > c[3]).to(torch.float64)
    mask = gaussian_filter(mask[:, None], float(c[4]), 4.0, "nearest")[:, 0]
    mask = torch.where(mask < 0.8, torch.zeros_like(mask), mask)[:, None].to(x.dtype)
    colour = torch.tensor(_MUD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * (1 - mask) + colour * mask
