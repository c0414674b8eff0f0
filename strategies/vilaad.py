"""ViLAaD: AaD with a vision-and-language model's predictions as the attraction targets (Tarashima, Shu, Tagawa;
arXiv 2503.23529, 2025).

ViLAaD generalises AaD's attraction: instead of the neighbours' banked predictions of the model being adapted, each
sample is attracted to the predictions of a frozen ViL model (CLIP zero-shot) on its neighbours, the neighbours
still found in the adapted model's feature space; the dispersion term is AaD's. So both the source model (through
the features, the initial predictions and the dispersion) and the ViL model (through the targets) initialise the
adaptation. Per batch:
  1. the adapted model in train mode: features f, predictions p; the frozen teacher (eval mode, no gradient):
     zero-shot probabilities q = softmax(logit_scale * cos(image, class texts));
  2. bank at the batch's slots: normalised f, p (as AaD) and q;
  3. K nearest neighbours of each sample in the feature bank (itself excluded);
  4. loss = -mean_i sum_{j in N_i} <p_i, q_j>  +  lambda * mean_i sum_{j in batch, j != i} <p_i, p_j>,
     with N_i = the K neighbours plus the sample itself (``include_self``), lambda as in AaD.

Choices the paper summary leaves open, and ours:
- ``include_self`` (default true): the sample's own ViL prediction is among its targets. In AaD a sample's own
  prediction is a trivial target, so AaD excludes it; a ViL prediction is not trivial, and it is the most direct
  "initialisation by the ViL model". ``include_self: false`` gives strictly the neighbours' ViL predictions.
- The teacher's predictions are recomputed for every batch (the teacher is frozen and the images are the same, so
  they equal banked ones) and stored in the bank so neighbours' targets need no teacher forward.
- Hyperparameters, optimiser, schedules, bank and parameter groups: AaD's (see strategies/aad.py), K = 5; the bank
  starts empty and fills as samples are seen (AaD's ``bank_init: lazy``: a source-model pre-fill would leave the
  teacher's table of the unseen samples empty).
- The teacher is not part of the strategy's state dict (it never changes; a ViT-B/32 would bloat every
  checkpoint); it moves with ``.to()`` and always stays in eval mode. Its class order must be the model's
  (``class_names`` of the teacher backbone, in the source model's output order).
- ViLAaD++ (prompt tuning of the ViL model, extra objectives) is not implemented.

``teacher`` is a module (e.g. ``ctta.backbones.create("clip", num_classes=10, model="ViT-B-32",
pretrained_tag="openai", class_names=[...])``), a backbone name, or a dict of ``ctta.backbones.create`` arguments
(``name`` plus options; ``num_classes`` defaults to the model's).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, Positive

from .aad import AaD
from .base import register


def build_teacher(teacher: Union[None, str, Dict[str, Any], nn.Module], num_classes: Optional[int]) -> nn.Module:
    """The frozen ViL teacher from a module, a backbone name or a dict of ``ctta.backbones.create`` arguments."""
    if teacher is None:
        raise ConfigError("vilaad needs a ViL teacher: teacher={name: clip, model: ViT-B-32, pretrained_tag: openai, "
                          "class_names: [...]} or a module")
    if isinstance(teacher, nn.Module):
        net = teacher
    else:
        from ctta.backbones import create

        spec = {"name": teacher} if isinstance(teacher, str) else dict(teacher)
        if "name" not in spec:
            raise ConfigError(f"vilaad teacher needs a backbone name, got {teacher!r}")
        spec.setdefault("num_classes", num_classes)
        net = create(**spec)
    n = getattr(net, "num_classes", None)
    if num_classes is not None and n is not None and int(n) != int(num_classes):
        raise ConfigError(f"vilaad: the teacher predicts {n} classes, the model {num_classes}")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@register
class ViLAaD(AaD):
    """AaD whose attraction targets are a frozen CLIP teacher's zero-shot predictions on the bank neighbours."""

    name = "vilaad"

    def __init__(self, model: nn.Module, teacher: Union[None, str, Dict[str, Any], nn.Module] = None,
                 include_self: bool = True, lr: Positive = 1e-3, backbone_lr_mult: NonNegative = 0.1,
                 momentum: Momentum = 0.9, weight_decay: NonNegative = 1e-3, nesterov: bool = True, k: Count = 5,
                 alpha: NonNegative = 1.0, beta: NonNegative = 5.0, lr_gamma: NonNegative = 10.0,
                 lr_power: NonNegative = 0.75, max_iter: Optional[Count] = None, key_tol: NonNegative = 1e-3,
                 seed: int = 0) -> None:
        frozen = build_teacher(teacher, getattr(model, "num_classes", None))
        super().__init__(model, lr=lr, backbone_lr_mult=backbone_lr_mult, momentum=momentum,
                         weight_decay=weight_decay, nesterov=nesterov, k=k, alpha=alpha, beta=beta, lr_gamma=lr_gamma,
                         lr_power=lr_power, max_iter=max_iter, key_tol=key_tol, bank_init="lazy", seed=seed)
        # kept outside the module tree: never in the state dict, never in the optimiser
        object.__setattr__(self, "_teacher_box", [frozen])
        self.include_self = bool(include_self)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher_box[0]

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .half() reach the teacher too
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "ViLAaD":
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_probs(self, x: Tensor) -> Tensor:
        """The frozen ViL model's zero-shot class probabilities (B x C)."""
        self.teacher.eval()
        return self.teacher(x).float().softmax(dim=1)

    def attraction_targets(self, x: Tensor, slot: Tensor, index: Tensor, mask: Tensor) -> tuple:
        q = self.teacher_probs(x)
        self.bank.write("vil", slot, q)
        targets = self.bank.table("vil")[index]  # B x K x C
        if self.include_self:
            targets = torch.cat([q.unsqueeze(1), targets], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return targets, mask
