"""The backbone registry and the record each entry holds: a factory plus the input normalisation it expects."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

from torch import nn

from ..registry import Registry

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered network (``factory(num_classes=..., **kwargs)``) and the mean/std it expects."""

    factory: Callable[..., nn.Module]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    num_classes: int = 10


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(name: str, mean: Sequence[float], std: Sequence[float],
                      num_classes: int = 10) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a network factory under ``name``; its docstring's first paragraph is the help text."""

    def _add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BACKBONES.register(name, BackboneSpec(factory, tuple(mean), tuple(std), num_classes),
                           help=factory.__doc__ or "")
        return factory

    return _add
