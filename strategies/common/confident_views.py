"""Test-time views of one image and the confident-view selection shared by TPT and VTE.

TPT (Shu et al., NeurIPS 2022) and VTE (Döbler et al., CVPR 2025) both look at the image itself plus random views of
it and keep the ``p`` share of views whose softmax entropy is lowest (the reference benchmark's
``select_confident_samples``, mariodoebler/test-time-adaptation@8b2ed63 ``methods/tpt.py`` / ``methods/vte.py``).
The views are drawn batched on the device (``augmix.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .augmix import augmix_views, preaugment


def entropy(logits: Tensor) -> Tensor:
    """Per-row softmax entropy."""
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


def select_confident(logits: Tensor, share: float) -> Tensor:
    """Indices of the int(N * share) rows of lowest entropy, most confident first."""
    return torch.argsort(entropy(logits), descending=False)[:int(len(logits) * share)]


def views_with_original(x: Tensor, n_views: int, g: torch.Generator, augmix: bool) -> Tensor:
    """The image (1 x C x H x W) and ``n_views - 1`` random views of it: crop + flip (+ AugMix), original first."""
    if n_views <= 1:
        return x
    rest = augmix_views(x, n_views - 1, g) if augmix else preaugment(x.repeat_interleave(n_views - 1, dim=0), g)
    return torch.cat([x, rest])


__all__ = ["entropy", "select_confident", "views_with_original"]
