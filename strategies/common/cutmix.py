"""CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features",
ICCV 2019, arXiv 1905.04899) on a batch, with the draws of GDumb's code (drimpossible/GDumb@4f412d7
``src/utils.py`` ``cutmix_data`` / ``rand_bbox``, as aimagelab/mammoth ``utils/augmentations.py``).

With probability ``prob`` (applied when ``u <= prob``, u uniform): ``lam ~ Beta(alpha, alpha)``, a partner
permutation of the batch, a box of side ``int(side * sqrt(1 - lam))`` centred on a uniform pixel (clipped to the
image) pasted from the partner, and ``lam`` recomputed as the share of pixels kept. The scalar draws (u, lam, the
centre) come from a seeded NumPy generator on the host, in the reference's order; the permutation from a torch
generator on the batch's device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor


def cutmix(x: Tensor, y: Tensor, alpha: float, prob: float, rng: np.random.Generator,
           generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor, float]:
    """``(mixed x, y, partner labels, lam)``; unchanged ``(x, y, y, 1.0)`` when the draw skips the mix or
    ``alpha`` is 0. ``x`` is not modified in place."""
    if alpha <= 0 or rng.random() > prob:
        return x, y, y, 1.0
    lam = float(rng.beta(alpha, alpha))
    index = torch.randperm(x.shape[0], generator=generator, device=x.device if generator is None
                           else generator.device)
    w, h = int(x.shape[2]), int(x.shape[3])
    cut = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(w * cut), int(h * cut)
    cx, cy = int(rng.integers(w)), int(rng.integers(h))
    x1, x2 = int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + cut_w // 2, 0, w))
    y1, y2 = int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + cut_h // 2, 0, h))
    index = index.to(x.device)
    out = x.clone()
    out[:, :, x1:x2, y1:y2] = x[index, :, x1:x2, y1:y2]
    return out, y, y[index], 1.0 - (x2 - x1) * (y2 - y1) / (w * h)


__all__ = ["cutmix"]
