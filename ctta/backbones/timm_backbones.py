"""Any timm model as a backbone: built offline from its architecture, normalised with its pretrained config."""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

from torch import nn

from ..errors import ConfigError, CttaError
from .spec import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


def is_timm_model(name: str) -> bool:
    """Whether timm knows ``name`` (an architecture, optionally with a ``.tag`` naming its pretrained weights)."""
    import timm

    return bool(timm.is_model(name))


def timm_model_names() -> List[str]:
    """All architecture names timm can build."""
    import timm

    return list(timm.list_models())


def input_size(net: nn.Module) -> Optional[Tuple[int, int]]:
    """(H, W) a timm model must be fed (its pretrained config's ``input_size`` when ``fixed_input_size``: ViTs),
    or None when any size works (CNNs)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if not cfg.get("fixed_input_size") or not cfg.get("input_size"):
        return None
    return int(cfg["input_size"][-2]), int(cfg["input_size"][-1])


def create_timm(name: str, num_classes: Optional[int] = None, pretrained: bool = False,
                **kwargs: Any) -> Tuple[nn.Module, Tuple[float, ...], Tuple[float, ...]]:
    """``timm.create_model`` plus the mean/std of its pretrained config (ImageNet's when it names none)."""
    import timm

    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if pretrained:
        log.info("fetching pretrained weights for timm model %s from the hub (needs internet)", name)
    try:
        net = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ConfigError(f"invalid option for timm model {name!r}: {e}") from None
    except Exception as e:
        if not pretrained:
            raise
        raise CttaError(f"could not download the pretrained weights of timm model {name!r} "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                        f"without internet access, pass a local checkpoint with --weights PATH") from None
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    log.debug("timm model %s: mean %s std %s", name, mean, std)
    return net, mean, std
