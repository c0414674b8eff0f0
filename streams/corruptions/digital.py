"""Digital corruptions: contrast, elastic transform, pixelate, JPEG and (extra) saturate. Constants:
make_cifar_c.py / make_imagenet_c.py (= imagecorruptions), cited per function."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ctta.imageops import hsv_to_rgb, rgb_to_hsv

from .core import register_corruption
from .filters import gaussian_filter, pil_box_resize, reflect101_coord, reflect_coord, round_8bit, sample_bilinear
from .rng import ImageRng


@register_corruption("contrast", cifar10=(0.75, 0.5, 0.4, 0.3, 0.15), imagenet=(0.4, 0.3, 0.2, 0.1, 0.05))
def contrast(x: Tensor, c: float, rng: ImageRng) -> Tensor:
    """Scale deviations from the per-image, per-channel mean by c (both scripts: mean over axes (0, 1) of HWC)."""
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


# ---------------------------------------------------------------------------------------------------------------
# Digital (PIL-based in the scripts). Constants: make_cifar_c.py / make_imagenet_c.py (= imagecorruptions)
# pixelate, jpeg_compression; saturate is an extra corruption of the original release.

@register_corruption("pixelate", cifar10=(0.95, 0.9, 0.85, 0.75, 0.65), imagenet=(0.6, 0.5, 0.4, 0.3, 0.25))
def pixelate(x: Tensor, c: float, rng: ImageRng) -> Tensor:
    """Downsample to ``int(size * c)`` with PIL BOX, then back to full size with BOX (= nearest when enlarging).

    The scripts resize the 8-bit PIL image, so the input is first rounded to 8 bits, as PIL would hold it.
    """
    h, w = x.shape[-2:]
    small = pil_box_resize(round_8bit(x), int(h * c), int(w * c))
    return pil_box_resize(small, h, w)


@register_corruption("jpeg_compression", cifar10=(80, 65, 58, 50, 40), imagenet=(25, 18, 15, 10, 7))
def jpeg_compression(x: Tensor, c: int, rng: ImageRng) -> Tensor:
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
def saturate(x: Tensor, c: Tuple[float, float], rng: ImageRng) -> Tensor:
    """Scale and shift the HSV saturation: ``clip(s * c[0] + c[1], 0, 1)`` (extra corruption of the release)."""
    hsv = rgb_to_hsv(x)
    s = (hsv[:, 1:2] * c[0] + c[1]).clamp_(0.0, 1.0)
    return hsv_to_rgb(torch.cat((hsv[:, :1], s, hsv[:, 2:]), dim=1))



# ---------------------------------------------------------------------------------------------------------------
# Elastic transform. Constants (alpha, sigma, affine jitter), in pixels: make_cifar_c.py elastic_transform with
# IMSIZE = 32: (0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05), (.1, .03, .03) times 32;
# make_imagenet_c.py elastic_transform: (2, .7, .1), (2, .08, .2), (.05, .01, .02), (.07, .01, .02), (.12, .01, .02)
# times 244 (sic, "should have been 224"). ``imagecorruptions`` replaced this with an affine-free variant
# (alpha 250 * (.05 .. .12), sigma 0.01 * size); the ImageNet-C script's version is generated here.

@register_corruption("elastic_transform",
                     cifar10=((32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07),
                              (32 * 0.08, 32 * 0.06, 32 * 0.06), (32 * 0.1, 32 * 0.04, 32 * 0.05),
                              (32 * 0.1, 32 * 0.03, 32 * 0.03)),
                     imagenet=((244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                               (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                               (244 * 0.12, 244 * 0.01, 244 * 0.02)))
def elastic_transform(x: Tensor, c: Tuple[float, float, float], rng: ImageRng) -> Tensor:
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
    pts2 = pts1 + (rng.rand(3, 2, dtype=f64) * 2 - 1) * jitter
    # getAffineTransform: [p1 1] @ M^T = p2 (points are (x, y) to OpenCV); warpAffine samples src at M^-1 (dst).
    src_h = torch.cat((pts1, torch.ones(3, 1, dtype=f64, device=dev)), dim=1).expand(n, 3, 3)
    mt = torch.linalg.solve(src_h, pts2)  # N x 3 x 2: rows A^T, last row b
    a, b = mt[:, :2, :].transpose(1, 2), mt[:, 2, :]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=f64, device=dev), torch.arange(w, dtype=f64, device=dev),
                            indexing="ij")
    dst = torch.stack((xx, yy), dim=-1).view(1, h * w, 2) - b[:, None, :]
    src = torch.linalg.solve(a, dst.transpose(1, 2)).transpose(1, 2).reshape(n, h, w, 2)
    warped = sample_bilinear(x, reflect101_coord(src[..., 1], h), reflect101_coord(src[..., 0], w))

    shape = (n, 1, h, w)
    dx = gaussian_filter(rng.rand(*shape[1:], dtype=f64) * 2 - 1, sigma, 3.0, "reflect")
    dy = gaussian_filter(rng.rand(*shape[1:], dtype=f64) * 2 - 1, sigma, 3.0, "reflect")
    ys = reflect_coord(yy + alpha * dy[:, 0], h)
    xs = reflect_coord(xx + alpha * dx[:, 0], w)
    return sample_bilinear(warped, ys, xs)


# The remaining names are known (their -C files load) but not generated yet: a later change registers each with
