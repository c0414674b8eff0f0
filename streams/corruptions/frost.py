"""Frost: the image blended with a crop of a photographed frost texture, ``c[0] * x + c[1] * crop``.

The textures are the scripts' frost1.png .. frost6.jpg, read from the installed ``imagecorruptions`` package (its
package data, located without importing it: its import needs ``pkg_resources``). They are loaded, rescaled and
stacked once per (device, image size, parameter set) and cached there; per image, the texture and the crop offsets
are drawn from ``rng`` and all crops are gathered at once.

Constants: make_cifar_c.py frost ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)) with the textures
shrunk by ``cv2.resize(fx=0.2, fy=0.2)`` (INTER_LINEAR); make_imagenet_c.py / imagecorruptions frost ((1, 0.4),
(0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)) with imagecorruptions' ``INTER_CUBIC`` resize by
``1.1 * max(1, H / tex_h, W / tex_w)`` (make_imagenet_c.py crops 224 x 224 from the unscaled textures; the
package's rule also covers other sizes). The third element of a level is the texture scale: 0.2, or None for the
fitted rule. Both scripts draw the texture with ``np.random.randint(5)``, so frost6.jpg is never used: kept so.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ctta.errors import DataNotFoundError

from .core import register_corruption
from .rng import ImageRng

TEXTURE_FILES: Tuple[str, ...] = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
USED_TEXTURES = 5  # the scripts' np.random.randint(5): frost1 .. frost5
_FIT_MARGIN = 1.1  # imagecorruptions: scaling_factor *= 1.1


def texture_dir() -> Path:
    """The ``frost/`` folder of the installed imagecorruptions package; DataNotFoundError when it is absent."""
    try:
        spec = importlib.util.find_spec("imagecorruptions")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("frost needs the frost textures of the imagecorruptions package, which is not "
                                "installed: pip install imagecorruptions")
    folder = Path(list(spec.submodule_search_locations)[0]) / "frost"
    missing = [f for f in TEXTURE_FILES[:USED_TEXTURES] if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(f"frost textures {', '.join(missing)} missing from {folder}: reinstall the package "
                                f"(pip install --force-reinstall imagecorruptions)")
    return folder


@functools.lru_cache(maxsize=None)
def _raw_textures() -> Tuple[np.ndarray, ...]:
    """The used textures as uint8 RGB HWC arrays (PIL decodes them exactly as the scripts' cv2.imread + BGR->RGB)."""
    from PIL import Image
    folder = texture_dir()
    out = []
    for name in TEXTURE_FILES[:USED_TEXTURES]:
        with Image.open(folder / name) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
    return tuple(out)


def _resize_linear_cv2(t: Tensor, out_h: int, out_w: int, inv_h: float, inv_w: float) -> Tensor:
    """``cv2.resize(INTER_LINEAR)`` of a CHW float image: source ``(d + 0.5) * inv - 0.5``, clamped to the edges."""
    def axis(n_in: int, n_out: int, inv: float) -> Tuple[Tensor, Tensor, Tensor]:
        s = (torch.arange(n_out, dtype=torch.float64) + 0.5) * inv - 0.5
        i0 = torch.floor(s)
        f = s - i0
        f = torch.where(i0 < 0, torch.zeros_like(f), f)
        i0 = i0.clamp(0, n_in - 1)
        f = torch.where(i0 >= n_in - 1, torch.zeros_like(f), f)
        i0 = i0.long()
        return i0, (i0 + 1).clamp_max(n_in - 1), f

    y0, y1, fy = axis(t.shape[-2], out_h, inv_h)
    x0, x1, fx = axis(t.shape[-1], out_w, inv_w)
    t = t.double()
    rows = t[:, y0] * (1 - fy)[:, None] + t[:, y1] * fy[:, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def _scaled_texture(raw: np.ndarray, h: int, w: int, scale: Optional[float]) -> Tensor:
    """One texture resized as the parameter set's script does, as a uint8 CHW tensor at least (h + 1) x (w + 1)."""
    th, tw = raw.shape[:2]
    t = torch.from_numpy(raw).permute(2, 0, 1).double()
    if scale is not None and round(th * scale) > h and round(tw * scale) > w:
        # make_cifar_c.py: cv2.resize(frost, (0, 0), fx=scale, fy=scale): size rounded, coordinates at 1 / scale
        out = _resize_linear_cv2(t, int(round(th * scale)), int(round(tw * scale)), 1 / scale, 1 / scale)
    else:
        # imagecorruptions (and images larger than the CIFAR-scaled textures): fit, times 1.1, INTER_CUBIC
        factor = max(1.0, h / th, w / tw) * _FIT_MARGIN
        size = (int(math.ceil(th * factor)), int(math.ceil(tw * factor)))
        out = torch.nn.functional.interpolate(t[None], size=size, mode="bicubic", align_corners=False)[0]
    return torch.floor(out + 0.5).clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=16)
def textures(device: torch.device, h: int, w: int, scale: Optional[float]) -> Tuple[Tensor, Tensor]:
    """The used textures rescaled for h x w images, stacked (K x 3 x Hmax x Wmax uint8, zero-padded) on ``device``,
    and their sizes (K x 2 int64): loaded once per (device, size, parameter set)."""
    scaled: List[Tensor] = [_scaled_texture(raw, h, w, scale) for raw in _raw_textures()]
    hmax, wmax = max(t.shape[1] for t in scaled), max(t.shape[2] for t in scaled)
    stack = torch.zeros(len(scaled), 3, hmax, wmax, dtype=torch.uint8)
    for k, t in enumerate(scaled):
        stack[k, :, :t.shape[1], :t.shape[2]] = t
    sizes = torch.tensor([t.shape[1:] for t in scaled], dtype=torch.int64)
    return stack.to(device), sizes.to(device)


def frost_blend(x: Tensor, c: Tuple[float, float, Optional[float]], index: Tensor, top: Tensor, left: Tensor) -> Tensor:
    """The deterministic part of frost: ``c[0] * x + c[1] * texture[index][top:top + H, left:left + W] / 255``.

    ``index``, ``top``, ``left``: one integer per image (texture number 0..4 and crop offsets in the rescaled texture).
    """
    n, _, h, w = x.shape
    stack, _ = textures(x.device, h, w, c[2])
    rows = top.view(n, 1, 1, 1) + torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = left.view(n, 1, 1, 1) + torch.arange(w, device=x.device).view(1, 1, 1, w)
    chans = torch.arange(3, device=x.device).view(1, 3, 1, 1)
    crops = stack[index.view(n, 1, 1, 1), chans, rows, cols].to(x.dtype) / 255.0
    return c[0] * x + c[1] * crops


def _randint_below(rng: ImageRng, high: Tensor) -> Tensor:
    """Per-image integers uniform in ``[0, high)`` for per-image bounds ``high`` (N,): ``floor(U * high)`` with
    ``rng``'s 24-bit uniforms (bias below 2^-24 * high)."""
    return torch.floor(rng.rand(1, dtype=torch.float64)[:, 0] * high.to(torch.float64)).to(torch.int64)


@register_corruption("frost", cifar10=((1, 0.2, 0.2), (1, 0.3, 0.2), (0.9, 0.4, 0.2), (0.85, 0.4, 0.2),
                                       (0.75, 0.45, 0.2)),
                     imagenet=((1, 0.4, None), (0.8, 0.6, None), (0.7, 0.7, None), (0.65, 0.7, None),
                               (0.6, 0.75, None)))
def frost(x: Tensor, c: Tuple[float, float, Optional[float]], rng: ImageRng) -> Tensor:
    """Frost: ``c[0] * x + c[1] * crop`` of one of the scripts' frost textures (texture and offset drawn per image).

    As the scripts: texture ``randint(5)``, then ``x_start = randint(0, tex_h - H)``, ``y_start = randint(0, tex_w
    - W)`` in the rescaled texture (c[2]: the CIFAR script's scale 0.2, or None for imagecorruptions' fitted scale).
    """
    _, _, h, w = x.shape
    _, sizes = textures(x.device, h, w, c[2])
    index = rng.randint(0, USED_TEXTURES, 1)[:, 0]
    tex_size = sizes[index]
    top = _randint_below(rng, tex_size[:, 0] - h)
    left = _randint_below(rng, tex_size[:, 1] - w)
    return frost_blend(x, c, index, top, left)
