"""motion_blur and snow against NumPy oracles of the published scripts and against the ``imagecorruptions`` package.

The scripts run ImageMagick's ``MotionBlurImage`` through Wand (not installed here); the oracle below is that
filter written from its definition (one-sided Gaussian ``exp(-i^2 / 2 sigma^2)`` over ``2 radius + 1`` taps at
offsets ``ceil(i (cos a, sin a) - 0.5)``, edge pixels beyond the border, 8-bit rounded output), which is also what
``imagecorruptions._motion_blur`` computes. A stub ``rng`` feeds the registered functions the oracle's own draws,
so whole pipelines compare deterministically; the real draws are compared by the statistics of the change.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from ctta.streams.corruptions import CORRUPTIONS, corrupt, quantize_8bit
from ctta.streams.corruptions.filters import clipped_zoom, motion_blur_filter
from corruption_helpers import _natural_uint8, _save, _to_numpy, _to_torch

MOTION = {"cifar10": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
          "imagenet": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)]}
SNOW = {"cifar10": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        "imagenet": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
                     (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
                     (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)]}




class _FixedRng:
    """Stands in for ImageRng: returns given normals and angles, so the oracle can use the same draws."""

    def __init__(self, angles: np.ndarray, normals: np.ndarray | None = None) -> None:
        self.angles, self.normals = angles, normals
        self.n, self.device = len(angles), torch.device("cpu")

    def randn(self, *shape, dtype=torch.float32):
        assert self.normals is not None and self.normals.shape[1:] == shape
        return torch.from_numpy(self.normals).to(dtype)

    def uniform(self, lo, hi, *shape, dtype=torch.float32):
        assert not shape and np.all((lo <= self.angles) & (self.angles <= hi))
        return torch.from_numpy(self.angles).to(dtype)


# ---- oracles (per image HWC float64, from the scripts / ImageMagick's definition) --------------------------------

def _motion_oracle(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick ``MotionBlurImage`` on an H x W (x C) float image, edge virtual pixels, no 8-bit rounding."""
    width = 2 * int(np.ceil(radius)) + 1
    i = np.arange(width)
    k = np.exp(-i.astype(np.float64) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    a = np.deg2rad(angle)
    px, py = width * np.sin(a), width * np.cos(a)
    hyp = np.hypot(px, py)
    h, w = img.shape[:2]
    out = np.zeros(img.shape, dtype=np.float64)
    for j in range(width):
        ox = int(np.ceil(j * py / hyp - 0.5))
        oy = int(np.ceil(j * px / hyp - 0.5))
        rows = np.clip(np.arange(h) + oy, 0, h - 1)
        cols = np.clip(np.arange(w) + ox, 0, w - 1)
        out += k[j] * img[rows][:, cols]
    return out


def _wand_motion(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """The scripts' Wand round trip: the 8-bit image blurred, written back as 8 bits (rounded)."""
    return np.round(_motion_oracle(img, radius, sigma, angle) * 255) / 255


def _clipped_zoom_oracle(img: np.ndarray, z: float) -> np.ndarray:
    """The scripts' clipped_zoom (make_cifar_c.py / make_imagenet_c.py, with the centre trim) on H x W x 1."""
    from scipy.ndimage import zoom
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    out = zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
    trim = (out.shape[0] - h) // 2
    return out[trim:trim + h, trim:trim + h]


def _snow_oracle(img8: np.ndarray, c, normal: np.ndarray, angle: float) -> np.ndarray:
    """The scripts' snow for one uint8 image given its normal draw (H x W, standard) and blur angle; stored uint8."""
    x = img8.astype(np.float32) / 255.0
    layer = c[0] + c[1] * normal
    layer = _clipped_zoom_oracle(layer[..., None], c[2])
    layer[layer < c[3]] = 0
    layer = (np.clip(layer.squeeze(-1), 0, 1) * 255).astype(np.uint8) / 255.0  # PIL 'L' image for Wand
    layer = _wand_motion(layer, c[4], c[5], angle)[..., None]
    gray = (x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114)[..., None]  # cv2 RGB2GRAY
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return _save(x + layer + np.rot90(layer, k=2))


def _change_stats(out: np.ndarray, x: np.ndarray):
    d = out - x
    return d.mean(), d.std(), np.abs(d).mean()


def _assert_stats_close(out: np.ndarray, ref: np.ndarray, x: np.ndarray, rel: float = 0.1):
    got, want = _change_stats(out, x), _change_stats(ref, x)
    assert abs(got[0] - want[0]) <= rel * max(abs(want[0]), want[1]), (got, want)  # a mean near 0: vs the spread
    assert abs(got[1] - want[1]) <= rel * want[1], (got, want)
    assert abs(got[2] - want[2]) <= rel * want[2], (got, want)


# ---- constants ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
def test_levels_are_the_published_constants(params):
    assert [tuple(v) for v in CORRUPTIONS.get("motion_blur").levels[params]] == MOTION[params]
    assert [tuple(v) for v in CORRUPTIONS.get("snow").levels[params]] == SNOW[params]


# ---- motion blur: the filter exactly, then the corruption ---------------------------------------------------------

@pytest.mark.parametrize("params, size", [("cifar10", 32), ("imagenet", 224)])
def test_motion_blur_filter_matches_imagecorruptions_motion_blur(ic, params, size):
    """``imagecorruptions._motion_blur(x, radius, sigma, angle)`` at fixed angles: the same filter (float32)."""
    x8 = _natural_uint8(2, size, seed=1)
    angles = [-45.0, -30.5, -7.2, 0.0, 12.9, 45.0, -90.0, -118.3]
    levels = MOTION[params] if size == 32 else [MOTION[params][4]]  # the widest kernel (41 taps) on ImageNet
    pairs = [angles[i:i + 2] for i in range(0, 8, 2)] if size == 32 else [(-45.0, 45.0), (-90.0, -7.2)]
    for radius, sigma in levels:
        for pair in pairs:
            ours = motion_blur_filter(_to_torch(x8), radius, sigma, torch.tensor(pair, dtype=torch.float64))
            ref = np.stack([ic._motion_blur(img, radius=radius, sigma=sigma, angle=a) for img, a in zip(x8, pair)])
            diff = np.abs(_to_numpy(ours) * 255 - ref)
            assert diff.max() < 1e-3, (radius, sigma, pair, diff.max())


def test_motion_blur_filter_keeps_constants_and_blurs_along_the_angle():
    x = torch.full((1, 3, 9, 11), 0.4)
    assert torch.allclose(motion_blur_filter(x, 20, 15, torch.tensor([30.0])), x, atol=1e-6)  # kernel > image
    dot = torch.zeros(2, 1, 21, 21)
    dot[:, :, 10, 10] = 1.0
    out = motion_blur_filter(dot, 6, 2, torch.tensor([0.0, 90.0]))
    # angle 0 samples to the right (x + i): the dot spreads to the left of itself; angle 90 upwards (y + i)
    assert bool((out[0, 0, 10, :11] > 0).all()) and out[0, 0, 10, 11:].sum() == 0  # 13 taps reach the left edge
    assert float(out[0, 0, :10].abs().sum() + out[0, 0, 11:].abs().sum()) == 0.0  # only along the row
    assert out[0, 0, 10].sum() == pytest.approx(1.0) and out[0, 0, 10, 10] == out[0, 0].max()
    assert torch.allclose(out[1, 0], out[0, 0].T)


@pytest.mark.parametrize("params, n, size", [("cifar10", 6, 32), ("imagenet", 2, 224)])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_motion_blur_matches_the_oracle_for_given_angles(params, severity, n, size):
    """The registered function with the oracle's angles: the scripts' Wand result (8-bit rounded), stored as uint8."""
    x8 = _natural_uint8(n, size, seed=severity)
    angles = np.random.default_rng(severity).uniform(-45, 45, n)
    c = MOTION[params][severity - 1]
    fn = CORRUPTIONS.get("motion_blur").fn
    out = _to_numpy(quantize_8bit(fn(_to_torch(x8), c, _FixedRng(angles)).clamp(0, 1)))
    ref = np.stack([_save(_wand_motion(img / 255.0, *c, a)) for img, a in zip(x8, angles)])
    diff = np.abs(out - ref)
    assert diff.mean() <= 0.01 / 255 and diff.max() <= 1 / 255 + 1e-6  # only float32 rounding ties differ


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_motion_blur_statistics_match_the_cifar_oracle(severity):
    x8 = _natural_uint8(64, 32, seed=severity)
    c = MOTION["cifar10"][severity - 1]
    angles = np.random.default_rng(severity).uniform(-45, 45, len(x8))
    ref = np.stack([_save(_wand_motion(img / 255.0, *c, a)) for img, a in zip(x8, angles)])
    out = _to_numpy(corrupt(_to_torch(x8), "motion_blur", severity, seed=severity))
    _assert_stats_close(out, ref, x8 / 255.0)


@pytest.mark.parametrize("severity", [1, 5])
def test_motion_blur_statistics_match_imagecorruptions(ic, severity):
    x8 = _natural_uint8(6, 224, seed=severity)
    state = np.random.get_state()
    try:
        np.random.seed(severity)
        ref = np.stack([np.uint8(ic.motion_blur(img, severity)) for img in x8]) / 255.0
    finally:
        np.random.set_state(state)
    out = _to_numpy(corrupt(_to_torch(x8), "motion_blur", severity, seed=severity, params="imagenet"))
    _assert_stats_close(out, ref, x8 / 255.0)


# ---- snow ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("z", [1, 1.25, 1.75, 2.25, 2.5, 3, 4, 4.5])
@pytest.mark.parametrize("size", [32, 224])
def test_clipped_zoom_matches_the_scripts(z, size):
    layer = np.random.default_rng(0).normal(size=(size, size))
    ours = clipped_zoom(torch.from_numpy(layer)[None, None], z)[0, 0].numpy()
    assert np.abs(ours - _clipped_zoom_oracle(layer[..., None], z)[..., 0]).max() < 1e-9


@pytest.mark.parametrize("params, n, size", [("cifar10", 6, 32), ("imagenet", 2, 224)])
@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_snow_matches_the_oracle_for_given_draws(params, severity, n, size):
    x8 = _natural_uint8(n, size, seed=severity)
    rng = np.random.default_rng(severity)
    normals = rng.normal(size=(n, size, size))
    angles = rng.uniform(-135, -45, n)
    c = SNOW[params][severity - 1]
    fn = CORRUPTIONS.get("snow").fn
    out = _to_numpy(quantize_8bit(fn(_to_torch(x8), c, _FixedRng(angles, normals)).clamp(0, 1)))
    ref = np.stack([_snow_oracle(img, c, z, a) for img, z, a in zip(x8, normals, angles)])
    diff = np.abs(out - ref)
    # the two 8-bit conversions of the layer can land on the other side in float32 (rare ties)
    assert diff.mean() <= 0.05 / 255 and np.mean(diff > 1.5 / 255) < 1e-3, (diff.mean() * 255, diff.max() * 255)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_snow_matches_imagecorruptions_for_given_draws(ic, severity, monkeypatch):
    """``imagecorruptions.snow`` fed the same normal draw and angle: within 2/255 in the mean (it keeps the layer in
    float before the blur, blurs the untrimmed zoom and truncates rather than rounds the result)."""
    x8 = _natural_uint8(2, 224, seed=severity)
    rng = np.random.default_rng(severity)
    normals = rng.normal(size=(2, 224, 224))
    angles = rng.uniform(-135, -45, 2)
    refs = []
    for img, z, a in zip(x8, normals, angles):
        monkeypatch.setattr(np.random, "normal", lambda size, loc, scale, z=z: loc + scale * z.reshape(size))
        monkeypatch.setattr(np.random, "uniform", lambda lo, hi, a=a: a)
        refs.append(np.uint8(ic.snow(img, severity)) / 255.0)
    monkeypatch.undo()
    fn = CORRUPTIONS.get("snow").fn
    c = SNOW["imagenet"][severity - 1]
    out = _to_numpy(quantize_8bit(fn(_to_torch(x8), c, _FixedRng(angles, normals)).clamp(0, 1)))
    assert np.abs(out - np.stack(refs)).mean() <= 2 / 255


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_snow_statistics_match_the_cifar_oracle(severity):
    x8 = _natural_uint8(64, 32, seed=severity)
    c = SNOW["cifar10"][severity - 1]
    rng = np.random.default_rng(severity)
    ref = np.stack([_snow_oracle(img, c, rng.normal(size=(32, 32)), rng.uniform(-135, -45)) for img in x8])
    out = _to_numpy(corrupt(_to_torch(x8), "snow", severity, seed=severity))
    _assert_stats_close(out, ref, x8 / 255.0)


@pytest.mark.parametrize("severity", [1, 5])
def test_snow_statistics_match_imagecorruptions(ic, severity):
    x8 = _natural_uint8(8, 224, seed=severity)
    state = np.random.get_state()
    try:
        np.random.seed(severity)
        ref = np.stack([np.uint8(ic.snow(img, severity)) for img in x8]) / 255.0
    finally:
        np.random.set_state(state)
    out = _to_numpy(corrupt(_to_torch(x8), "snow", severity, seed=severity, params="imagenet"))
    _assert_stats_close(out, ref, x8 / 255.0)


# ---- shared behaviour ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["motion_blur", "snow"])
def test_seeded_keep_dtype_shape_and_tiny_images(name):
    x = _to_torch(_natural_uint8(2, 32))
    a = corrupt(x, name, 3, seed=0)
    assert torch.equal(a, corrupt(x, name, 3, seed=0)) and a.shape == x.shape and a.dtype == torch.float32
    assert not torch.equal(a, corrupt(x, name, 3, seed=1))
    assert corrupt(x.double(), name, 3).dtype == torch.float64
    assert np.allclose(a.numpy() * 255, np.round(a.numpy() * 255), atol=1e-4)
    for shape in ((1, 3, 5, 6), (3, 3, 16, 16), (2, 3, 20, 12)):
        out = corrupt(torch.rand(*shape), name, 5, params="imagenet")
        assert out.shape == shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_motion_blur_keeps_constant_images():
    x = torch.full((2, 3, 16, 20), 100 / 255)
    for params in ("cifar10", "imagenet"):
        assert torch.allclose(corrupt(x, "motion_blur", 5, params=params), x, atol=1e-6)


def test_global_rng_is_neither_used_nor_changed():
    state, tstate = np.random.get_state(), torch.get_rng_state()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = [corrupt(x, n, 4) for n in ("motion_blur", "snow")]
    np.random.seed(123)
    torch.manual_seed(123)
    b = [corrupt(x, n, 4) for n in ("motion_blur", "snow")]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    np.random.set_state(state)
    torch.set_rng_state(tstate)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["motion_blur", "snow"])
def test_runs_on_the_gpu_as_on_the_cpu(name):
    x = _to_torch(_natural_uint8(4, 32))
    out = corrupt(x.cuda(), name, 5)
    assert out.device.type == "cuda"
    assert (out.cpu() - corrupt(x, name, 5)).abs().mean().item() <= 0.5 / 255
