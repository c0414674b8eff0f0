"""Generated corruptions against NumPy oracles written from the published scripts (make_cifar_c.py, make_imagenet_c.py).

The oracles follow the scripts' per-image HWC NumPy code (float64, clip, ``np.uint8`` truncation); deterministic
corruptions must match almost exactly, noises in the statistics of (output - input).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from corruption_helpers import _natural_uint8, _save, _to_numpy, _to_torch, assert_levels_close
from ctta.errors import ConfigError, CttaError, UnknownNameError
from ctta.streams.corruptions import (CORRUPTION_ORDER, CORRUPTIONS, corrupt, corruption_seed,
                                      generated_corruptions, quantize_8bit)

FIVE = ("gaussian_noise", "shot_noise", "impulse_noise", "brightness", "contrast")
# Deterministic corruptions added after the first five; the last two are extras of the original release.
ADDED = ("defocus_blur", "pixelate", "jpeg_compression", "gaussian_blur", "saturate")
EXTRAS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
GENERATED = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
             "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
             "speckle_noise", "gaussian_blur", "spatter", "saturate")

# The scripts' constants, typed in again from the sources so a slip in either copy shows.
LEVELS = {
    "cifar10": {"gaussian_noise": [0.04, 0.06, .08, .09, .10], "shot_noise": [500, 250, 100, 75, 50],
                "impulse_noise": [.01, .02, .03, .05, .07], "contrast": [.75, .5, .4, .3, 0.15],
                "brightness": [.05, .1, .15, .2, .3],
                "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
                "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65], "jpeg_compression": [80, 65, 58, 50, 40],
                "gaussian_blur": [.4, .6, 0.7, .8, 1],
                "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)]},
    "imagenet": {"gaussian_noise": [.08, .12, 0.18, 0.26, 0.38], "shot_noise": [60, 25, 12, 5, 3],
                 "impulse_noise": [.03, .06, .09, 0.17, 0.27], "contrast": [0.4, .3, .2, .1, .05],
                 "brightness": [.1, .2, .3, .4, .5],
                 "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
                 "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25], "jpeg_compression": [25, 18, 15, 10, 7],
                 "gaussian_blur": [1, 2, 3, 4, 6],
                 "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)]},
}


def _uint8_images(n: int = 128, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random uint8 HWC images with the HSV edge cases: black, white, grey and two-channel-tie pixels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    x[:, 0, :4] = 0
    x[:, 1, :4] = 255
    x[:, 2, :4] = rng.integers(0, 256, (n, 4, 1), dtype=np.uint8)  # grey
    x[:, 3, :4, 1] = x[:, 3, :4, 0]  # r == g
    x[:, 4, :4, 2] = x[:, 4, :4, 1]  # g == b
    return x


# ---- oracles (per image HWC, float64, as the scripts; vectorised over the batch) -------------------------------

def _rgb2hsv(x: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv: v = max, s = delta / v, hue by the maximal channel (later channels win ties)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    delta = v - x.min(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(delta == 0, 0.0, delta / v)
        h = np.zeros_like(v)
        h = np.where(r == v, (g - b) / delta, h)
        h = np.where(g == v, 2.0 + (b - r) / delta, h)
        h = np.where(b == v, 4.0 + (r - g) / delta, h)
    h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
    return np.stack((h, s, v), -1)


def _hsv2rgb(x: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb: sector floor(6 h) picks (v,t,p), (q,v,p), (p,v,t), (p,q,v), (t,p,v) or (v,p,q)."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    i = np.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    i = i.astype(int) % 6
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [row[k] for row in table]) for k in range(3)], -1)


def _oracle(name: str, x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """The scripts' formula for ``name`` on a batch of HWC float images in [0, 1] (before the uint8 save)."""
    if name == "gaussian_noise":
        return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)
    if name == "shot_noise":
        return np.clip(rng.poisson(x * c) / c, 0, 1)
    if name == "impulse_noise":  # skimage.util.random_noise(mode='s&p', amount=c, salt_vs_pepper=0.5)
        out = x.copy()
        flipped = rng.random(x.shape) <= c
        salted = rng.random(x.shape) <= 0.5
        out[flipped & salted] = 1.0
        out[flipped & ~salted] = 0.0
        return np.clip(out, 0, 1)
    if name == "contrast":
        means = x.mean(axis=(1, 2), keepdims=True)
        return np.clip((x - means) * c + means, 0, 1)
    if name == "brightness":
        hsv = _rgb2hsv(x)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        return np.clip(_hsv2rgb(hsv), 0, 1)
    raise KeyError(name)


# ---- registry and constants -------------------------------------------------------------------------------------

def test_registry_knows_all_fifteen_in_the_standard_order():
    assert len(CORRUPTION_ORDER) == 15 and len(set(CORRUPTION_ORDER)) == 15
    assert CORRUPTION_ORDER[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert CORRUPTION_ORDER[-1] == "jpeg_compression"
    assert sorted(CORRUPTIONS.names()) == sorted(CORRUPTION_ORDER + EXTRAS)
    assert generated_corruptions() == GENERATED  # the standard order first, then the extras


@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
@pytest.mark.parametrize("name", FIVE + ADDED)
def test_levels_are_the_published_constants(name, params):
    assert_levels_close(CORRUPTIONS.get(name).levels[params], LEVELS[params][name])


# ---- deterministic corruptions: almost exact ---------------------------------------------------------------------

@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", ["brightness", "contrast"])
def test_deterministic_corruptions_match_the_oracle(name, severity, params):
    x8 = _uint8_images(n=32)
    x = _to_torch(x8)
    out = _to_numpy(corrupt(x, name, severity, params=params))
    raw = _oracle(name, x8 / 255.0, LEVELS[params][name][severity - 1], np.random.default_rng(0))
    ref = _save(raw)
    diff = np.abs(out - ref)
    assert diff.mean() <= 2 / 255
    assert diff.max() <= 1 / 255 + 1e-6  # at most one truncation step apart, from float32 vs float64
    # The scripts truncate float64 values that are integers up to rounding (v + 51/255 for c = 0.2) one step
    # low; those aside, all but a few boundary cases agree exactly.
    artefact = (raw * 255 - np.floor(raw * 255)) > 1 - 1e-6
    assert (diff[~artefact] > 1e-6).mean() < 0.005


def test_contrast_uses_the_per_image_per_channel_mean():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 1.0  # image 0: red channel white, the others black
    out = corrupt(x, "contrast", 5, quantize=False)  # c = 0.15: every channel is constant, so unchanged
    assert torch.allclose(out, x)


# ---- noises: statistics of (output - input) ----------------------------------------------------------------------

def _close(a: float, b: float, rel: float = 0.1, floor: float = 0.0) -> bool:
    return abs(a - b) <= rel * abs(b) + floor


@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
@pytest.mark.parametrize("severity", [1, 3, 5])
@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise"])
def test_additive_noise_statistics_match_the_oracle(name, severity, params):
    x8 = _uint8_images(n=128)
    x8 = (x8 // 2).astype(np.uint8)  # darker images, so that clipping at 0 biases the mean measurably
    x = _to_torch(x8)
    out = _to_numpy(corrupt(x, name, severity, seed=3, params=params))
    ref = _save(_oracle(name, x8 / 255.0, LEVELS[params][name][severity - 1], np.random.default_rng(3)))
    d_out, d_ref = out - x8 / 255.0, ref - x8 / 255.0
    assert _close(d_out.std(), d_ref.std())
    assert _close(d_out.mean(), d_ref.mean(), floor=0.01 * d_ref.std())
    assert _close(np.abs(d_out).mean(), np.abs(d_ref).mean())
    # on the 8-bit grid, in range
    assert np.allclose(out * 255, np.round(out * 255), atol=1e-4) and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_impulse_noise_flips_the_published_fraction(severity, params):
    x8 = _uint8_images(n=128)
    x = _to_torch(x8)
    out = _to_numpy(corrupt(x, "impulse_noise", severity, seed=5, params=params))
    ref = _save(_oracle("impulse_noise", x8 / 255.0, LEVELS[params]["impulse_noise"][severity - 1],
                        np.random.default_rng(5)))
    x32 = _to_numpy(x)  # the input as float32 values, so that untouched elements compare equal
    changed, changed_ref = out != x32, ref != x8 / 255.0
    assert _close(changed.mean(), changed_ref.mean())
    # changed elements became 0 or 1, half each; all others are untouched, bit for bit
    assert set(np.unique(out[changed])) <= {0.0, 1.0}
    assert _close((out[changed] == 1).mean(), 0.5)
    assert np.array_equal(out[~changed], x32[~changed])
    # the flip probability itself: elements that were neither 0 nor 1 change whenever flipped
    inner = (x8 > 0) & (x8 < 255)
    assert _close(changed[inner].mean(), LEVELS[params]["impulse_noise"][severity - 1])


# ---- determinism -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIVE)
def test_same_seed_same_output(name):
    x = _to_torch(_uint8_images(n=4, size=8))
    a = corrupt(x, name, 3, seed=7)
    b = corrupt(x, name, 3, seed=7)
    corrupt(x, name, 3, seed=8)  # an unrelated call in between changes nothing
    c = corrupt(x, name, 3, seed=7)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(x, _to_torch(_uint8_images(n=4, size=8)))  # the input is not modified


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_different_seed_or_severity_different_noise(name):
    x = _to_torch(_uint8_images(n=4, size=16))
    assert not torch.equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1))
    assert not torch.equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 4, seed=0))


def test_global_rng_is_neither_used_nor_changed():
    x = _to_torch(_uint8_images(n=2, size=8))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = corrupt(x, "gaussian_noise", 5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(corrupt(x, "gaussian_noise", 5), a)


def test_corruption_seed_is_stable_and_distinct():
    assert corruption_seed(0, "gaussian_noise", 5) == corruption_seed(0, "gaussian_noise", 5)
    seeds = {corruption_seed(s, n, v) for s in (0, 1) for n in FIVE for v in (1, 5)}
    assert len(seeds) == 20 and all(0 <= s < 2**63 for s in seeds)


# ---- output format -----------------------------------------------------------------------------------------------

def test_quantization_truncates_like_np_uint8():
    x = torch.tensor([0.0, 0.5 / 255, 1.0 / 255, 254.7 / 255, 1.0]).view(1, 1, 1, 5)
    assert torch.equal(quantize_8bit(x) * 255, torch.tensor([0.0, 0.0, 1.0, 254.0, 255.0]).view(1, 1, 1, 5))
    # unchanged grid values survive float32 rounding
    grid = torch.arange(256, dtype=torch.float32) / 255.0
    assert torch.equal(quantize_8bit(grid), grid)


def test_quantize_false_keeps_full_precision():
    x = _to_torch(_uint8_images(n=2, size=8))
    raw = corrupt(x, "contrast", 2, quantize=False)
    q = corrupt(x, "contrast", 2)
    assert not torch.allclose(raw * 255, torch.round(raw * 255))
    assert torch.allclose(q, quantize_8bit(raw))


def test_float64_and_empty_batches():
    x = _to_torch(_uint8_images(n=2, size=8)).double()
    assert corrupt(x, "shot_noise", 2).dtype == torch.float64
    empty = torch.zeros(0, 3, 8, 8)
    assert corrupt(empty, "gaussian_noise", 1).shape == (0, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", FIVE)
def test_runs_on_the_gpu(name):
    x = _to_torch(_uint8_images(n=64)).cuda()
    out = corrupt(x, name, 5, seed=1)
    assert out.device == x.device and torch.equal(out, corrupt(x, name, 5, seed=1))
    cpu = corrupt(x.cpu(), name, 5, seed=1)
    assert abs((out.cpu() - x.cpu()).std().item() - (cpu - x.cpu()).std().item()) < 0.1 * (cpu - x.cpu()).std().item()


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_unknown_corruption_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="Did you mean 'gaussian_noise'.*Valid corruptions: .*contrast"):
        corrupt(torch.rand(1, 3, 4, 4), "gausian_noise", 1)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True, "3"])
def test_bad_severity(severity):
    with pytest.raises(ConfigError, match="severity must be an integer from 1 to 5"):
        corrupt(torch.rand(1, 3, 4, 4), "contrast", severity)


@pytest.mark.parametrize("images, message", [
    (torch.rand(3, 4, 4), r"shape N x 3 x H x W, got shape \(3, 4, 4\)"),
    (torch.rand(2, 1, 4, 4), r"got shape \(2, 1, 4, 4\)"),
    (torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8), "float images in \\[0, 1\\], got dtype torch.uint8"),
    (torch.linspace(0, 255, 96).view(2, 3, 4, 4), r"got values from 0 to 255 \(dtype torch.float32\)"),
    (torch.linspace(-0.5, 0.5, 96).view(2, 3, 4, 4), "got values from -0.5 to 0.5"),
    (torch.full((1, 3, 2, 2), float("nan")), "got values from nan"),
])
def test_bad_images(images, message):
    with pytest.raises(ConfigError, match=message):
        corrupt(images, "gaussian_noise", 1)


def test_bad_params_and_seed():
    with pytest.raises(ConfigError, match="cifar10, imagenet"):
        corrupt(torch.rand(1, 3, 4, 4), "contrast", 1, params="tinyimagenet")
    with pytest.raises(ConfigError, match="seed must be an integer"):
        corrupt(torch.rand(1, 3, 4, 4), "contrast", 1, seed=0.5)


@pytest.mark.parametrize("name", [n for n in CORRUPTION_ORDER if n not in GENERATED])
def test_not_yet_generated_corruptions_say_so(name):
    with pytest.raises(CttaError, match=f"corruption '{name}' cannot be generated yet .*--data-root"):
        corrupt(torch.rand(1, 3, 4, 4), name, 1)


# ---- defocus_blur, pixelate, jpeg_compression, gaussian_blur, saturate: against cv2 / PIL / SciPy oracles ---------


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The scripts' disk(): a normalised float32 disk, anti-aliased by cv2.GaussianBlur on the kernel."""
    import cv2
    grid = np.arange(-8, 8 + 1) if radius <= 8 else np.arange(-radius, radius + 1)
    xx, yy = np.meshgrid(grid, grid)
    kernel = np.array((xx ** 2 + yy ** 2) <= radius ** 2, dtype=np.float32)
    kernel /= kernel.sum()
    return cv2.GaussianBlur(kernel, ksize=(3, 3) if radius <= 8 else (5, 5), sigmaX=alias_blur)


def _added_oracle(name: str, img: np.ndarray, c) -> np.ndarray:
    """The scripts' code for one uint8 HWC image, returning the stored uint8 result as float in [0, 1]."""
    from io import BytesIO

    from PIL import Image
    from scipy.ndimage import gaussian_filter
    if name == "defocus_blur":
        import cv2
        x, kernel = img / 255.0, _disk(*c)
        return _save(np.stack([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)], -1))
    if name == "gaussian_blur":  # skimage gaussian(multichannel=True) = scipy, sigma (c, c, 0), nearest, truncate 4
        return _save(gaussian_filter(img / 255.0, (c, c, 0), mode="nearest", truncate=4.0))
    if name == "saturate":
        hsv = _rgb2hsv(img / 255.0)
        hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
        return _save(_hsv2rgb(hsv))
    pil = Image.fromarray(img)
    h, w = img.shape[:2]
    if name == "pixelate":
        out = pil.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
    elif name == "jpeg_compression":
        buf = BytesIO()
        pil.save(buf, "JPEG", quality=c)
        out = Image.open(buf)
    else:
        raise KeyError(name)
    return np.asarray(out, dtype=np.float64) / 255.0


@pytest.mark.parametrize("params, n, size", [("cifar10", 8, 32), ("imagenet", 2, 224)])
@pytest.mark.parametrize("severity", [1, 3, 5])
@pytest.mark.parametrize("name", ADDED)
def test_added_corruptions_match_the_oracle(name, severity, params, n, size):
    x8 = _natural_uint8(n, size)
    if name == "saturate":
        x8[:, :5] = _uint8_images(n=n, size=size)[:, :5]  # HSV edge cases: black, white, grey, ties
    out = _to_numpy(corrupt(_to_torch(x8), name, severity, params=params))
    c = LEVELS[params][name][severity - 1]
    ref = np.stack([_added_oracle(name, img, c) for img in x8])
    diff = np.abs(out - ref)
    # measured: jpeg_compression and pixelate bit-exact; the filters <= 0.04 / 255 in the mean. saturate truncates
    # exact multiples of 1/255 (v - 2 delta for c = 2) on either side in float32 vs float64: up to 0.22 / 255.
    assert diff.mean() <= (0.5 if name == "saturate" else 0.1) / 255
    assert diff.max() <= 1 / 255 + 1e-6  # at most one truncation step, from float32 vs float64 / cv2's DFT
    assert np.allclose(out * 255, np.round(out * 255), atol=1e-4)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_added_imagenet_corruptions_match_the_imagecorruptions_package(severity, ic):
    """The installed ``imagecorruptions`` functions themselves (the ``ic`` fixture of conftest imports them)."""
    from PIL import Image
    x8 = _natural_uint8(2, 224, seed=1)
    x = _to_torch(x8)
    for name in ("defocus_blur", "pixelate", "jpeg_compression", "saturate"):
        fn = getattr(ic, name)
        ref = np.stack([np.uint8(np.asarray(fn(img if name in ("defocus_blur", "saturate") else Image.fromarray(img),
                                                  severity))) for img in x8]) / 255.0
        out = _to_numpy(corrupt(x, name, severity, params="imagenet"))
        assert np.abs(out - ref).mean() <= 2 / 255, name


def test_blurs_keep_constant_images_and_small_images():
    x = torch.full((2, 3, 5, 7), 100 / 255)  # smaller than the 17 x 17 / 21 x 21 kernels: padding wraps around
    for name in ("defocus_blur", "gaussian_blur", "pixelate"):
        for params in ("cifar10", "imagenet"):
            out = corrupt(x, name, 5, params=params)
            assert out.shape == x.shape and torch.allclose(out, x, atol=1 / 255 + 1e-6), (name, params)


@pytest.mark.parametrize("name", ADDED)
def test_added_corruptions_are_deterministic_and_keep_dtype(name):
    x = _to_torch(_natural_uint8(2, 32))
    a = corrupt(x, name, 3, seed=0)
    assert torch.equal(a, corrupt(x, name, 3, seed=1))  # no randomness
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert corrupt(x.double(), name, 3).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ADDED)
def test_added_corruptions_run_on_the_gpu(name):
    x = _to_torch(_natural_uint8(4, 32))
    out = corrupt(x.cuda(), name, 5)
    assert out.device == x.cuda().device
    assert (out.cpu() - corrupt(x, name, 5)).abs().mean().item() <= 0.5 / 255  # as on the CPU (cuDNN may use TF32)


# ---- zoom_blur (deterministic, against SciPy) and fog (random, by statistics) -------------------------------------

ZOOMS = {"cifar10": [(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)],
         "imagenet": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)]}
FOGS = {"cifar10": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "imagenet": [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)]}


@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
def test_zoom_and_fog_levels_are_the_published_constants(params):
    assert_levels_close(CORRUPTIONS.get("zoom_blur").levels[params], ZOOMS[params])
    assert_levels_close(CORRUPTIONS.get("fog").levels[params], FOGS[params])


def _zoom_oracle(img: np.ndarray, zooms: np.ndarray) -> np.ndarray:
    """The scripts' zoom_blur on one uint8 HWC image: clipped_zoom = centre crop, scipy zoom(order=1), centre trim."""
    from scipy.ndimage import zoom as scizoom
    x = (img / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    h = x.shape[0]
    for z in zooms:
        ch = int(np.ceil(h / z))
        top = (h - ch) // 2
        zoomed = scizoom(x[top:top + ch, top:top + ch], (z, z, 1), order=1)
        trim = (zoomed.shape[0] - h) // 2
        out += zoomed[trim:trim + h, trim:trim + h]
    return _save((x + out) / (len(zooms) + 1))


@pytest.mark.parametrize("params, n, size", [("cifar10", 4, 32), ("imagenet", 1, 224)])
@pytest.mark.parametrize("severity", [1, 5])
def test_zoom_blur_matches_scipy(severity, params, n, size):
    x8 = _natural_uint8(n, size)
    out = _to_numpy(corrupt(_to_torch(x8), "zoom_blur", severity, params=params))
    ref = np.stack([_zoom_oracle(img, np.arange(*ZOOMS[params][severity - 1])) for img in x8])
    diff = np.abs(out - ref)
    assert diff.mean() <= 0.05 / 255  # measured: about 0.002 / 255 (float32 vs SciPy's float64 interpolation)
    assert diff.max() <= 1 / 255 + 1e-6


def test_zoom_blur_keeps_constant_and_non_square_images():
    x = torch.full((2, 3, 9, 20), 100 / 255)
    out = corrupt(x, "zoom_blur", 5, params="imagenet")
    assert out.shape == x.shape and torch.allclose(out, x, atol=1 / 255 + 1e-6)
    x = _to_torch(_natural_uint8(2, 32))
    assert torch.equal(corrupt(x, "zoom_blur", 3, seed=0), corrupt(x, "zoom_blur", 3, seed=1))


def _plasma_oracle(rng: np.random.Generator, mapsize: int, wibbledecay: float) -> np.ndarray:
    """The scripts' plasma_fractal (diamond-square with np.roll), drawing from ``rng``."""
    maps = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        h = step // 2
        corner = maps[0::step, 0::step]
        acc = corner + np.roll(corner, -1, axis=0)
        acc += np.roll(acc, -1, axis=1)
        maps[h::step, h::step] = wibbled(acc)
        dr, ul = maps[h::step, h::step], maps[0::step, 0::step]
        maps[0::step, h::step] = wibbled(dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1))
        maps[h::step, 0::step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0))
        step //= 2
        wibble /= wibbledecay
    maps -= maps.min()
    return maps / maps.max()


def _fog_oracle(rng: np.random.Generator, img: np.ndarray, c) -> np.ndarray:
    x = img / 255.0
    max_val = x.max()
    mapsize = 1 << (max(x.shape[:2]) - 1).bit_length()
    x = x + c[0] * _plasma_oracle(rng, mapsize, c[1])[:x.shape[0], :x.shape[1], None]
    return _save(x * max_val / (max_val + c[0]))


def _fog_stats(out: np.ndarray, x: np.ndarray):
    d = out - x
    # mean and std of (output - input); per-image pixel std; mean absolute horizontal step of the change (smoothness)
    return d.mean(), d.std(), out.std(axis=(1, 2, 3)).mean(), np.abs(np.diff(d, axis=2)).mean()


@pytest.mark.parametrize("params, n, size", [("cifar10", 200, 32), ("imagenet", 200, 64)])  # ImageNet constants on 64 x 64 maps (256 is slow)
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_fog_statistics_match_the_oracle(severity, params, n, size):
    x8 = _natural_uint8(n, size, seed=severity)
    x = x8 / 255.0
    c = FOGS[params][severity - 1]
    rng = np.random.default_rng(severity)
    ref = np.stack([_fog_oracle(rng, img, c) for img in x8])
    outs = [_to_numpy(corrupt(_to_torch(x8), "fog", severity, seed=s, params=params)) for s in range(2)]
    ref_stats = _fog_stats(ref, x)
    for out in outs:
        got = _fog_stats(out, x)
        assert abs(got[0] - ref_stats[0]) <= 0.1 * ref_stats[1]  # the mean change is near 0: relative to its spread
        for a, b in zip(got[1:], ref_stats[1:]):
            assert _close(a, b, rel=0.1), (got, ref_stats)
    assert not np.array_equal(outs[0], outs[1])


def test_plasma_fractal_statistics_match_the_oracle():
    from ctta.streams.corruptions import ImageRng
    from ctta.streams.corruptions.weather import _plasma_fractal
    rng = np.random.default_rng(0)
    for mapsize, decay in ((32, 3.0), (32, 1.75), (256, 1.4)):
        n = 400 if mapsize == 32 else 16
        ours = _plasma_fractal(ImageRng(0, torch.arange(n)), mapsize, decay, torch.float32).double().numpy()
        ref = np.stack([_plasma_oracle(rng, mapsize, decay) for _ in range(n)])
        assert ours.shape == ref.shape
        assert np.allclose(ours.min(axis=(1, 2)), 0) and np.allclose(ours.max(axis=(1, 2)), 1)
        for f in (np.mean, np.std, lambda m: np.abs(np.diff(m, axis=1)).mean(),
                  lambda m: np.abs(np.diff(m, axis=2)).mean()):
            assert _close(f(ours), f(ref), rel=0.1), (mapsize, decay)


def test_fog_formula_recovers_a_normalised_plasma():
    x = torch.full((3, 3, 32, 32), 0.2)
    x[:, :, 0, 0] = 0.5  # max_val
    c0 = CORRUPTIONS.get("fog").levels["cifar10"][0][0]
    out = corrupt(x, "fog", 1, quantize=False)
    plasma = (out * (0.5 + c0) / 0.5 - x) / c0
    assert torch.allclose(plasma[:, 0], plasma[:, 2], atol=1e-5)  # shared by the channels
    flat = plasma[:, 0].reshape(3, -1)[:, 1:]
    assert flat.min() >= -1e-5 and flat.max() <= 1 + 1e-5
    assert corrupt(x.double(), "fog", 2).dtype == torch.float64


# ---- elastic_transform (random): its resampling against SciPy, its statistics against the script ----------------

ELASTIC = {"cifar10": [(32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07), (32 * 0.08, 32 * 0.06, 32 * 0.06),
                       (32 * 0.1, 32 * 0.04, 32 * 0.05), (32 * 0.1, 32 * 0.03, 32 * 0.03)],
           "imagenet": [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                        (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                        (244 * 0.12, 244 * 0.01, 244 * 0.02)]}


@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
def test_elastic_levels_are_the_published_constants(params):
    assert_levels_close(CORRUPTIONS.get("elastic_transform").levels[params], ELASTIC[params])


def test_elastic_resampling_matches_scipy_map_coordinates_and_gaussian():
    from scipy.ndimage import gaussian_filter, map_coordinates

    from ctta.streams.corruptions.filters import gaussian_filter as _gaussian_filter, reflect_coord as _reflect_coord, sample_bilinear as _sample_bilinear
    rng = np.random.default_rng(0)
    img = rng.random((3, 12, 17))
    yy, xx = np.meshgrid(np.arange(12), np.arange(17), indexing="ij")
    dy, dx = 6 * rng.standard_normal((2, 12, 17))
    ref = np.stack([map_coordinates(ch, (yy + dy, xx + dx), order=1, mode="reflect") for ch in img])
    t = torch.from_numpy(img)[None]
    out = _sample_bilinear(t, _reflect_coord(torch.from_numpy(yy + dy)[None], 12),
                           _reflect_coord(torch.from_numpy(xx + dx)[None], 17))[0].numpy()
    assert np.abs(out - ref).max() < 1e-9
    for sigma in (0.5, 2.0, 30.0):  # radius wider than the image: the padding mirrors repeatedly
        ref = np.stack([gaussian_filter(ch, sigma, mode="reflect", truncate=3) for ch in img])
        assert np.abs(_gaussian_filter(t, sigma, 3.0, "reflect")[0].numpy() - ref).max() < 1e-9


def _elastic_oracle(rng: np.random.Generator, img: np.ndarray, c) -> np.ndarray:
    """The scripts' elastic_transform on one uint8 HWC image (cv2 affine warp, SciPy smoothing and resampling)."""
    import cv2
    from scipy.ndimage import gaussian_filter, map_coordinates
    image = img.astype(np.float32) / 255.0
    size = image.shape[:2]
    centre, half = np.float32(size) // 2, min(size) // 3
    pts1 = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    pts2 = pts1 + rng.uniform(-c[2], c[2], size=pts1.shape).astype(np.float32)
    image = cv2.warpAffine(image, cv2.getAffineTransform(pts1, pts2), size[::-1], borderMode=cv2.BORDER_REFLECT_101)
    dx = (gaussian_filter(rng.uniform(-1, 1, size=size), c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dy = (gaussian_filter(rng.uniform(-1, 1, size=size), c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    yy, xx = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    out = np.stack([map_coordinates(image[..., k], (yy + dy, xx + dx), order=1, mode="reflect") for k in range(3)], -1)
    return _save(out)


@pytest.mark.parametrize("params, n, size", [("cifar10", 150, 32), ("imagenet", 4, 224)])
@pytest.mark.parametrize("severity", [1, 2, 5])
def test_elastic_statistics_match_the_oracle(severity, params, n, size):
    x8 = np.uint8(np.clip(_natural_uint8(n, size, seed=severity).astype(float) * 4 - 380, 0, 255))  # more contrast
    x = x8 / 255.0
    rng = np.random.default_rng(severity)
    ref = np.stack([_elastic_oracle(rng, img, ELASTIC[params][severity - 1]) for img in x8]) - x
    # measured: mean |change| and std of the change within 5 % of the script's (CIFAR 150 images, ImageNet 4 .. 6)
    for seed in range(2):
        got = _to_numpy(corrupt(_to_torch(x8), "elastic_transform", severity, seed=seed, params=params)) - x
        assert _close(np.abs(got).mean(), np.abs(ref).mean(), rel=0.1)
        assert _close(got.std(), ref.std(), rel=0.1)
        assert abs(got.mean() - ref.mean()) <= 0.02


# ---- glass_blur (random): statistics against the scripts' sequential swap loop ----------------------------------

GLASS = {"cifar10": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
         "imagenet": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)]}


@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
def test_glass_levels_are_the_published_constants(params):
    assert_levels_close(CORRUPTIONS.get("glass_blur").levels[params], GLASS[params])


def _glass_oracle(rng: np.random.Generator, img: np.ndarray, c) -> np.ndarray:
    """The scripts' glass_blur on one uint8 HWC image: blur, uint8, sequential local swaps, blur."""
    from scipy.ndimage import gaussian_filter

    def blur(v):
        return gaussian_filter(v, (c[0], c[0], 0), mode="nearest", truncate=4.0)

    x = np.uint8(blur(img / 255.0) * 255)
    h_size, w_size = x.shape[:2]
    for _ in range(c[2]):
        for h in range(h_size - c[1], c[1], -1):
            for w in range(w_size - c[1], c[1], -1):
                dx, dy = rng.integers(-c[1], c[1], size=(2,))
                x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w].copy()
    return _save(blur(x / 255.0))


@pytest.mark.parametrize("params, severity, n, size", [("cifar10", 1, 16, 32), ("cifar10", 5, 8, 32),
                                                       ("imagenet", 2, 4, 48), ("imagenet", 5, 2, 48)])
def test_glass_blur_statistics_match_the_oracle(params, severity, n, size):
    x8 = np.uint8(np.clip(_natural_uint8(n, size, seed=severity).astype(float) * 4 - 380, 0, 255))
    x = x8 / 255.0
    c = GLASS[params][severity - 1]
    rng = np.random.default_rng(severity)
    ref = np.stack([_glass_oracle(rng, img, c) for img in x8]) - x
    # measured (40 CIFAR images, 1 ImageNet one): mean |change| and its std within 5 % of the script's; the phased
    # swaps move pixels slightly more than the sequential loop for one iteration of max_delta 1 (+5 %), else < 2 %
    for seed in range(2):
        got = _to_numpy(corrupt(_to_torch(x8), "glass_blur", severity, seed=seed, params=params)) - x
        assert _close(np.abs(got).mean(), np.abs(ref).mean(), rel=0.1)
        assert _close(got.std(), ref.std(), rel=0.1)
    plain = _to_numpy(corrupt(_to_torch(x8), "gaussian_blur", 1, params=params)) - x  # no swaps: clearly less
    assert np.abs(plain).mean() < 0.8 * np.abs(ref).mean() or c[0] != GLASS[params][0][0]


def test_local_shuffle_is_a_local_permutation_moving_pixels_as_far_as_the_loop():
    from ctta.streams.corruptions import ImageRng
    from ctta.streams.corruptions.blur import _local_shuffle
    h_size, w_size = 20, 23
    x = torch.arange(h_size * w_size, dtype=torch.float64).view(1, 1, h_size, w_size).expand(8, 3, -1, -1)
    rng = np.random.default_rng(0)
    for d, iters in ((1, 1), (2, 3), (4, 2)):
        out = _local_shuffle(x, d, iters, ImageRng(d, torch.arange(8)))
        assert torch.equal(out.flatten(2).sort(dim=2).values, x.flatten(2))  # a permutation per image and channel
        assert torch.equal(out[:, 1], out[:, 0]) and torch.equal(out[:, 2], out[:, 0])  # whole pixels move
        src = out[:, 0].long()
        moved = torch.stack((src // w_size - torch.arange(h_size).view(-1, 1), src % w_size - torch.arange(w_size)), -1)
        ref = []  # the scripts' sequential loop on the same grid
        for _ in range(8):
            idx = np.arange(h_size * w_size).reshape(h_size, w_size)
            for _ in range(iters):
                for h in range(h_size - d, d, -1):
                    for w in range(w_size - d, d, -1):
                        dx, dy = rng.integers(-d, d, size=(2,))
                        idx[h, w], idx[h + dy, w + dx] = idx[h + dy, w + dx], idx[h, w]
            ref.append(np.abs(np.stack((idx // w_size - np.arange(h_size)[:, None], idx % w_size - np.arange(w_size)),
                                       -1)).mean())
        # measured: mean displacement 0.718 / 1.727 / 1.693 pixels here vs 0.716 / 1.718 / 1.669 for the loop. Swaps
        # chain in both (a pixel swapped into a later position moves again), so a few pixels travel beyond d * iters.
        assert _close(moved.abs().double().mean().item(), float(np.mean(ref)), rel=0.08), (d, iters)
        assert (moved.abs().amax(dim=-1) <= d * iters).double().mean() > 0.7


@pytest.mark.parametrize("name", ["glass_blur", "zoom_blur", "fog", "elastic_transform"])
def test_geometric_and_weather_corruptions_are_seeded_and_keep_dtype(name):
    x = _to_torch(_natural_uint8(2, 32))
    a = corrupt(x, name, 3, seed=0)
    assert torch.equal(a, corrupt(x, name, 3, seed=0)) and a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, corrupt(x, name, 3, seed=1)) == (name == "zoom_blur")  # only zoom_blur is not random
    assert corrupt(x.double(), name, 3).dtype == torch.float64
    assert torch.equal(x, _to_torch(_natural_uint8(2, 32)))  # the input is not modified
    assert corrupt(torch.rand(1, 3, 5, 6), name, 5, params="imagenet").shape == (1, 3, 5, 6)  # tiny images


# --- per-image random numbers: batch independence and distribution ------------------------------------------------

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "elastic_transform", "spatter")


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_do_not_depend_on_the_batch(name):
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    whole = corrupt(x, name, 5, seed=7)
    for i in (0, 4):
        alone = corrupt(x[i:i + 1], name, 5, seed=7)
        assert torch.equal(alone[0], whole[i]), name
    reordered = corrupt(x.flip(0), name, 5, seed=7)
    assert torch.equal(reordered.flip(0), whole)
    keyed = corrupt(x, name, 5, seed=7, keys=torch.arange(100, 106))
    assert torch.equal(corrupt(x[2:3], name, 5, seed=7, keys=torch.tensor([102]))[0], keyed[2])
    assert not torch.equal(corrupt(x, name, 5, seed=8), whole)


def test_corrupt_rejects_bad_keys():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="keys"):
        corrupt(x, "gaussian_noise", 1, keys=torch.arange(3))
    with pytest.raises(ConfigError, match="keys"):
        corrupt(x, "gaussian_noise", 1, keys=torch.rand(2))


def test_image_rng_distributions():
    from scipy import stats

    from ctta.streams.corruptions import ImageRng

    rng = ImageRng(123, torch.arange(64))
    u = rng.rand(4096).double()
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert stats.kstest(u.flatten().numpy()[:20000], "uniform").pvalue > 1e-3
    z = rng.randn(4096).double().flatten().numpy()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z[:20000], "norm").pvalue > 1e-3
    k = rng.randint(-2, 3, 4096)
    assert int(k.min()) == -2 and int(k.max()) == 2
    counts = torch.bincount((k + 2).flatten(), minlength=5).double()
    assert float((counts / counts.sum() - 0.2).abs().max()) < 0.01
    # successive draws and different keys are uncorrelated
    a, b = rng.rand(4096).flatten().numpy(), rng.rand(4096).flatten().numpy()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01
    rows = ImageRng(123, torch.arange(64)).rand(4096).numpy()
    assert abs(np.corrcoef(rows[0], rows[1])[0, 1]) < 0.05


def test_mix32_wraps_like_uint32_arithmetic():
    from ctta.streams.corruptions.rng import mix32

    def ref(v: int) -> int:
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    vals = [0, 1, 2, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 0xDEADBEEF, 0x9E3779B9]
    as_i32 = torch.tensor([v - 2 ** 32 if v >= 2 ** 31 else v for v in vals], dtype=torch.int32)
    got = [int(v) & 0xFFFFFFFF for v in mix32(as_i32)]
    assert got == [ref(v) for v in vals]
