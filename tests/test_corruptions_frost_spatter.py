"""frost, spatter and speckle_noise against the scripts (make_cifar_c.py oracles in NumPy / cv2) and imagecorruptions.

frost is deterministic given (texture, crop offset): ``frost_blend`` is compared exactly with imagecorruptions'
``frost`` whose ``np.random.randint`` is made to return the same draws; the random versions are compared by the
statistics of (output - input); spatter's OpenCV steps are compared with cv2 one by one.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from ctta.errors import CttaError, DataNotFoundError
from ctta.streams.corruptions import CORRUPTIONS, corrupt
from corruption_helpers import _natural_uint8, _save, _to_numpy, _to_torch, assert_levels_close

cv2 = pytest.importorskip("cv2")

LEVELS = {
    "cifar10": {"speckle_noise": [.06, .1, .12, .16, .2],
                "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
                "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                            (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)]},
    "imagenet": {"speckle_noise": [.15, .2, 0.35, 0.45, 0.6],
                 "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
                 "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                             (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)]},
}
TEXTURES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


def _close(a: float, b: float, rel: float = 0.1, floor: float = 0.0) -> bool:
    return abs(a - b) <= rel * abs(b) + floor


def _texture_path(name: str) -> str:
    from ctta.streams.corruptions.frost import texture_dir
    return str(texture_dir() / name)




# ---- constants -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
@pytest.mark.parametrize("name", ["speckle_noise", "frost", "spatter"])
def test_levels_are_the_published_constants(name, params):
    got = CORRUPTIONS.get(name).levels[params]
    if name == "frost":  # (c0, c1, texture scale): 0.2 for the CIFAR script, None for imagecorruptions' fit
        assert all(lv[2] == (0.2 if params == "cifar10" else None) for lv in got)
        got = [lv[:2] for lv in got]
    assert_levels_close(got, LEVELS[params][name])


# ---- speckle_noise -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_speckle_noise_statistics_match_the_script(severity, params):
    x8 = _natural_uint8(64, 32, seed=severity)
    x = x8 / 255.0
    c = LEVELS[params]["speckle_noise"][severity - 1]
    ref = _save(x + x * np.random.default_rng(severity).normal(size=x.shape, scale=c)) - x
    got = _to_numpy(corrupt(_to_torch(x8), "speckle_noise", severity, seed=1, params=params)) - x
    assert _close(got.std(), ref.std()) and _close(np.abs(got).mean(), np.abs(ref).mean())
    assert _close(got.mean(), ref.mean(), floor=0.01 * ref.std())
    # multiplicative: black pixels stay black
    black = np.zeros((1, 3, 8, 8), np.float32)
    assert torch.equal(corrupt(torch.from_numpy(black), "speckle_noise", 5), torch.from_numpy(black))


# ---- frost ---------------------------------------------------------------------------------------------------------

def test_frost_textures_are_the_scripts_rescaled_textures():
    from ctta.streams.corruptions.frost import textures
    stack, sizes = textures(torch.device("cpu"), 32, 32, 0.2)
    for k, name in enumerate(TEXTURES):  # make_cifar_c.py: cv2.resize(fx=0.2, fy=0.2), bit-exact
        ref = cv2.resize(cv2.imread(_texture_path(name)), (0, 0), fx=0.2, fy=0.2)[..., ::-1]
        assert tuple(sizes[k].tolist()) == ref.shape[:2]
        assert np.array_equal(stack[k, :, :ref.shape[0], :ref.shape[1]].permute(1, 2, 0).numpy(), ref)
    stack, sizes = textures(torch.device("cpu"), 224, 224, None)
    for k, name in enumerate(TEXTURES[:2]):  # imagecorruptions: INTER_CUBIC to ceil(1.1 x size), within 1 level
        raw = cv2.imread(_texture_path(name))
        size = (int(np.ceil(raw.shape[1] * 1.1)), int(np.ceil(raw.shape[0] * 1.1)))
        ref = cv2.resize(raw, dsize=size, interpolation=cv2.INTER_CUBIC)[..., ::-1]
        assert tuple(sizes[k].tolist()) == ref.shape[:2]
        ours = stack[k, :, :ref.shape[0], :ref.shape[1]].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(ours - ref).max() <= 1 and (ours != ref).mean() < 1e-3


@pytest.mark.parametrize("severity", [1, 5])
@pytest.mark.parametrize("size", [224, 40])
def test_frost_blend_matches_imagecorruptions_given_texture_and_offset(ic, monkeypatch, severity, size):
    from ctta.streams.corruptions.frost import frost_blend, textures
    x8 = _natural_uint8(3, size, seed=severity)
    level = CORRUPTIONS.get("frost").levels["imagenet"][severity - 1]
    _, sizes = textures(torch.device("cpu"), size, size, None)
    index = torch.tensor([0, 3, 4])
    top = torch.stack([sizes[k, 0] - size - 1 for k in index.tolist()]) // torch.tensor([1, 2, 3])
    left = torch.tensor([0, 17, 5])
    ours = _to_numpy(frost_blend(_to_torch(x8), level, index, top, left))
    refs = []
    for i in range(3):
        draws = iter([int(index[i]), int(top[i]), int(left[i])])
        monkeypatch.setattr(np.random, "randint", lambda *a, **k: next(draws))
        refs.append(np.uint8(ic.frost(x8[i], severity)) / 255.0)
    diff = np.abs(_save(ours) - np.stack(refs))
    assert diff.mean() <= 2 / 255 and diff.max() <= 2 / 255 + 1e-6


def _cifar_frost_oracle(rng: np.random.Generator, img: np.ndarray, c, index: int) -> np.ndarray:
    """make_cifar_c.py frost on one 32 x 32 uint8 image with texture ``index`` (cv2.imread of the package data)."""
    frost = cv2.imread(_texture_path(TEXTURES[index]))
    frost = cv2.resize(frost, (0, 0), fx=0.2, fy=0.2)
    x0, y0 = rng.integers(0, frost.shape[0] - 32), rng.integers(0, frost.shape[1] - 32)
    frost = frost[x0:x0 + 32, y0:y0 + 32][..., [2, 1, 0]]
    return np.uint8(np.clip(c[0] * img + c[1] * frost, 0, 255)) / 255.0


def _texture_draws(x8: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """The texture each image gets from ``corrupt(..., "frost", severity, seed)``: frost's first draw."""
    from ctta.streams.corruptions import ImageRng, content_keys, corruption_seed
    rng = ImageRng(corruption_seed(seed, "frost", severity), content_keys(_to_torch(x8)))
    return rng.randint(0, 5, 1)[:, 0].numpy()


def _stratified(d: np.ndarray, index: np.ndarray):
    """Mean, std and mean |.| of the change over images, weighting the 5 textures equally (as their expected
    frequencies): the texture drawn per image moves an image's change a lot, so raw averages over a few hundred
    images differ by sampling alone."""
    groups = [d[index == k] for k in range(5)]
    assert all(len(g) >= 5 for g in groups)
    mean = np.mean([g.mean() for g in groups])
    second = np.mean([(g ** 2).mean() for g in groups])
    return mean, np.sqrt(second - mean ** 2), np.mean([np.abs(g).mean() for g in groups])


def _frost_stats_agree(got, ref) -> None:
    assert abs(got[0] - ref[0]) <= 0.1 * ref[1], (got, ref)
    assert _close(got[1], ref[1]) and _close(got[2], ref[2]), (got, ref)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_frost_cifar_statistics_match_the_script(severity):
    x8 = _natural_uint8(150, 32, seed=severity)
    x = x8 / 255.0
    c = LEVELS["cifar10"]["frost"][severity - 1]
    rng = np.random.default_rng(severity)
    ref_index = rng.integers(5, size=len(x8))
    ref = np.stack([_cifar_frost_oracle(rng, img, c, k) for img, k in zip(x8, ref_index)]) - x
    got = _to_numpy(corrupt(_to_torch(x8), "frost", severity, seed=2)) - x
    _frost_stats_agree(_stratified(got, _texture_draws(x8, severity, 2)), _stratified(ref, ref_index))


@pytest.mark.parametrize("severity", [1, 5])
def test_frost_imagenet_statistics_match_imagecorruptions(ic, monkeypatch, severity):
    x8 = _natural_uint8(100, 48, seed=severity)  # the package's rule on 48 x 48 images (224 x 224 is slow)
    x = x8 / 255.0
    gen, ref_index = np.random.RandomState(severity), []

    def spy(*args, **kwargs):  # imagecorruptions' draws, recording the texture index (its first draw per image)
        value = gen.randint(*args, **kwargs)
        if args == (5,):
            ref_index.append(value)
        return value

    monkeypatch.setattr(np.random, "randint", spy)
    ref = np.stack([np.uint8(ic.frost(img, severity)) / 255.0 for img in x8]) - x
    monkeypatch.undo()
    got = _to_numpy(corrupt(_to_torch(x8), "frost", severity, seed=3, params="imagenet")) - x
    _frost_stats_agree(_stratified(got, _texture_draws(x8, severity, 3)), _stratified(ref, np.array(ref_index)))


def test_frost_draws_all_five_textures_and_offsets_over_the_whole_range():
    from ctta.streams.corruptions import ImageRng
    from ctta.streams.corruptions.frost import USED_TEXTURES, textures
    _, sizes = textures(torch.device("cpu"), 32, 32, 0.2)
    rng = ImageRng(0, torch.arange(5000))
    index = rng.randint(0, USED_TEXTURES, 1)[:, 0]
    counts = torch.bincount(index, minlength=5).double() / 5000
    assert float((counts - 0.2).abs().max()) < 0.03
    from ctta.streams.corruptions.frost import _randint_below
    span = sizes[index, 0] - 32
    top = _randint_below(rng, span)
    assert bool((top >= 0).all() and (top < span).all())
    assert _close(float((top.double() / (span - 1)).mean()), 0.5, rel=0.05)


def test_frost_missing_textures_say_how_to_fix(monkeypatch):
    import importlib.util

    from ctta.streams.corruptions import frost as frost_mod
    frost_mod._raw_textures.cache_clear()
    frost_mod.textures.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataNotFoundError, match="pip install imagecorruptions"):
        corrupt(torch.rand(1, 3, 8, 8), "frost", 1)
    monkeypatch.undo()
    frost_mod._raw_textures.cache_clear()
    fake = types.SimpleNamespace(submodule_search_locations=["/nonexistent/imagecorruptions"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake)
    with pytest.raises(DataNotFoundError, match="frost textures frost1.png, .* missing from .*imagecorruptions"):
        corrupt(torch.rand(1, 3, 8, 8), "frost", 1)
    monkeypatch.undo()
    frost_mod._raw_textures.cache_clear()
    assert issubclass(DataNotFoundError, CttaError)


# ---- spatter: the OpenCV steps one by one, then the whole corruption by its statistics ----------------------------

def _liquid_layers(n: int, size: int, c, seed: int = 0) -> np.ndarray:
    from skimage.filters import gaussian
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        layer = gaussian(rng.normal(size=(size, size), loc=c[0], scale=c[1]), sigma=c[2])
        layer[layer < c[3]] = 0
        out.append(layer)
    return np.stack(out)


@pytest.mark.parametrize("size, level", [(32, 2), (64, 0)])
def test_spatter_opencv_steps_match_cv2(size, level):
    from ctta.streams.corruptions import spatter as sp
    c = LEVELS["cifar10" if size == 32 else "imagenet"]["spatter"][level]
    layers = _liquid_layers(12, size, c)
    u8 = (layers * 255).astype(np.uint8)
    edges = np.stack([cv2.Canny(u, 50, 150) for u in u8]) > 0
    assert edges.any() and np.array_equal(sp.canny(torch.from_numpy(u8).long(), 50, 150).numpy(), edges)
    dist = np.stack([cv2.distanceTransform(np.uint8(255 - 255 * e), cv2.DIST_L2, 5) for e in edges])
    ours = sp.distance_transform(torch.from_numpy(edges)).numpy()
    # OpenCV 3 / 4 chamfer in 16-bit fixed point (as here); OpenCV 5 in float: equal within 1e-4
    assert np.abs(np.minimum(ours, 20) - np.minimum(dist, 20)).max() < 1e-4
    blurred = np.stack([cv2.blur(np.minimum(d, 20), (3, 3)).astype(np.uint8) for d in dist])
    eq = np.stack([cv2.equalizeHist(b) for b in blurred])
    assert np.array_equal(sp.equalize_hist(torch.from_numpy(blurred).long()).numpy(), eq)
    const = np.full((1, 5, 5), 7, np.uint8)
    assert np.array_equal(sp.equalize_hist(torch.from_numpy(const).long()).numpy(), cv2.equalizeHist(const[0])[None])
    ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)
    ref = np.stack([layer * cv2.blur(cv2.filter2D(e, cv2.CV_8U, ker), (3, 3)).astype(np.float32)
                    for layer, e in zip(u8, eq)])
    got = sp.water_rims(torch.from_numpy(layers)).numpy()
    # the chamfer's last bits (fixed point vs OpenCV 5's float) flip a few truncations after the first blur
    assert (np.abs(got - ref) > 1e-3).mean() < 0.01


def _spatter_oracle(rng: np.random.Generator, img: np.ndarray, c) -> np.ndarray:
    """make_cifar_c.py / make_imagenet_c.py spatter on one uint8 RGB image (colour added to channels 0, 1, 2)."""
    from skimage.filters import gaussian
    x = img.astype(np.float32) / 255.0
    layer = gaussian(rng.normal(size=x.shape[:2], loc=c[0], scale=c[1]), sigma=c[2])
    layer[layer < c[3]] = 0
    if c[5] == 0:
        layer = (layer * 255).astype(np.uint8)
        dist = cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)
        dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, ker), (3, 3)).astype(np.float32)
        m = layer * dist
        m = m / m.max() * c[4]
        return _save(x + m[..., None] * np.array([175, 238, 238]) / 255.0)
    m = gaussian(np.where(layer > c[3], 1, 0).astype(np.float32), sigma=c[4])
    m[m < 0.8] = 0
    return _save(x * (1 - m[..., None]) + m[..., None] * np.array([63, 42, 20]) / 255.0)


@pytest.mark.parametrize("params, n, size", [("cifar10", 100, 32),
                                             pytest.param("imagenet", 3, 224, marks=pytest.mark.slow)])
@pytest.mark.parametrize("severity", [1, 3, 4, 5])
def test_spatter_statistics_match_the_script(severity, params, n, size):
    x8 = _natural_uint8(n, size, seed=severity)
    x = x8 / 255.0
    c = LEVELS[params]["spatter"][severity - 1]
    rng = np.random.default_rng(severity)
    ref = np.stack([_spatter_oracle(rng, img, c) for img in x8]) - x
    got = _to_numpy(corrupt(_to_torch(x8), "spatter", severity, seed=4, params=params)) - x
    # measured: mean, std and mean |change| within 3 % (CIFAR 200 images) and 10 % (ImageNet, 6 images)
    for f in (np.mean, np.std, lambda d: np.abs(d).mean()):
        assert _close(f(got), f(ref), rel=0.15 if params == "imagenet" else 0.1), (f(got), f(ref))


@pytest.mark.slow
def test_spatter_imagenet_matches_imagecorruptions(ic):
    from PIL import Image
    x8 = _natural_uint8(3, 224, seed=9)
    x = x8 / 255.0
    for severity in (2, 5):
        np.random.seed(severity)
        ref = np.stack([np.uint8(ic.spatter(Image.fromarray(img), severity)) / 255.0 for img in x8]) - x
        got = _to_numpy(corrupt(_to_torch(x8), "spatter", severity, seed=5, params="imagenet")) - x
        assert _close(got.std(), ref.std(), rel=0.15) and _close(got.mean(), ref.mean(), rel=0.15)


# ---- shared behaviour ----------------------------------------------------------------------------------------------

RANDOM = ("speckle_noise", "frost", "spatter")


@pytest.mark.parametrize("params", ["cifar10", "imagenet"])
@pytest.mark.parametrize("name", RANDOM)
def test_seeded_keep_dtype_and_any_size(name, params):
    x = _to_torch(_natural_uint8(2, 32))
    a = corrupt(x, name, 2, seed=0, params=params)
    assert torch.equal(a, corrupt(x, name, 2, seed=0, params=params)) and a.shape == x.shape
    assert a.dtype == torch.float32 and corrupt(x.double(), name, 2, params=params).dtype == torch.float64
    assert torch.equal(x, _to_torch(_natural_uint8(2, 32)))  # the input is not modified
    for shape in ((1, 3, 5, 6), (2, 3, 16, 16), (1, 3, 130, 70)):  # tiny, digits, larger than CIFAR textures
        out = corrupt(torch.rand(*shape), name, 5, params=params)
        assert out.shape == shape and bool(torch.isfinite(out).all())


def test_spatter_all_zero_layer_leaves_the_image_unchanged():
    from ctta.streams.corruptions import ImageRng
    from ctta.streams.corruptions.spatter import spatter
    x = torch.rand(2, 3, 8, 8)
    level = (0.0, 1e-6, 1.0, 0.5, 0.5, 0)  # nothing reaches the threshold: the scripts would divide 0 by 0
    assert torch.equal(spatter(x, level, ImageRng(0, torch.arange(2))), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", RANDOM)
def test_runs_on_the_gpu_like_on_the_cpu(name):
    x = _to_torch(_natural_uint8(16, 32))
    cpu = corrupt(x, name, 5, seed=1)
    gpu = corrupt(x.cuda(), name, 5, seed=1).cpu()
    assert (gpu - cpu).abs().mean() < 1 / 255
