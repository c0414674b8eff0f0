"""The 15 common corruptions of CIFAR-10-C / ImageNet-C, generated on the device for batches of NCHW float images.

Formulas and severity constants follow Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019: the generation scripts ``ImageNet-C/create_c/make_cifar_c.py``
(``params="cifar10"``) and ``ImageNet-C/create_c/make_imagenet_c.py`` (``params="imagenet"``) of
github.com/hendrycks/robustness; the ImageNet constants equal those of the ``imagecorruptions`` package
(github.com/bethgelab/imagecorruptions, ``imagecorruptions/corruptions.py``). The scripts save ``np.uint8`` of
``clip(x, 0, 1) * 255``, so outputs are truncated to the 256-level grid by default, as in the released files.

Adding a corruption is one decorated function: ``@register_corruption(name, cifar10=(5 levels), imagenet=(5
levels))`` over ``fn(x, level, rng) -> Tensor`` (``rng`` an :class:`~.rng.ImageRng`: per-image draws, so an image's
corruption does not depend on its batch); clipping, quantisation, seeding and checks are shared here. The
corruptions themselves live by family in ``noise``, ``blur``, ``weather`` and ``digital``.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Literal, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ctta.errors import ConfigError, CttaError
from ctta.registry import Registry
from ctta.seeding import stable_seed

from .rng import ImageRng, content_keys

log = logging.getLogger(__name__)

CORRUPTION_ORDER: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# The four extra corruptions of the original release, in its order.
EXTRA_ORDER: Tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
PARAM_SETS: Tuple[str, ...] = ("cifar10", "imagenet")
_PARAM_ALIASES = {"cifar100": "cifar10"}  # CIFAR-100-C was made with the CIFAR-10 script's constants
SEVERITIES = 5
# Truncation tolerance on the 0..255 scale: float32 gives k - 1 ulp for an unchanged value k / 255.
_QUANT_EPS = 1e-3

CorruptionFn = Callable[[Tensor, Any, ImageRng], Tensor]


@dataclass(frozen=True)
class Corruption:
    """A registered corruption: its function (None until implemented) and its 5 levels per parameter set."""

    name: str
    fn: Optional[CorruptionFn]
    levels: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.fn is not None


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def register_corruption(name: str, *, cifar10: Sequence[Any], imagenet: Sequence[Any]) -> Callable[[CorruptionFn],
                                                                                                 CorruptionFn]:
    """Decorator registering ``fn(x, level, rng)`` under ``name`` with its 5 levels per parameter set."""
    levels = {"cifar10": tuple(cifar10), "imagenet": tuple(imagenet)}
    for key, lv in levels.items():
        if len(lv) != SEVERITIES:
            raise ValueError(f"corruption {name!r}: {key} needs {SEVERITIES} levels, got {len(lv)}")

    def deco(fn: CorruptionFn) -> CorruptionFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        CORRUPTIONS.register(name, Corruption(name, fn, levels), help=doc[0] if doc else name)
        return fn

    return deco


def generated_corruptions() -> Tuple[str, ...]:
    """The corruptions :func:`corrupt` can generate: the standard 15 in order, then the extras, then any others."""
    known = CORRUPTION_ORDER + EXTRA_ORDER
    names = known + tuple(n for n in CORRUPTIONS.names() if n not in known)
    return tuple(n for n in names if n in CORRUPTIONS and CORRUPTIONS.get(n).available)


def corruption_seed(seed: int, corruption: str, severity: int) -> int:
    """A 63-bit generator seed from (seed, corruption, severity), stable across processes (unlike ``hash``)."""
    return stable_seed(seed, corruption, severity)


def quantize_8bit(x: Tensor) -> Tensor:
    """Truncate [0, 1] images to the 256-level grid (``floor(x * 255) / 255``), as ``np.uint8`` did in the scripts."""
    return torch.floor(x * 255.0 + _QUANT_EPS).clamp_(0.0, 255.0).div_(255.0)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise ConfigError(f"corrupt() needs a torch tensor of images, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ConfigError(f"corrupt() needs RGB images of shape N x 3 x H x W, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ConfigError(f"corrupt() needs float images in [0, 1], got dtype {images.dtype} "
                          f"(divide uint8 images by 255)")
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):
            raise ConfigError(f"corrupt() needs float images in [0, 1], got values from {lo:.4g} to {hi:.4g} "
                              f"(dtype {images.dtype})")


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= SEVERITIES:
        raise ConfigError(f"severity must be an integer from 1 to {SEVERITIES}, got {severity!r}")
    return severity


def _param_key(params: str) -> str:
    key = _PARAM_ALIASES.get(params, params)
    if key not in PARAM_SETS:
        raise ConfigError(f"corruption parameters must be one of {', '.join(PARAM_SETS)}, got {params!r}")
    return key


def corrupt(images: Tensor, corruption: str, severity: int, seed: int = 0,
            params: Literal["cifar10", "imagenet"] = "cifar10", quantize: bool = True,
            keys: Optional[Tensor] = None) -> Tensor:
    """``corruption`` at ``severity`` (1..5) applied to NCHW float images in [0, 1], on their device.

    Deterministic for a given (seed, corruption, severity) and image key, on any device and in any batch: the key
    is a hash of the image's 8-bit content unless ``keys`` (one integer per image, e.g. dataset indices) is given.
    ``quantize`` truncates to 8 bits as the released files.
    """
    spec = CORRUPTIONS.get(corruption)
    _check_severity(severity)
    key = _param_key(params)
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ConfigError(f"seed must be an integer, got {seed!r}") from None
    if not spec.available:
        raise CttaError(f"corruption {corruption!r} cannot be generated yet (only "
                        f"{', '.join(generated_corruptions())}); provide the CIFAR-10-C files under --data-root")
    _check_images(images)
    if images.shape[0] == 0:
        return images.clone()
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    if keys is None:
        keys = content_keys(work)
    elif not isinstance(keys, Tensor) or keys.shape != (work.shape[0],) or keys.is_floating_point():
        raise ConfigError(f"keys must be an integer tensor with one key per image ({work.shape[0]}), got "
                          f"{tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__}")
    rng = ImageRng(corruption_seed(seed, corruption, severity), keys.to(work.device))
    level = spec.levels[key][severity - 1]
    log.debug("generating %s-%d (%s levels: %r) for %d images on %s", corruption, severity, key, level,
              work.shape[0], work.device)
    out = spec.fn(work, level, rng).clamp_(0.0, 1.0)
    if quantize:
        out = quantize_8bit(out)
    return out.to(images.dtype)
