"""Batched, per-sample image operations in torch (colour spaces, grey level) shared by corruptions and augmentations."""
from __future__ import annotations

import torch
from torch import Tensor

_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


def grayscale(x: Tensor) -> Tensor:
    """Luma of NCHW RGB images, shape N x 1 x H x W."""
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def rgb_to_hsv(x: Tensor, eps: float = 1e-8) -> Tensor:
    """RGB in [0, 1] (N x 3 x H x W) to HSV with all channels in [0, 1], as ``colorsys``/skimage define it."""
    r, g, b = x.unbind(dim=1)
    maxc, argmax = x.max(dim=1)
    minc = x.min(dim=1).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(eps), torch.zeros_like(maxc))
    safe = delta.clamp_min(eps)
    h_r = ((g - b) / safe) % 6.0
    h_g = (b - r) / safe + 2.0
    h_b = (r - g) / safe + 4.0
    h = torch.where(argmax == 0, h_r, torch.where(argmax == 1, h_g, h_b)) / 6.0
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = x.unbind(dim=1)
    h6 = (h % 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    i = i.long() % 6
    # rows: sector 0..5; columns: which of (v, q, p, t) gives r, g, b
    choices = torch.stack((v, q, p, t), dim=1)  # N x 4 x H x W
    table = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=x.device)
    idx = table[i].permute(0, 3, 1, 2)  # N x 3 x H x W
    return torch.gather(choices, 1, idx)


def shift_hue(x: Tensor, shift: float | Tensor, eps: float = 1e-8) -> Tensor:
    """Rotate the hue of RGB images by ``shift`` (fraction of a turn), keeping HSV saturation and value.

    Same result as HSV round-tripping (torchvision's ``adjust_hue``) without building the HSV tensor: each output
    channel is ``max - delta * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6``, n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x.unbind(dim=1)
    maxc, argmax = x.max(dim=1)
    delta = maxc - x.min(dim=1).values
    safe = delta.clamp_min(eps)
    h6 = torch.where(argmax == 0, ((g - b) / safe) % 6.0, torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    if isinstance(shift, Tensor):
        shift = shift.reshape(-1, *([1] * (h6.dim() - 1)))
    h6 = h6 + 6.0 * shift
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n) % 6.0
        out.append(maxc - delta * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=1)
