"""Filtering and resampling shared by the corruptions: padding as OpenCV / SciPy, separable Gaussian filters,
bilinear sampling with the scripts' border rules, and PIL's 8-bit BOX resize."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def pad_index(n: int, pad: int, mode: str, device: torch.device) -> Tensor:
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


def pad2d(x: Tensor, ph: int, pw: int, mode: str) -> Tensor:
    h, w = x.shape[-2:]
    x = x.index_select(-2, pad_index(h, ph, mode, x.device))
    return x.index_select(-1, pad_index(w, pw, mode, x.device))


def filter_channels(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every channel of NCHW ``x`` with the odd-sized 2-D ``kernel`` (``cv2.filter2D`` style, anchor at centre)."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    xp = pad2d(x.reshape(n * c, 1, h, w), kh // 2, kw // 2, mode)
    out = torch.nn.functional.conv2d(xp, kernel.to(device=x.device, dtype=x.dtype).view(1, 1, kh, kw))
    return out.view(n, c, h, w)


def gaussian_1d(sigma: float, radius: int, dtype: torch.dtype = torch.float64) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_filter(x: Tensor, sigma: float, truncate: float, mode: str) -> Tensor:
    """``scipy.ndimage.gaussian_filter`` over the last two axes of NCHW ``x`` (radius ``int(truncate * sigma + 0.5)``,
    padding ``mode`` of :func:`pad_index`), applied separably; sigma 0 returns ``x`` as SciPy does."""
    if sigma <= 0:
        return x
    g = gaussian_1d(sigma, int(truncate * sigma + 0.5))
    h, w = x.shape[-2:]
    mh = filter_matrix(g, h, mode).to(device=x.device, dtype=x.dtype)
    mw = filter_matrix(g, w, mode).to(device=x.device, dtype=x.dtype)
    return torch.einsum("uh,nchw,vw->ncuv", mh, x, mw)


def filter_matrix(g: Tensor, n: int, mode: str) -> Tensor:
    """The n x n matrix of correlating a length-n axis with the odd 1-D kernel ``g`` under padding ``mode``.

    Folding the padding into the matrix keeps wide kernels (radius > n, as elastic_transform's) cheap.
    """
    r = g.numel() // 2
    src = pad_index(n, r, mode, torch.device("cpu")).unfold(0, g.numel(), 1)  # n x (2r + 1) source indices
    mat = torch.zeros(n, n, dtype=g.dtype)
    rows = torch.arange(n).view(n, 1).expand_as(src)
    mat.index_put_((rows, src), g.view(1, -1).expand_as(src), accumulate=True)
    return mat



def round_8bit(x: Tensor) -> Tensor:
    """Round half up to the 256-level grid, as PIL's fixed-point 8-bit results (``quantize_8bit`` then keeps them)."""
    return torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5) / 255.0


def pil_box_weights(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
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


def pil_box_resize(x: Tensor, h_out: int, w_out: int) -> Tensor:
    """PIL ``resize((w_out, h_out), Image.BOX)`` of 8-bit images: horizontal pass, then vertical, each rounded."""
    h, w = x.shape[-2:]
    if w_out != w:
        x = round_8bit(torch.einsum("nchw,vw->nchv", x, pil_box_weights(w, w_out, x.device, x.dtype)))
    if h_out != h:
        x = round_8bit(torch.einsum("nchw,uh->ncuw", x, pil_box_weights(h, h_out, x.device, x.dtype)))
    return x


def sample_bilinear(x: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """Bilinear samples of NCHW ``x`` at per-image pixel coordinates ``ys``, ``xs`` (N x H x W), already in range."""
    h, w = x.shape[-2:]
    grid = torch.stack((xs * (2.0 / max(w - 1, 1)) - 1.0, ys * (2.0 / max(h - 1, 1)) - 1.0), dim=-1)
    return torch.nn.functional.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                                           align_corners=True)


def reflect101_coord(c: Tensor, n: int) -> Tensor:
    """Continuous coordinates mirrored about the edge samples (OpenCV BORDER_REFLECT_101: -1 -> 1)."""
    if n == 1:
        return torch.zeros_like(c)
    period = 2 * (n - 1)
    c = c.remainder(period)
    return torch.where(c > n - 1, period - c, c)


def reflect_coord(c: Tensor, n: int) -> Tensor:
    """SciPy ``map_coordinates(mode='reflect')`` for order 1: mirror about the pixel edges (-0.5, n - 0.5), the
    half pixel beyond each edge sample holding that sample."""
    u = (c + 0.5).remainder(2 * n)
    u = torch.where(u > n, 2 * n - u, u)
    return (u - 0.5).clamp(0, n - 1)


# ---------------------------------------------------------------------------------------------------------------
# Clipped zoom (zoom_blur, snow) and motion blur (motion_blur, snow).

def zoom_matrix(n: int, z: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The n x n linear map of the scripts' ``clipped_zoom`` along one axis of length n.

    ``clipped_zoom``: crop ``ch = ceil(n / z)`` samples from ``top = (n - ch) // 2``, ``scipy.ndimage.zoom(order=1)``
    to ``m = round(ch * z)`` samples (output i samples the crop at ``i * (ch - 1) / (m - 1)``, linear interpolation),
    then keep ``n`` samples from ``(m - n) // 2`` (the CIFAR / ImageNet scripts' centre trim).
    """
    ch = int(math.ceil(n / float(z)))
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


def clipped_zoom(x: Tensor, z: float) -> Tensor:
    """The scripts' ``clipped_zoom(img, z)`` of NCHW ``x``: centre crop by 1 / z, bilinear zoom by z, centre trim."""
    h, w = x.shape[-2:]
    zh = zoom_matrix(h, z, x.device, x.dtype)
    zw = zoom_matrix(w, z, x.device, x.dtype)
    return torch.einsum("uh,nchw,vw->ncuv", zh, x, zw)


def motion_blur_kernel(width: int, sigma: float) -> Tensor:
    """ImageMagick's ``GetMotionBlurKernel``: the one-sided Gaussian ``exp(-i^2 / (2 sigma^2))``, i = 0..width-1,
    normalised (float64)."""
    i = torch.arange(width, dtype=torch.float64)
    k = torch.exp(-(i * i) / (2.0 * sigma * sigma))
    return k / k.sum()


def motion_blur_offsets(width: int, angle: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image sample offsets ``(dy, dx)`` (N x width, int64) of ImageMagick's ``MotionBlurImage`` for ``angle``
    (N, degrees): ``point = width * (sin a, cos a)``, ``offset_i = ceil(i * point / hypot(point) - 0.5)``."""
    a = torch.deg2rad(angle.to(torch.float64)).view(-1, 1)
    px, py = width * torch.sin(a), width * torch.cos(a)
    hyp = torch.hypot(px, py)
    i = torch.arange(width, device=angle.device, dtype=torch.float64).view(1, -1)
    dx = torch.ceil(i * py / hyp - 0.5).to(torch.int64)
    dy = torch.ceil(i * px / hyp - 0.5).to(torch.int64)
    return dy, dx


def motion_blur_filter(x: Tensor, radius: float, sigma: float, angle: Tensor) -> Tensor:
    """ImageMagick ``MotionBlurImage(radius, sigma, angle)`` (Wand's ``motion_blur``) of NCHW ``x``, an angle per image.

    ``out(y, x) = sum_i k_i * in(y + dy_i, x + dx_i)`` over ``width = 2 ceil(radius) + 1`` taps of the one-sided
    Gaussian :func:`motion_blur_kernel` along the direction ``angle`` (:func:`motion_blur_offsets`), samples beyond
    the border taking the edge pixel (ImageMagick's default edge virtual pixels; ``imagecorruptions``' ``shift``).
    Batched as one gather of the shifted copies per tap (at most 41 taps), whatever the per-image angles.

    Matched to ImageMagick's source (MagickCore/effect.c; Wand is not run here): the width
    (``GetOptimalKernelWidth1D`` = ``2 ceil(radius) + 1`` for radius > 0), the kernel (``GetMotionBlurKernel``, the
    right half of a Gaussian starting at the pixel itself, so the blur trails to one side) and the offsets are
    ImageMagick's. Differences: ImageMagick holds the pixels as 16-bit (or HDRI float) quanta and ignores alpha
    weighting only for opaque images (the scripts' PNGs are opaque); here the sum is in ``x.dtype`` and callers
    round once to 8 bits as the PNG it writes.
    """
    n, c, h, w = x.shape
    if angle.shape != (n,):
        raise ValueError(f"motion_blur_filter needs one angle per image ({n}), got shape {tuple(angle.shape)}")
    width = 2 * int(math.ceil(radius)) + 1
    kernel = motion_blur_kernel(width, float(sigma)).tolist()
    dy, dx = motion_blur_offsets(width, angle.to(x.device))
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    flat = x.reshape(n, c, h * w)
    out = torch.zeros_like(flat)
    for i, k in enumerate(kernel):
        yi = (ys + dy[:, i].view(n, 1, 1)).clamp_(0, h - 1)
        xi = (xs + dx[:, i].view(n, 1, 1)).clamp_(0, w - 1)
        idx = (yi * w + xi).view(n, 1, h * w).expand(n, c, h * w)
        out.add_(flat.gather(2, idx), alpha=k)
    return out.view(n, c, h, w)
