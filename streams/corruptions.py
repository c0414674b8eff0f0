"""The 15 common corruptions of CIFAR-10-C / ImageNet-C, generated on the device for batches of NCHW float images.

Formulas and severity constants follow Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019: the generation scripts ``ImageNet-C/create_c/make_cifar_c.py``
(``params="cifar10"``) and ``ImageNet-C/create_c/make_imagenet_c.py`` (``params="imagenet"``) of
github.com/hendrycks/robustness; the ImageNet constants equal those of the ``imagecorruptions`` package
(github.com/bethgelab/imagecorruptions, ``imagecorruptions/corruptions.py``). The scripts save ``np.uint8`` of
``clip(x, 0, 1) * 255``, so outputs are truncated to the 256-level grid by default, as in the released files.

Adding a corruption is one decorated function: ``@register_corruption(name, cifar10=(5 levels), imagenet=(5
levels))`` over ``fn(x, level, generator) -> Tensor``; clipping, quantisation, seeding and checks are shared.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ctta.errors import ConfigError, CttaError
from ctta.imageops import hsv_to_rgb, rgb_to_hsv
from ctta.registry import Registry
from ctta.seeding import stable_seed

log = logging.getLogger(__name__)

CORRUPTION_ORDER: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
PARAM_SETS: Tuple[str, ...] = ("cifar10", "imagenet")
_PARAM_ALIASES = {"cifar100": "cifar10"}  # CIFAR-100-C was made with the CIFAR-10 script's constants
SEVERITIES = 5
# Truncation tolerance on the 0..255 scale: float32 gives k - 1 ulp for an unchanged value k / 255.
_QUANT_EPS = 1e-3

CorruptionFn = Callable[[Tensor, Any, torch.Generator], Tensor]


@dataclass(frozen=True)
class Corruption:
    """A registered corruption: its function (None until implemented) and its 5 levels per parameter set."""

    name: str
    fn: Optional[CorruptionFn]
    levels: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.fn is not None


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def register_corruption(name: str, *, cifar10: Sequence[Any], imagenet: Sequence[Any]) -> Callable[[CorruptionFn],
                                                                                                 CorruptionFn]:
    """Decorator registering ``fn(x, level, generator)`` under ``name`` with its 5 levels per parameter set."""
    levels = {"cifar10": tuple(cifar10), "imagenet": tuple(imagenet)}
    for key, lv in levels.items():
        if len(lv) != SEVERITIES:
            raise ValueError(f"corruption {name!r}: {key} needs {SEVERITIES} levels, got {len(lv)}")

    def deco(fn: CorruptionFn) -> CorruptionFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        CORRUPTIONS.register(name, Corruption(name, fn, levels), help=doc[0] if doc else name)
        return fn

    return deco


def generated_corruptions() -> Tuple[str, ...]:
    """The corruptions :func:`corrupt` can generate, in the standard order."""
    return tuple(n for n in CORRUPTION_ORDER if n in CORRUPTIONS and CORRUPTIONS.get(n).available) + tuple(
        n for n in CORRUPTIONS.names() if n not in CORRUPTION_ORDER and CORRUPTIONS.get(n).available)


def corruption_seed(seed: int, corruption: str, severity: int) -> int:
    """A 63-bit generator seed from (seed, corruption, severity), stable across processes (unlike ``hash``)."""
    return stable_seed(seed, corruption, severity)


def quantize_8bit(x: Tensor) -> Tensor:
    """Truncate [0, 1] images to the 256-level grid (``floor(x * 255) / 255``), as ``np.uint8`` did in the scripts."""
    return torch.floor(x * 255.0 + _QUANT_EPS).clamp_(0.0, 255.0).div_(255.0)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise ConfigError(f"corrupt() needs a torch tensor of images, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ConfigError(f"corrupt() needs RGB images of shape N x 3 x H x W, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ConfigError(f"corrupt() needs float images in [0, 1], got dtype {images.dtype} "
                          f"(divide uint8 images by 255)")
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):
            raise ConfigError(f"corrupt() needs float images in [0, 1], got values from {lo:.4g} to {hi:.4g} "
                              f"(dtype {images.dtype})")


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= SEVERITIES:
        raise ConfigError(f"severity must be an integer from 1 to {SEVERITIES}, got {severity!r}")
    return severity


def _param_key(params: str) -> str:
    key = _PARAM_ALIASES.get(params, params)
    if key not in PARAM_SETS:
        raise ConfigError(f"corruption parameters must be one of {', '.join(PARAM_SETS)}, got {params!r}")
    return key


def corrupt(images: Tensor, corruption: str, severity: int, seed: int = 0,
            params: Literal["cifar10", "imagenet"] = "cifar10", quantize: bool = True) -> Tensor:
    """``corruption`` at ``severity`` (1..5) applied to NCHW float images in [0, 1], on their device.

    Deterministic per device for a given (seed, corruption, severity); ``quantize`` truncates to 8 bits as the files.
    """
    spec = CORRUPTIONS.get(corruption)
    _check_severity(severity)
    key = _param_key(params)
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ConfigError(f"seed must be an integer, got {seed!r}") from None
    if not spec.available:
        raise CttaError(f"corruption {corruption!r} cannot be generated yet (only "
                        f"{', '.join(generated_corruptions())}); provide the CIFAR-10-C files under --data-root")
    _check_images(images)
    if images.shape[0] == 0:
        return images.clone()
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    gen = torch.Generator(device=work.device)
    gen.manual_seed(corruption_seed(seed, corruption, severity))
    level = spec.levels[key][severity - 1]
    log.debug("generating %s-%d (%s levels: %r) for %d images on %s", corruption, severity, key, level,
              work.shape[0], work.device)
    out = spec.fn(work, level, gen).clamp_(0.0, 1.0)
    if quantize:
        out = quantize_8bit(out)
    return out.to(images.dtype)


def _randn(x: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def _rand(x: Tensor, gen: torch.Generator) -> Tensor:
    return torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Noise. Constants: make_cifar_c.py / make_imagenet_c.py (= imagecorruptions) gaussian_noise, shot_noise,
# impulse_noise; noise is drawn independently for every element (pixel and channel), as np.random / skimage do.

@register_corruption("gaussian_noise", cifar10=(0.04, 0.06, 0.08, 0.09, 0.10),
                     imagenet=(0.08, 0.12, 0.18, 0.26, 0.38))
def gaussian_noise(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    """Additive Gaussian noise of standard deviation c: ``x + N(0, c^2)``."""
    return x + c * _randn(x, gen)


@register_corruption("shot_noise", cifar10=(500, 250, 100, 75, 50), imagenet=(60, 25, 12, 5, 3))
def shot_noise(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    """Poisson (photon) noise at c photons per unit intensity: ``Poisson(x * c) / c``."""
    return torch.poisson(x * c, generator=gen) / c


@register_corruption("impulse_noise", cifar10=(0.01, 0.02, 0.03, 0.05, 0.07),
                     imagenet=(0.03, 0.06, 0.09, 0.17, 0.27))
def impulse_noise(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    """Salt-and-pepper noise (skimage ``random_noise(mode='s&p', amount=c)``): each element flips with p = c to 0 or 1.

    As skimage: ``flipped = U <= amount``, ``salted = U' <= salt_vs_pepper (0.5)``, drawn per element.
    """
    flipped = _rand(x, gen) <= c
    salted = _rand(x, gen) <= 0.5
    return torch.where(flipped, salted.to(x.dtype), x)


# ---------------------------------------------------------------------------------------------------------------
# Digital. Constants: make_cifar_c.py / make_imagenet_c.py (= imagecorruptions) brightness, contrast.

@register_corruption("brightness", cifar10=(0.05, 0.1, 0.15, 0.2, 0.3), imagenet=(0.1, 0.2, 0.3, 0.4, 0.5))
def brightness(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    """Add c to the HSV value channel, clipped to [0, 1] (skimage ``rgb2hsv`` / ``hsv2rgb`` definitions)."""
    hsv = rgb_to_hsv(x)
    v = (hsv[:, 2:3] + c).clamp_(0.0, 1.0)
    return hsv_to_rgb(torch.cat((hsv[:, :2], v), dim=1))


@register_corruption("contrast", cifar10=(0.75, 0.5, 0.4, 0.3, 0.15), imagenet=(0.4, 0.3, 0.2, 0.1, 0.05))
def contrast(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    """Scale deviations from the per-image, per-channel mean by c (both scripts: mean over axes (0, 1) of HWC)."""
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


# ---------------------------------------------------------------------------------------------------------------
# Shared filtering helpers: padding by index (any pad width, as OpenCV / SciPy do), per-channel 2-D correlation.

def _pad_index(n: int, pad: int, mode: str, device: torch.device) -> Tensor:
    """Source indices of a length-``n`` axis padded by ``pad`` on both sides.

    ``reflect101`` is OpenCV's BORDER_REFLECT_101 (``gfedcb|abcdefgh|gfedcba``, the edge sample not repeated);
    ``nearest`` is SciPy's ``mode='nearest'`` (edge sample repeated); ``reflect`` is SciPy's ``mode='reflect'``
    (edge sample repeated once, mirror about the pixel edge). Works for pads wider than the axis.
    """
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "reflect":  # SciPy's mode='reflect' (half-sample symmetric): dcba|abcd|dcba
        i = i.remainder(2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _pad2d(x: Tensor, ph: int, pw: int, mode: str) -> Tensor:
    h, w = x.shape[-2:]
    x = x.index_select(-2, _pad_index(h, ph, mode, x.device))
    return x.index_select(-1, _pad_index(w, pw, mode, x.device))


def _filter_channels(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every channel of NCHW ``x`` with the odd-sized 2-D ``kernel`` (``cv2.filter2D`` style, anchor at centre)."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    xp = _pad2d(x.reshape(n * c, 1, h, w), kh // 2, kw // 2, mode)
    out = torch.nn.functional.conv2d(xp, kernel.to(device=x.device, dtype=x.dtype).view(1, 1, kh, kw))
    return out.view(n, c, h, w)


def _gaussian_1d(sigma: float, radius: int, dtype: torch.dtype = torch.float64) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


# ---------------------------------------------------------------------------------------------------------------
# Blur. Constants: make_cifar_c.py / make_imagenet_c.py (= imagecorruptions) defocus_blur and (extra) gaussian_blur.

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
    g = _gaussian_1d(alias_blur, ks // 2)
    return _filter_channels(disk.view(1, 1, *disk.shape), torch.outer(g, g), "reflect101")[0, 0]


@register_corruption("defocus_blur", cifar10=((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
                     imagenet=((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)))
def defocus_blur(x: Tensor, c: Tuple[float, float], gen: torch.Generator) -> Tensor:
    """Defocus: every channel filtered with an anti-aliased disk of radius c[0] (alias blur sigma c[1]).

    As ``cv2.filter2D(x[:, :, d], -1, disk(*c))`` in the scripts: correlation with BORDER_REFLECT_101 padding.
    """
    return _filter_channels(x, _defocus_kernel(float(c[0]), float(c[1])), "reflect101")


@register_corruption("gaussian_blur", cifar10=(0.4, 0.6, 0.7, 0.8, 1), imagenet=(1, 2, 3, 4, 6))
def gaussian_blur(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    """Gaussian blur of standard deviation c per channel (extra corruption of the original release).

    As ``skimage.filters.gaussian(x, sigma=c, multichannel=True)``, i.e. ``scipy.ndimage.gaussian_filter`` with
    sigma (c, c, 0), ``truncate=4.0`` (radius ``int(4 c + 0.5)``) and ``mode='nearest'``; applied separably.
    """
    return _gaussian_filter(x, float(c), 4.0, "nearest")


def _gaussian_filter(x: Tensor, sigma: float, truncate: float, mode: str) -> Tensor:
    """``scipy.ndimage.gaussian_filter`` over the last two axes of NCHW ``x`` (radius ``int(truncate * sigma + 0.5)``,
    padding ``mode`` of :func:`_pad_index`), applied separably; sigma 0 returns ``x`` as SciPy does."""
    if sigma <= 0:
        return x
    g = _gaussian_1d(sigma, int(truncate * sigma + 0.5))
    h, w = x.shape[-2:]
    mh = _filter_matrix(g, h, mode).to(device=x.device, dtype=x.dtype)
    mw = _filter_matrix(g, w, mode).to(device=x.device, dtype=x.dtype)
    return torch.einsum("uh,nchw,vw->ncuv", mh, x, mw)


def _filter_matrix(g: Tensor, n: int, mode: str) -> Tensor:
    """The n x n matrix of correlating a length-n axis with the odd 1-D kernel ``g`` under padding ``mode``.

    Folding the padding into the matrix keeps wide kernels (radius > n, as elastic_transform's) cheap.
    """
    r = g.numel() // 2
    src = _pad_index(n, r, mode, torch.device("cpu")).unfold(0, g.numel(), 1)  # n x (2r + 1) source indices
    mat = torch.zeros(n, n, dtype=g.dtype)
    rows = torch.arange(n).view(n, 1).expand_as(src)
    mat.index_put_((rows, src), g.view(1, -1).expand_as(src), accumulate=True)
    return mat


# ---------------------------------------------------------------------------------------------------------------
# Digital (PIL-based in the scripts). Constants: make_cifar_c.py / make_imagenet_c.py (= imagecorruptions)
# pixelate, jpeg_compression; saturate is an extra corruption of the original release.

def _round_8bit(x: Tensor) -> Tensor:
    """Round half up to the 256-level grid, as PIL's fixed-point 8-bit results (``quantize_8bit`` then keeps them)."""
    return torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5) / 255.0


def _pil_box_weights(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The n_out x n_in resampling matrix of PIL's ``Image.BOX`` filter (``precompute_coeffs`` in Resample.c).

    Output sample i has centre ``(i + 0.5) * scale``, support ``0.5 * max(scale, 1)``, window
    ``[int(centre - support + 0.5), int(centre + support + 0.5))`` and weight ``box((j - centre + 0.5) / max(scale, 1))``
    with ``box(t) = 1`` for ``-0.5 < t <= 0.5``, normalised. Downsampling averages the input samples whose centres
    fall in the output pixel; upsampling picks one input sample (identical to ``Image.NEAREST``).
    """
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    lo = torch.floor(centre - support + 0.5).clamp_min(0)
    hi = torch.floor(centre + support + 0.5).clamp_max(n_in)
    j = torch.arange(n_in, dtype=torch.float64)
    t = (j[None, :] - centre[:, None] + 0.5) / fscale
    inside = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]) & (t > -0.5) & (t <= 0.5)
    wts = inside.to(torch.float64)
    wts = wts / wts.sum(dim=1, keepdim=True)
    return wts.to(device=device, dtype=dtype)


def _pil_box_resize(x: Tensor, h_out: int, w_out: int) -> Tensor:
    """PIL ``resize((w_out, h_out), Image.BOX)`` of 8-bit images: horizontal pass, then vertical, each rounded."""
    h, w = x.shape[-2:]
    if w_out != w:
        x = _round_8bit(torch.einsum("nchw,vw->nchv", x, _pil_box_weights(w, w_out, x.device, x.dtype)))
    if h_out != h:
        x = _round_8bit(torch.einsum("nchw,uh->ncuw", x, _pil_box_weights(h, h_out, x.device, x.dtype)))
    return x


@register_corruption("pixelate", cifar10=(0.95, 0.9, 0.85, 0.75, 0.65), imagenet=(0.6, 0.5, 0.4, 0.3, 0.25))
def pixelate(x: Tensor, c: float, gen: torch.Generator) -> Tensor:
    """Downsample to ``int(size * c)`` with PIL BOX, then back to full size with BOX (= nearest when enlarging).

    The scripts resize the 8-bit PIL image, so the input is first rounded to 8 bits, as PIL would hold it.
    """
    h, w = x.shape[-2:]
    small = _pil_box_resize(_round_8bit(x), int(h * c), int(w * c))
    return _pil_box_resize(small, h, w)


@register_corruption("jpeg_compression", cifar10=(80, 65, 58, 50, 40), imagenet=(25, 18, 15, 10, 7))
def jpeg_compression(x: Tensor, c: int, gen: torch.Generator) -> Tensor:
    """A real JPEG encode / decode at quality c (libjpeg through ``torchvision.io``), as PIL's ``save('JPEG')``.

    Runs on uint8 CPU copies of the images (one JPEG stream each) and returns to the input device and dtype.
    """
    import warnings

    from torchvision.io import decode_jpeg, encode_jpeg

    u8 = torch.round(x.detach().clamp(0.0, 1.0) * 255.0).to(device="cpu", dtype=torch.uint8)
    with warnings.catch_warnings():  # torchvision >= 0.29 flags its image codecs as deprecated (torchcodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        streams = encode_jpeg(list(u8.unbind(0)), quality=int(c))
        decoded = decode_jpeg(streams)
    return torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255.0


@register_corruption("saturate", cifar10=((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
                     imagenet=((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)))
def saturate(x: Tensor, c: Tuple[float, float], gen: torch.Generator) -> Tensor:
    """Scale and shift the HSV saturation: ``clip(s * c[0] + c[1], 0, 1)`` (extra corruption of the release)."""
    hsv = rgb_to_hsv(x)
    s = (hsv[:, 1:2] * c[0] + c[1]).clamp_(0.0, 1.0)
    return hsv_to_rgb(torch.cat((hsv[:, :1], s, hsv[:, 2:]), dim=1))


# ---------------------------------------------------------------------------------------------------------------
# Glass blur. Constants (sigma, max_delta, iterations): make_cifar_c.py glass_blur (0.05, 1, 1), (0.25, 1, 1),
# (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2); make_imagenet_c.py / imagecorruptions glass_blur (0.7, 1, 2), (0.9, 2, 1),
# (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2).

def _local_shuffle(x: Tensor, d: int, iterations: int, gen: torch.Generator) -> Tensor:
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
                dy = torch.randint(-d, d, shape, generator=gen, device=dev)
                dx = torch.randint(-d, d, shape, generator=gen, device=dev)
                a = (hs.view(1, -1, 1) * w + ws.view(1, 1, -1)).expand(shape).reshape(n, 1, -1).expand(n, ch, -1)
                b = ((hs.view(1, -1, 1) + dy) * w + ws.view(1, 1, -1) + dx).reshape(n, 1, -1).expand(n, ch, -1)
                va, vb = out.gather(2, a), out.gather(2, b)
                out.scatter_(2, a, vb)
                out.scatter_(2, b, va)
    return out.view(n, ch, h, w)


@register_corruption("glass_blur", cifar10=((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
                     imagenet=((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)))
def glass_blur(x: Tensor, c: Tuple[float, int, int], gen: torch.Generator) -> Tensor:
    """Glass: Gaussian blur (sigma c[0]) stored as uint8, c[2] rounds of local pixel swaps within c[1], blur again.

    The blurs are the scripts' ``skimage gaussian(multichannel=True)`` (SciPy, ``mode='nearest'``, truncate 4), as
    :func:`gaussian_blur`; the first result is truncated to 8 bits (``np.uint8(... * 255)``); the swaps are
    :func:`_local_shuffle` (vectorised in phases; see there for the one difference from the sequential loop).
    """
    sigma, d, iters = float(c[0]), int(c[1]), int(c[2])
    x = quantize_8bit(_gaussian_filter(x, sigma, 4.0, "nearest").clamp(0.0, 1.0))
    return _gaussian_filter(_local_shuffle(x, d, iters, gen), sigma, 4.0, "nearest")


# ---------------------------------------------------------------------------------------------------------------
# Zoom blur. Constants: make_cifar_c.py zoom_blur (np.arange(1, 1.06 .. 1.26, 0.01)) and make_imagenet_c.py /
# imagecorruptions zoom_blur (np.arange(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02),
# (1, 1.31, 0.03)); a level is the (start, stop, step) of that np.arange.

def _zoom_matrix(n: int, z: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The n x n linear map of the scripts' ``clipped_zoom`` along one axis of length n.

    ``clipped_zoom``: crop ``ch = ceil(n / z)`` samples from ``top = (n - ch) // 2``, ``scipy.ndimage.zoom(order=1)``
    to ``m = round(ch * z)`` samples (output i samples the crop at ``i * (ch - 1) / (m - 1)``, linear interpolation),
    then keep ``n`` samples from ``(m - n) // 2`` (the CIFAR / ImageNet scripts' centre trim).
    """
    ch = int(np.ceil(n / float(z)))
    top = (n - ch) // 2
    m = int(round(ch * float(z)))
    trim = max((m - n) // 2, 0)
    i = torch.arange(trim, trim + n, dtype=torch.float64)
    pos = i * ((ch - 1) / (m - 1)) if m > 1 else torch.zeros_like(i)
    pos = pos.clamp(0, ch - 1) + top
    lo = pos.floor().clamp(0, n - 1)
    frac = pos - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=n - 1)
    mat = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)
    mat.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat.to(device=device, dtype=dtype)


@register_corruption("zoom_blur", cifar10=((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01),
                                           (1, 1.26, 0.01)),
                     imagenet=((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02),
                               (1, 1.31, 0.03)))
def zoom_blur(x: Tensor, c: Tuple[float, float, float], gen: torch.Generator) -> Tensor:
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
# Fog. Constants: make_cifar_c.py fog ((.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)) with plasma_fractal(
# mapsize=32); make_imagenet_c.py / imagecorruptions fog ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)) with
# mapsize 256 (imagecorruptions: the next power of two of the largest side, which gives both).

def _plasma_fractal(n: int, mapsize: int, wibbledecay: float, gen: torch.Generator, device: torch.device,
                    dtype: torch.dtype) -> Tensor:
    """``n`` independent diamond-square heightmaps (N x mapsize x mapsize) in [0, 1], as the scripts' plasma_fractal.

    Starts from 0 at the corner with ``wibble = 100``; every step fills square centres, then the two diamond
    lattices, each with ``sum / 4 + wibble * U(-wibble, wibble)`` (toroidal neighbours, as ``np.roll``), and divides
    wibble by ``wibbledecay``; finally min-max normalised per map. Same distribution, drawn from ``gen``.
    """
    maps = torch.zeros(n, mapsize, mapsize, device=device, dtype=dtype)
    step, wibble = mapsize, 100.0

    def wibbled(acc: Tensor) -> Tensor:
        noise = torch.rand(acc.shape, generator=gen, device=device, dtype=dtype) * (2 * wibble) - wibble
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
def fog(x: Tensor, c: Tuple[float, float], gen: torch.Generator) -> Tensor:
    """Fog: ``(x + c[0] * plasma[:H, :W]) * max_val / (max_val + c[0])`` with ``max_val`` the image's maximum.

    One plasma fractal (diamond-square, ``wibbledecay = c[1]``) per image, of side the next power of two of the
    largest image side (32 for CIFAR, 256 for 224 x 224 ImageNet, as the scripts), shared by the three channels.
    """
    n, _, h, w = x.shape
    mapsize = 1 << max(int(max(h, w)) - 1, 0).bit_length()
    plasma = _plasma_fractal(n, mapsize, float(c[1]), gen, x.device, x.dtype)[:, None, :h, :w]
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + c[0] * plasma) * max_val / (max_val + c[0])


# ---------------------------------------------------------------------------------------------------------------
# Elastic transform. Constants (alpha, sigma, affine jitter), in pixels: make_cifar_c.py elastic_transform with
# IMSIZE = 32: (0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05), (.1, .03, .03) times 32;
# make_imagenet_c.py elastic_transform: (2, .7, .1), (2, .08, .2), (.05, .01, .02), (.07, .01, .02), (.12, .01, .02)
# times 244 (sic, "should have been 224"). ``imagecorruptions`` replaced this with an affine-free variant
# (alpha 250 * (.05 .. .12), sigma 0.01 * size); the ImageNet-C script's version is generated here.

def _sample_bilinear(x: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """Bilinear samples of NCHW ``x`` at per-image pixel coordinates ``ys``, ``xs`` (N x H x W), already in range."""
    h, w = x.shape[-2:]
    grid = torch.stack((xs * (2.0 / max(w - 1, 1)) - 1.0, ys * (2.0 / max(h - 1, 1)) - 1.0), dim=-1)
    return torch.nn.functional.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                                           align_corners=True)


def _reflect101_coord(c: Tensor, n: int) -> Tensor:
    """Continuous coordinates mirrored about the edge samples (OpenCV BORDER_REFLECT_101: -1 -> 1)."""
    if n == 1:
        return torch.zeros_like(c)
    period = 2 * (n - 1)
    c = c.remainder(period)
    return torch.where(c > n - 1, period - c, c)


def _reflect_coord(c: Tensor, n: int) -> Tensor:
    """SciPy ``map_coordinates(mode='reflect')`` for order 1: mirror about the pixel edges (-0.5, n - 0.5), the
    half pixel beyond each edge sample holding that sample."""
    u = (c + 0.5).remainder(2 * n)
    u = torch.where(u > n, 2 * n - u, u)
    return (u - 0.5).clamp(0, n - 1)


@register_corruption("elastic_transform",
                     cifar10=((32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07),
                              (32 * 0.08, 32 * 0.06, 32 * 0.06), (32 * 0.1, 32 * 0.04, 32 * 0.05),
                              (32 * 0.1, 32 * 0.03, 32 * 0.03)),
                     imagenet=((244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                               (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                               (244 * 0.12, 244 * 0.01, 244 * 0.02)))
def elastic_transform(x: Tensor, c: Tuple[float, float, float], gen: torch.Generator) -> Tensor:
    """Elastic: a random affine warp, then a smooth random displacement field of amplitude c[0] and scale c[1].

    As the scripts, per image: the three points ``centre + s``, ``(centre_0 + s, centre_1 - s)``, ``centre - s``
    (``centre = size // 2``, ``s = min(size) // 3``) are jittered by ``U(-c[2], c[2])``; ``cv2.warpAffine`` with the
    fitted affine (bilinear, BORDER_REFLECT_101); then ``dx, dy = gaussian(U(-1, 1), c[1], mode='reflect',
    truncate=3) * c[0]`` and ``map_coordinates(order=1, mode='reflect')`` at ``(y + dy, x + dx)``. Bilinear sampling
    is float here (OpenCV's warpAffine rounds weights to 1/32 of a pixel). Batched; one draw per image.
    """
    n, _, h, w = x.shape
    dev, f64 = x.device, torch.float64
    alpha, sigma, jitter = (float(v) for v in c)
    centre = torch.tensor([h // 2, w // 2], dtype=f64, device=dev)
    s = float(min(h, w) // 3)
    pts1 = torch.stack((centre + s, centre + torch.tensor([s, -s], dtype=f64, device=dev), centre - s))
    pts2 = pts1 + (torch.rand((n, 3, 2), generator=gen, device=dev, dtype=f64) * 2 - 1) * jitter
    # getAffineTransform: [p1 1] @ M^T = p2 (points are (x, y) to OpenCV); warpAffine samples src at M^-1 (dst).
    src_h = torch.cat((pts1, torch.ones(3, 1, dtype=f64, device=dev)), dim=1).expand(n, 3, 3)
    mt = torch.linalg.solve(src_h, pts2)  # N x 3 x 2: rows A^T, last row b
    a, b = mt[:, :2, :].transpose(1, 2), mt[:, 2, :]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=f64, device=dev), torch.arange(w, dtype=f64, device=dev),
                            indexing="ij")
    dst = torch.stack((xx, yy), dim=-1).view(1, h * w, 2) - b[:, None, :]
    src = torch.linalg.solve(a, dst.transpose(1, 2)).transpose(1, 2).reshape(n, h, w, 2)
    warped = _sample_bilinear(x, _reflect101_coord(src[..., 1], h), _reflect101_coord(src[..., 0], w))

    shape = (n, 1, h, w)
    dx = _gaussian_filter(torch.rand(shape, generator=gen, device=dev, dtype=f64) * 2 - 1, sigma, 3.0, "reflect")
    dy = _gaussian_filter(torch.rand(shape, generator=gen, device=dev, dtype=f64) * 2 - 1, sigma, 3.0, "reflect")
    ys = _reflect_coord(yy + alpha * dy[:, 0], h)
    xs = _reflect_coord(xx + alpha * dx[:, 0], w)
    return _sample_bilinear(warped, ys, xs)


# The remaining names are known (their -C files load) but not generated yet: a later change registers each with
# @register_corruption, and this loop then skips it.
for _name in CORRUPTION_ORDER:
    if _name not in CORRUPTIONS:
        CORRUPTIONS.register(_name, Corruption(_name, None),
                             help="not generated yet: read from the released -C files under --data-root")
del _name

__all__ = ["CORRUPTIONS", "CORRUPTION_ORDER", "PARAM_SETS", "Corruption", "corrupt", "corruption_seed",
           "generated_corruptions", "quantize_8bit", "register_corruption"]
