"""CoTTA's test-time augmentations, batched: many random views of a batch generated in one pass on the device.

Follows ``get_tta_transforms`` of the official CoTTA code (qinenergy/cotta, ``cifar/cotta.py``): colour jitter
(brightness, contrast, saturation, hue, gamma, in a random order), edge padding + random affine (bilinear),
Gaussian blur (kernel 5), centre crop, horizontal flip, additive Gaussian noise, clipping. As there, one draw of
the random parameters is shared by all images of a view (torchvision applies one draw to a whole batch tensor);
here every view gets its own draw and all views are produced by vectorised tensor ops instead of a Python loop.

``draw_order="torchvision"`` draws each view's numbers one at a time with the torch calls the reference benchmark's
torchvision pipeline (``augmentations/transforms_cotta.py`` ``get_tta_transforms``) makes on torch's global generator,
in its order (randperm of the 5 colour ops, their factors in that order, angle, dx, dy, scale, blur sigma, flip,
then the pixel noise on the host), but from this object's seeded generator: a reference run that draws nothing else,
seeded alike, gets the same numbers (RoTTA's strong view).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ctta.imageops import grayscale, shift_hue
from ctta.seeding import same_device

Range = Tuple[float, float]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation parameters; the defaults are CoTTA's CIFAR ones (``soft=False``)."""

    brightness: Range = (0.6, 1.4)
    contrast: Range = (0.7, 1.3)
    saturation: Range = (0.5, 1.5)
    hue: Range = (-0.06, 0.06)
    gamma: Range = (0.7, 1.3)
    degrees: Range = (-15.0, 15.0)
    translate: float = 1.0 / 16.0  # fraction of the edge-padded (2x) image, as torchvision's RandomAffine sees it
    scale: Range = (0.9, 1.1)
    blur_sigma: Range = (0.001, 0.5)
    blur_kernel: int = 5
    hflip_p: float = 0.5
    noise_std: float = 0.005
    #: the border the affine sees: "edge" (CoTTA's edge padding) or "reflect" (ROID's ``padding_mode="reflect"``,
    #: half the image on each side, zeros beyond it as torchvision's ``fill=0``)
    padding: str = "edge"
    blur: bool = True  #: False: no Gaussian blur (ROID's ``cotta_augs=False``, which also has no noise: noise_std 0)

    @classmethod
    def soft(cls) -> "AugmentConfig":
        """CoTTA's ``soft=True`` ranges (used for ImageNet-C)."""
        return cls(
            brightness=(0.8, 1.2), contrast=(0.85, 1.15), saturation=(0.75, 1.25), hue=(-0.03, 0.03),
            gamma=(0.85, 1.15), degrees=(-8.0, 8.0), scale=(0.95, 1.05), blur_sigma=(0.001, 0.25),
        )


def _uniform(n: int, r: Range, g: Optional[torch.Generator], device: torch.device) -> Tensor:
    return torch.rand(n, device=device, generator=g) * (r[1] - r[0]) + r[0]


@dataclass
class ViewParams:
    """Random parameters of a set of views: colour factors and order per view, and 7 uniforms for the geometry."""

    colour: List[List[float]]
    orders: List[List[int]]
    geometry: Tensor
    #: views x 5 drawn values (angle in degrees, scale, dx, dy in pixels, blur sigma) used instead of the uniforms of
    #: ``geometry`` columns 0-4 (torchvision draw order); None: taken from the uniforms
    values: Optional[Tensor] = None
    #: per view, standard normal noise of the batch's shape drawn on the host (torchvision draw order); None: drawn
    #: on the images' device at ``apply``
    noise: Optional[List[Tensor]] = None


class TTAAugment:
    """Callable producing ``views`` augmented copies of a batch, stacked view-major: (views * N) x C x H x W.

    The per-view parameters are drawn on the host from a seeded CPU generator (a few numbers per view, so no
    device synchronisation); per-pixel noise is drawn on the images' device from a generator seeded alike.
    """

    def __init__(self, config: AugmentConfig = AugmentConfig(), seed: int = 0, draw_order: str = "views") -> None:
        if draw_order not in ("views", "torchvision"):
            raise ValueError(f"draw_order must be 'views' or 'torchvision', not {draw_order!r}")
        self.cfg = config
        self.seed = seed
        self.draw_order = draw_order
        self.host_gen = torch.Generator().manual_seed(seed)
        self._dev_gen: Optional[torch.Generator] = None

    def _device_generator(self, device: torch.device) -> torch.Generator:
        if self._dev_gen is None or not same_device(self._dev_gen.device, device):
            self._dev_gen = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self._dev_gen

    def get_state(self) -> dict:
        """Generator states, so a resumed run draws the same augmentations."""
        return {"host": self.host_gen.get_state(),
                "device": self._dev_gen.get_state() if self._dev_gen is not None else None,
                "device_type": str(self._dev_gen.device) if self._dev_gen is not None else None}

    def set_state(self, state: dict) -> None:
        self.host_gen.set_state(state["host"])
        if state.get("device") is not None:
            self._device_generator(torch.device(state["device_type"])).set_state(state["device"])
        else:  # the saved state predates the device generator: start it afresh, as it was then
            self._dev_gen = None

    def sample(self, views: int, shape: Optional[Tuple[int, ...]] = None) -> "ViewParams":
        """Draw the random parameters of ``views`` views (host side, a few numbers per view); ``shape``, the batch's,
        is needed by ``draw_order="torchvision"``, which draws the noise with the parameters."""
        if self.draw_order == "torchvision":
            return self._sample_torchvision_order(views, shape)
        cfg, hg = self.cfg, self.host_gen
        ranges = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.gamma)
        colour = torch.stack([_uniform(views, r, hg, torch.device("cpu")) for r in ranges], dim=1).tolist()
        orders = torch.rand(views, 5, generator=hg).argsort(dim=1).tolist()
        return ViewParams(colour, orders, torch.rand(views, 7, generator=hg))

    def _sample_torchvision_order(self, views: int, shape: Optional[Tuple[int, ...]]) -> "ViewParams":
        """Each view's numbers drawn as torchvision's transforms draw them (``torch.randperm``, ``uniform_`` on a
        one-element tensor, ``torch.rand(1)``, ``torch.randn(shape)``), in the pipeline's order."""
        cfg, hg = self.cfg, self.host_gen
        if cfg.noise_std > 0 and shape is None:
            raise ValueError("draw_order='torchvision' draws the noise with the parameters: pass the batch's shape")
        draw = lambda lo, hi: torch.empty(1).uniform_(float(lo), float(hi), generator=hg).item()  # noqa: E731
        ranges = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.gamma)
        colour, orders, noise = [], [], []
        geometry, values = torch.zeros(views, 7), torch.zeros(views, 5, dtype=torch.float64)
        for v in range(views):
            orders.append(torch.randperm(5, generator=hg).tolist())  # ColorJitterPro
            factors = [0.0] * 5
            for op in orders[-1]:
                factors[op] = draw(*ranges[op])
            colour.append(factors)
            angle = draw(*cfg.degrees)  # RandomAffine.get_params on the edge-padded (2x) image
            h, w = (shape[-2], shape[-1]) if shape is not None else (0, 0)
            max_dx, max_dy = cfg.translate * 2 * w, cfg.translate * 2 * h
            dx, dy = round(draw(-max_dx, max_dx)), round(draw(-max_dy, max_dy))
            scale = draw(*cfg.scale)
            sigma = draw(*cfg.blur_sigma) if cfg.blur else 0.0  # GaussianBlur.get_params
            values[v] = torch.tensor([angle, scale, dx, dy, sigma], dtype=torch.float64)
            geometry[v, 6] = torch.rand(1, generator=hg)  # RandomHorizontalFlip
            if cfg.noise_std > 0:
                noise.append(torch.randn(tuple(shape), generator=hg))  # GaussianNoise
        return ViewParams(colour, orders, geometry, values, noise if cfg.noise_std > 0 else None)

    def __call__(self, x: Tensor, views: int) -> Tensor:
        return self.apply(x, self.sample(views, tuple(x.shape)), 0, views)

    def apply(self, x: Tensor, params: "ViewParams", start: int, stop: int) -> Tensor:
        """Views ``start``..``stop`` of ``params`` applied to x: the same output whatever the chunking of views."""
        n = x.shape[0]
        views = stop - start
        xv = x.clamp(0.0, 1.0).repeat(views, 1, 1, 1)
        # colour jitter: each view applies the five operations once, in its own random order (as ColorJitterPro)
        for j, v in enumerate(range(start, stop)):
            part = xv[j * n:(j + 1) * n]
            for op in params.orders[v]:
                part = self._colour(op, part, params.colour[v][op])
            xv[j * n:(j + 1) * n] = part
        geo = params.geometry[start:stop].to(x.device, non_blocking=True)
        values = params.values[start:stop].to(device=x.device, dtype=x.dtype) if params.values is not None else None
        xv = self._affine_blur(xv, views, n, geo, values)
        flip = (geo[:, 6] < self.cfg.hflip_p).repeat_interleave(n).view(-1, 1, 1, 1)
        xv = torch.where(flip, xv.flip(-1), xv)
        if self.cfg.noise_std > 0:
            if params.noise is not None:  # drawn on the host with the parameters (torchvision draw order)
                noise = torch.cat(params.noise[start:stop]).to(device=x.device, dtype=xv.dtype)
            else:
                g = self._device_generator(x.device)
                noise = torch.cat([torch.randn(x.shape, device=x.device, generator=g, dtype=xv.dtype)
                                   for _ in range(views)])
            xv = xv + noise * self.cfg.noise_std
        return xv.clamp(0.0, 1.0)

    @staticmethod
    def _colour(op: int, x: Tensor, f: float) -> Tensor:
        """One of torchvision's adjust_brightness/contrast/saturation/hue/gamma, on a batch with one factor."""
        if op == 0:
            return (x * f).clamp(0.0, 1.0)
        if op == 1:  # contrast: blend with the mean grey level of each image
            return (f * x + (1.0 - f) * grayscale(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0.0, 1.0)
        if op == 2:  # saturation: blend with the grey image
            return (f * x + (1.0 - f) * grayscale(x)).clamp(0.0, 1.0)
        if op == 3:  # hue: rotate H in HSV space
            return shift_hue(x, f)
        return x.clamp(1e-8, 1.0).pow(f).clamp(0.0, 1.0)  # gamma

    def _affine_blur(self, x: Tensor, views: int, n: int, u: Tensor, values: Optional[Tensor] = None) -> Tensor:
        """Random rotation/translation/scale about the centre (edge-replicated border), then a Gaussian blur.

        ``u`` holds uniform draws per view (angle, scale, dx, dy, blur sigma in columns 0-4), or ``values`` the drawn
        values themselves (angle in degrees, scale, dx, dy in pixels, sigma). The affine output is
        sampled with a margin of ``kernel // 2`` pixels so the 'valid' blur sees the same neighbours it would see
        on CoTTA's edge-padded image before the centre crop.
        """
        cfg = self.cfg
        m, c, h, w = x.shape
        dev, dt = x.device, x.dtype
        k = cfg.blur_kernel
        r = k // 2 if cfg.blur else 0
        lerp = lambda col, rg: u[:, col] * (rg[1] - rg[0]) + rg[0]  # noqa: E731
        if values is None:
            angle = lerp(0, cfg.degrees) * (math.pi / 180.0)
            scale = lerp(1, cfg.scale)
            max_dx, max_dy = cfg.translate * 2 * w, cfg.translate * 2 * h
            tx = torch.round(lerp(2, (-max_dx, max_dx)))
            ty = torch.round(lerp(3, (-max_dy, max_dy)))
        else:
            angle, scale, tx, ty = values[:, 0] * (math.pi / 180.0), values[:, 1], values[:, 2], values[:, 3]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # output pixel offsets from the centre, with the blur margin
        oy = torch.arange(-r, h + r, device=dev, dtype=dt) - (h - 1) / 2
        ox = torch.arange(-r, w + r, device=dev, dtype=dt) - (w - 1) / 2
        gy, gx = torch.meshgrid(oy, ox, indexing="ij")
        dx = gx.unsqueeze(0) - tx.view(-1, 1, 1)
        dy = gy.unsqueeze(0) - ty.view(-1, 1, 1)
        # inverse map: rotate by -angle and divide by scale, then to grid_sample's [-1, 1] (align_corners=False)
        ix = cos.view(-1, 1, 1) * dx + sin.view(-1, 1, 1) * dy + (w - 1) / 2
        iy = -sin.view(-1, 1, 1) * dx + cos.view(-1, 1, 1) * dy + (h - 1) / 2
        sh, sw, border = h, w, "border"  # the sampled image's size and border
        if cfg.padding == "reflect":  # sample the reflect-padded image, zeros outside it
            ph, pw = h // 2, w // 2
            x = F.pad(x, (pw, pw, ph, ph), mode="reflect")
            ix, iy, sh, sw, border = ix + pw, iy + ph, h + 2 * ph, w + 2 * pw, "zeros"
        elif cfg.padding != "edge":
            raise ValueError(f"padding must be 'edge' or 'reflect', not {cfg.padding!r}")
        grid = torch.stack(((2 * ix + 1) / sw - 1, (2 * iy + 1) / sh - 1), dim=-1).repeat_interleave(n, dim=0)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode=border, align_corners=False)
        if not cfg.blur:
            return out

        sigma = (lerp(4, cfg.blur_sigma) if values is None else values[:, 4]).repeat_interleave(n)
        t = torch.arange(k, device=dev, dtype=dt) - r
        kern = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
        kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*c) x k
        flat = out.reshape(1, m * c, h + 2 * r, w + 2 * r)
        flat = F.conv2d(flat, kern.view(m * c, 1, k, 1), groups=m * c)
        flat = F.conv2d(flat, kern.view(m * c, 1, 1, k), groups=m * c)
        return flat.reshape(m, c, h, w)
