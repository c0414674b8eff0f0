"""Backbones: registered CIFAR networks, a tiny CNN, and any timm model, each wrapped with its input normalisation."""
from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path
from typing import Any, List, Optional

from ..errors import ConfigError, UnknownNameError
from . import cifar_resnet, tiny_cnn, wideresnet  # noqa: F401  (register the built-in backbones)
from . import clip  # noqa: F401  (CLIP zero-shot backbones; open_clip is imported lazily)
from . import resnet18_reduced  # noqa: F401  (the reduced ResNet-18 of online continual learning)
from .checkpoint import existing_checkpoint, load_checkpoint
from .classifier import Classifier, Normalize
from .spec import BACKBONES, BackboneSpec, register_backbone
from .timm_backbones import create_timm, input_size, is_timm_model, timm_model_names

__all__ = ["BACKBONES", "BackboneSpec", "Classifier", "Normalize", "check", "create", "list_backbones", "load_checkpoint",
           "register_backbone"]

log = logging.getLogger(__name__)


def create(name: str, num_classes: Optional[int] = None, weights: str | Path | None = None,
           pretrained: bool = False, **kwargs: Any) -> Classifier:
    """Build backbone ``name`` (registered or any timm model) as a :class:`Classifier` in eval mode.

    ``weights`` is a local checkpoint loaded strictly; ``pretrained`` downloads timm's weights (needs internet).
    """
    pretrained = bool(pretrained)
    if name in BACKBONES:
        spec = BACKBONES.get(name)
        if pretrained:
            raise ConfigError(f"backbone {name!r} has no downloadable weights; pass a local checkpoint with "
                              f"--weights PATH")
        n_cls = spec.num_classes if num_classes is None else int(num_classes)
        try:
            inspect.signature(spec.factory).bind(num_classes=n_cls, **kwargs)
        except TypeError as e:
            raise ConfigError(f"invalid option for backbone {name!r}: {e}") from None
        net = spec.factory(num_classes=n_cls, **kwargs)
        mean, std, size = spec.mean, spec.std, None
    elif is_timm_model(name):
        net, mean, std = create_timm(name, num_classes=num_classes, pretrained=pretrained, **kwargs)
        n_cls = int(getattr(net, "num_classes", num_classes or 0))
        size = input_size(net)
    else:
        raise UnknownNameError(_unknown_message(name))
    model = Classifier(net, mean, std, n_cls, name=name, input_size=size)
    if weights not in (None, ""):
        load_checkpoint(model.net, weights, backbone=name)
    log.debug("built backbone %s (%d classes, %.2fM parameters)", name, n_cls,
              sum(p.numel() for p in model.parameters()) / 1e6)
    return model.eval()


def check(name: Optional[str], weights: str | Path | None = None, **_: Any) -> None:
    """The cheap facts of a backbone spec, checked before any data is read: a known name, a weights file present."""
    if not name:
        raise ConfigError("no backbone given: use --backbone NAME (see `ctta-bench list`)")
    if name not in BACKBONES and not is_timm_model(name):
        raise UnknownNameError(_unknown_message(name))
    if weights not in (None, ""):
        existing_checkpoint(weights)


def list_backbones(include_timm: bool = False) -> List[str]:
    """The registered backbone names (plus every timm architecture when ``include_timm``)."""
    names = BACKBONES.names()
    return names + sorted(set(timm_model_names()) - set(names)) if include_timm else names


def _unknown_message(name: str) -> str:
    close = (difflib.get_close_matches(str(name), BACKBONES.names(), n=1, cutoff=0.6)  # ours first
             or difflib.get_close_matches(str(name), timm_model_names(), n=1, cutoff=0.6))
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"unknown backbone {name!r}.{hint} Registered backbones: {', '.join(BACKBONES.names())}; "
            f"any timm model name also works (e.g. resnet50, vit_base_patch16_224; see timm.list_models())")
