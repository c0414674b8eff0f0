"""A network plus its input normalisation: streams emit images in [0, 1] and every backbone takes them as they are.

Feature access (for output-level methods such as LAME or LSA): :meth:`Classifier.forward_features` gives the
penultimate features (N x D, pooled, before the linear head), :meth:`Classifier.forward_head` maps them to logits,
and :meth:`Classifier.features_and_logits` gives both from one forward. :func:`features_and_logits` does the same
for any module exposing the methods (the tests' tiny nets), with a one-line error otherwise.
Spatial access (for token-based heads such as Mamba-FSCIL's scan neck): :meth:`Classifier.forward_feature_map`
gives the last feature map before global pooling (N x C x H x W); :func:`feature_map` / :func:`has_feature_map`
do the same for any module.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedError


class LinearHeadNet(nn.Module):
    """A network whose logits are one linear layer (attribute ``head_attr``) over ``forward_features``' output.

    Subclasses define ``forward_feature_map`` (the last feature map, N x C x H x W; ``forward_features`` is then its
    global average pool, flattened) or ``forward_features`` itself; the feature API the strategies use
    (``feature_dim``, ``forward_head``, ``forward``) follows from it once, here.
    """

    head_attr = "linear"

    @property
    def feature_dim(self) -> int:
        return getattr(self, self.head_attr).in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled ``forward_feature_map``, N x C."""
        fmap = getattr(self, "forward_feature_map", None)
        if fmap is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither forward_features nor "
                                      f"forward_feature_map")
        return torch.flatten(F.adaptive_avg_pool2d(fmap(x), 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_attr)(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are non-persistent buffers, so they never enter a state dict.

    With ``size`` (H, W) (a model that needs a fixed input, such as a ViT at 384 px) images of another size are
    first resized to it, bilinear with antialiasing as torchvision's ``Resize`` does on tensors.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} differ in length")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.size = tuple(int(v) for v in size) if size is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        size = f", size={self.size}" if self.size is not None else ""
        return f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, " \
               f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())}{size}"


class Classifier(nn.Module):
    """Images in [0, 1] (NCHW) -> logits: ``net(normalize(x))``; the state dict holds only ``net.*`` keys.

    Feature API (one forward, same result as ``forward``: ``forward_head(forward_features(x)) == forward(x)``):

    * ``forward_features(x)`` -> penultimate features, N x D (globally pooled, flattened, before the classifier);
    * ``forward_head(features)`` -> logits, N x num_classes (the final linear layer);
    * ``features_and_logits(x)`` -> ``(features, logits)``;
    * ``feature_dim`` -> D;
    * ``forward_feature_map(x)`` -> the last feature map before pooling, N x C x H x W (``has_feature_map`` says
      whether the net can give one). For the registered CNNs ``forward_features`` is exactly its global average
      pool; for timm CNNs it is timm's ``forward_features`` (NHWC outputs permuted), for timm ViTs the patch tokens
      (prefix tokens dropped) reshaped to the patch grid; in both the pooled features may add a head norm or use
      the class token, so they need not equal the map's mean.

    The registered CIFAR ResNets, WideResNet and tiny CNN define ``forward_features``/``forward_head`` themselves;
    timm models use timm's ``forward_features`` + ``forward_head(pre_logits=True)`` (pooling and any pre-logits
    norm) and ``get_classifier()``.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 name: str = "", input_size: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, input_size)
        self.net = net
        self.num_classes = int(num_classes)
        self.name = name or type(net).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    # --- feature access --------------------------------------------------------------------------------
    def _is_timm(self) -> bool:
        net = self.net
        head = getattr(net, "forward_head", None)
        return (hasattr(net, "pretrained_cfg") and hasattr(net, "get_classifier") and head is not None
                and "pre_logits" in inspect.signature(head).parameters)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images ``x`` in [0, 1]: N x D, pooled, before the final linear layer."""
        net = self.net
        if self._is_timm():
            return net.forward_head(net.forward_features(self.normalize(x)), pre_logits=True)
        if not hasattr(net, "forward_features") or not hasattr(net, "forward_head"):
            raise UnsupportedError(f"backbone {self.name!r} ({type(net).__name__}) exposes no penultimate features; "
                                   f"it needs forward_features(x) and forward_head(features) methods")
        return net.forward_features(self.normalize(x))

    @property
    def has_feature_map(self) -> bool:
        """True when :meth:`forward_feature_map` is available (timm models, nets with ``forward_feature_map``)."""
        return self._is_timm() or callable(getattr(self.net, "forward_feature_map", None))

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map of images ``x`` in [0, 1] before global pooling: N x C x H x W."""
        net = self.net
        if self._is_timm():
            out = net.forward_features(self.normalize(x))
            if out.dim() == 4:
                return out.permute(0, 3, 1, 2) if getattr(net, "output_fmt", "NCHW") == "NHWC" else out
            if out.dim() == 3:
                return _tokens_to_map(net, out, self.name)
            raise UnsupportedError(f"backbone {self.name!r}: timm forward_features gave shape {tuple(out.shape)}, "
                                   f"neither a feature map nor tokens")
        if not callable(getattr(net, "forward_feature_map", None)):
            raise UnsupportedError(f"backbone {self.name!r} ({type(net).__name__}) exposes no feature map; it needs "
                                   f"a forward_feature_map(x) method")
        return net.forward_feature_map(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from penultimate features (the output of :meth:`forward_features`)."""
        if self._is_timm():
            return self.net.get_classifier()(features)
        return self.net.forward_head(features)

    def features_and_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)`` of ``x`` from one forward."""
        f = self.forward_features(x)
        return f, self.forward_head(f)

    @property
    def feature_dim(self) -> int:
        """D, the width of the penultimate features."""
        if self._is_timm():
            return int(self.net.num_features)
        return int(getattr(self.net, "feature_dim"))


def features_and_logits(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of any model with the feature API (a :class:`Classifier`, or a bare module with
    ``features_and_logits`` or ``forward_features``/``forward_head``); a one-line error for one without."""
    if hasattr(model, "features_and_logits"):
        return model.features_and_logits(x)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        f = model.forward_features(x)
        return f, model.forward_head(f)
    raise UnsupportedError(f"model {type(model).__name__} exposes no penultimate features; wrap it in "
                           f"ctta.backbones.Classifier or give it forward_features(x) and forward_head(features)")


def _tokens_to_map(net: nn.Module, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """ViT tokens (N, prefix + H*W, D) -> patch-token map (N, D, H, W); the grid from ``patch_embed.grid_size`` or a
    square number of patch tokens."""
    patches = tokens[:, int(getattr(net, "num_prefix_tokens", 0)):]
    grid = getattr(getattr(net, "patch_embed", None), "grid_size", None)
    if grid is None or int(grid[0]) * int(grid[1]) != patches.shape[1]:
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise UnsupportedError(f"backbone {name!r}: cannot lay its {patches.shape[1]} patch tokens out on a grid")
        grid = (side, side)
    n, _, d = patches.shape
    return patches.transpose(1, 2).reshape(n, d, int(grid[0]), int(grid[1]))


def has_feature_map(model: nn.Module) -> bool:
    """Whether :func:`feature_map` works for ``model`` (a :class:`Classifier` that can give one, or a bare module
    with ``forward_feature_map``)."""
    flag = getattr(model, "has_feature_map", None)
    if isinstance(flag, bool):
        return flag
    return callable(getattr(model, "forward_feature_map", None))


def feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map before global pooling (N x C x H x W) of any model with ``forward_feature_map``; a
    one-line error for one without."""
    fn = getattr(model, "forward_feature_map", None)
    if not callable(fn):  # a Classifier has the method and raises its own one-line error for a net without a map
        raise UnsupportedError(f"model {type(model).__name__} exposes no feature map; wrap a CNN in "
                               f"ctta.backbones.Classifier or give it forward_feature_map(x)")
    return fn(x)


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled penultimate features of ``x``: ``model.forward_features`` when it has one, else
    :func:`features_and_logits` (same one-line error for a model without the feature API)."""
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    return features_and_logits(model, x)[0]


def last_linear(model: nn.Module) -> Optional[nn.Linear]:
    """The last ``nn.Linear`` among ``model``'s modules (its classifier head when it has no explicit one), or None."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def restrict_outputs(model: nn.Module, classes: Sequence[int]) -> nn.Module:
    """Keep only outputs ``classes`` of ``model`` (in that order) by cutting its last linear layer to those rows.

    For a linear head this equals selecting the logits after the full forward (how the mariodoebler benchmark
    masks ImageNet-R / -A to their 200 classes), and the model keeps its feature API. In place; returns ``model``.
    """
    head = last_linear(model)
    idx = [int(c) for c in classes]
    if head is None:
        raise ConfigError("this stream uses a subset of the model's classes, but the backbone has no final linear "
                          "layer to restrict")
    if not idx or min(idx) < 0 or max(idx) >= head.out_features:
        raise ConfigError(f"the stream's classes index outputs up to {max(idx, default=-1)}, but the backbone has "
                          f"{head.out_features}; build it with the full label space (e.g. 1000 for ImageNet)")
    rows = torch.tensor(idx, device=head.weight.device)
    head.weight = nn.Parameter(head.weight.detach()[rows].clone())
    if head.bias is not None:
        head.bias = nn.Parameter(head.bias.detach()[rows].clone())
    head.out_features = len(idx)
    if hasattr(model, "num_classes"):
        model.num_classes = len(idx)
    net = getattr(model, "net", None)
    if net is not None and hasattr(net, "num_classes"):
        net.num_classes = len(idx)
    return model
