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
    """(H, W) a timm model must be fed, or None when any size works (CNNs, dynamic-size ViTs): the image size its
    patch embedding was built for when that embedding is strict (a ViT at 224 or 384 px, or built with
    ``img_size=32``), as the model itself would refuse any other."""
    embed = getattr(net, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if embed is None or size is None or not getattr(embed, "strict_img_size", False) \
            or getattr(embed, "dynamic_img_pad", False) or getattr(net, "dynamic_img_size", False):
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


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
