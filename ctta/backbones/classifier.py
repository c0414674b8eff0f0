"""A network plus its input normalisation: streams emit images in [0, 1] and every backbone takes them as they are.

Feature access (for output-level methods such as LAME or LSA): :meth:`Classifier.forward_features` gives the
penultimate features (N x D, pooled, before the linear head), :meth:`Classifier.forward_head` maps them to logits,
and :meth:`Classifier.features_and_logits` gives both from one forward. :func:`features_and_logits` does the same
for any module exposing the methods (the tests' tiny nets), with a one-line error otherwise.
"""
from __future__ import annotations

import inspect
from typing import Sequence, Tuple

import torch
from torch import nn

from ..errors import UnsupportedError


class LinearHeadNet(nn.Module):
    """A network whose logits are one linear layer (attribute ``head_attr``) over ``forward_features``' output.

    Subclasses define ``forward_features``; the feature API the strategies use (``feature_dim``, ``forward_head``,
    ``forward``) follows from it once, here.
    """

    head_attr = "linear"

    @property
    def feature_dim(self) -> int:
        return getattr(self, self.head_attr).in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_attr)(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are non-persistent buffers, so they never enter a state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} differ in length")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, " \
               f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())}"


class Classifier(nn.Module):
    """Images in [0, 1] (NCHW) -> logits: ``net(normalize(x))``; the state dict holds only ``net.*`` keys.

    Feature API (one forward, same result as ``forward``: ``forward_head(forward_features(x)) == forward(x)``):

    * ``forward_features(x)`` -> penultimate features, N x D (globally pooled, flattened, before the classifier);
    * ``forward_head(features)`` -> logits, N x num_classes (the final linear layer);
    * ``features_and_logits(x)`` -> ``(features, logits)``;
    * ``feature_dim`` -> D.

    The registered CIFAR ResNets, WideResNet and tiny CNN define ``forward_features``/``forward_head`` themselves;
    timm models use timm's ``forward_features`` + ``forward_head(pre_logits=True)`` (pooling and any pre-logits
    norm) and ``get_classifier()``.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 name: str = "") -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
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
