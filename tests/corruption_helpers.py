"""Helpers shared by the corruption tests: test images and the conversions the oracles work in."""
from __future__ import annotations

import numpy as np
import torch


def _natural_uint8(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images (noise blurred with sigma 1.5), closer to photos than white noise for JPEG."""
    from scipy.ndimage import gaussian_filter
    x = gaussian_filter(np.random.default_rng(seed).random((n, size, size, 3)), (0, 1.5, 1.5, 0))
    return np.uint8((x - x.min()) / (x.max() - x.min()) * 255)


def _to_torch(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float() / 255.0


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    """float NCHW -> float64 NHWC."""
    return x.permute(0, 2, 3, 1).double().numpy()


def _save(x: np.ndarray) -> np.ndarray:
    """What the scripts store: ``np.uint8(clip(x, 0, 1) * 255)``, read back as float in [0, 1]."""
    return np.uint8(np.clip(x, 0, 1) * 255) / 255.0
