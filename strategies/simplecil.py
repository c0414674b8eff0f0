"""SimpleCIL: a frozen (pre-trained) backbone with a nearest-class-mean cosine head.

Zhou, Cai, Ye, Zhan, Liu; "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need" (IJCV 2024; code: github.com/zhoudw-zdw/RevisitingCIL, LAMDA-PILOT). The backbone is
never trained; each class's prototype is the mean of its training features, and the classifier is the cosine
similarity between a feature and each prototype (the prototypes replace the weights of a cosine linear head).
Running per-class feature sums make the prototypes exact in a stream, whatever the batching.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import penultimate_features
from ctta.backbones.peft import freeze
from ctta.hparams import Positive

from .base import register
from .common.incremental import IncrementalStrategy, num_outputs


@register
class SimpleCIL(IncrementalStrategy):
    """Prototype (class-mean) cosine classifier on frozen features; ``scale`` multiplies the cosines (confidences
    only, not the argmax)."""

    name = "simplecil"

    def __init__(self, model: nn.Module, scale: Positive = 1.0, seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        freeze(self.model)
        self.model.eval()
        self.scale = float(scale)
        n_cls = num_outputs(model)
        self.register_buffer("class_sums", torch.zeros(0))
        self.register_buffer("class_counts", torch.zeros(n_cls))
        self._n_cls = n_cls
        self.remember_initial_state()

    def _features(self, x: Tensor) -> Tensor:
        self.model.eval()
        with torch.no_grad():
            return penultimate_features(self.model, x).float()

    def prototype_logits(self, f: Tensor) -> Tensor:
        if self.class_sums.numel() == 0:
            return torch.zeros(f.shape[0], self._n_cls, device=f.device)
        protos = self.class_sums / self.class_counts.clamp_min(1).unsqueeze(1)
        return self.scale * F.normalize(f, dim=1) @ F.normalize(protos, dim=1).T

    def logits(self, x: Tensor) -> Tensor:
        return self.prototype_logits(self._features(x))

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        f = self._features(x)
        out = self.mask(self.prototype_logits(f))
        if self.class_sums.numel() == 0:
            self.class_sums = torch.zeros(self._n_cls, f.shape[1], device=f.device)
        self.class_sums.index_add_(0, y, f)
        self.class_counts.index_add_(0, y, torch.ones_like(y, dtype=self.class_counts.dtype))
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        key = prefix + "class_sums"
        if key in state_dict and state_dict[key].shape != self.class_sums.shape:
            self.class_sums = torch.empty_like(state_dict[key], device=self.class_counts.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
