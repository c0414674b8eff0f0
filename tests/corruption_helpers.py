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


def assert_levels_close(got, expected, rel: float = 1e-6) -> None:
    """Severity levels equal to published constants: same nesting, numbers within ``rel``.

    ``pytest.approx`` refuses nested sequences (pytest >= 9.1), so each level is flattened and compared alone.
    """
    got, expected = list(got), list(expected)
    assert len(got) == len(expected), f"{len(got)} levels, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        g, e = np.atleast_1d(np.asarray(g, dtype=float)), np.atleast_1d(np.asarray(e, dtype=float))
        assert g.shape == e.shape, f"level {i + 1}: shape {g.shape}, expected {e.shape}"
        np.testing.assert_allclose(g, e, rtol=rel, atol=1e-12, err_msg=f"level {i + 1}")
