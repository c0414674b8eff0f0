"""Learning without Forgetting (LwF), class-incremental.

Li, Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017 (arXiv 1606.09282). Reference code:
github.com/aimagelab/mammoth@e75a491 (``models/lwf.py`` ``Lwf``); hyperparameters from its
``models/config/lwf.yaml`` (seq-cifar10) and ``Lwf.get_parser`` defaults, see ``configs/strategies/lwf.yaml``.

The algorithm, per session after the first:

1. warm-up: with the body frozen (eval mode, features without gradient), the new classes' head rows are trained
   by SGD (lr, no momentum, no weight decay) on the cross-entropy over the new classes, one pass over the
   session's segment (all its epochs, as the reference's ``n_epochs`` passes); the other rows do not move;
2. the previous model (the weights as they are now: old rows and body as the last session left them) is frozen;
3. training: per batch ``CE(f(x), y) + alpha * L_old``, with ``L_old = -mean_x sum_o y'_o log yhat'_o`` over the
   old classes, ``y' = smooth(softmax(f_prev(x)_old))`` and ``yhat' = smooth(softmax(f(x)_old))``,
   ``smooth(p)_o = p_o^(1/T) / sum_j p_j^(1/T)`` (the paper's Eq. 2 with temperature ``T``).

The reference records the previous model's logits once per image before training (eval mode, after the warm-up,
on the images without augmentation) and reads them back per batch; here the frozen copy is evaluated on each
batch in eval mode, the same numbers (no augmentation in this engine; the warm-up moves only rows the
distillation does not read). Cross-entropies over the classes seen so far (``mask_unseen``, as the reference's
``outputs[:, :n_seen_classes]``); a fresh SGD per session, as Mammoth's ``meta_begin_task``. The warm-up needs
the session's segment, which the engine's ``segment_start`` gives; ``learn`` called outside the engine skips it.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import last_linear
from ctta.errors import UnsupportedError
from ctta.hparams import Momentum, NonNegative, Positive

from .base import register
from .common.incremental import mask_logits
from .finetune import Finetune

log = logging.getLogger(__name__)


def smooth(probs: Tensor, temperature: float) -> Tensor:
    """LwF's temperature-scaled probabilities: ``p^(1/T)`` renormalised over the last dimension (paper, Eq. 2)."""
    powered = probs.pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def lwf_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``-mean_x sum_o y'_o log yhat'_o`` between the smoothed softmaxes of ``teacher`` (target) and ``student``
    logits (both N x old classes); the target carries no gradient."""
    target = smooth(F.softmax(teacher.detach(), dim=1), temperature)
    pred = smooth(F.softmax(student, dim=1), temperature)
    return -torch.mean(torch.sum(target * torch.log(pred), dim=1))


@register
class LwF(Finetune):
    """Fine-tuning plus distillation towards the previous model's outputs on the old classes, after a head warm-up."""

    name = "lwf"
    settings = frozenset({"class_incremental", "few_shot_class_incremental", "online_class_incremental"})

    def __init__(self, model: nn.Module, lr: Positive = 0.03, momentum: Momentum = 0.0,
                 weight_decay: NonNegative = 0.0, alpha: NonNegative = 0.5, temperature: Positive = 2.0,
                 warmup: bool = True, mask_unseen: bool = True, seed: int = 0) -> None:
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, mask_unseen=mask_unseen,
                         seed=seed)
        self.lr = float(lr)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.warmup = bool(warmup)
        if self.warmup and not (hasattr(model, "forward_features") and hasattr(model, "forward_head")
                                and last_linear(model) is not None):
            raise UnsupportedError(f"lwf: the warm-up needs forward_features / forward_head and a linear head; "
                                   f"{type(model).__name__} has not (warmup=false runs without it)")
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.register_buffer("old", torch.zeros(self.seen.num_classes, dtype=torch.bool))  # seen before the session
        self._old_index: Optional[Tensor] = None  # positions of ``old`` (set once per session, host side)
        self.remember_initial_state()

    # --- the previous model ---------------------------------------------------------------------------------
    def old_index(self) -> Optional[Tensor]:
        """The old classes' output positions (None before the second session)."""
        if self._old_index is None and bool(self.old.any()):
            self._old_index = self.old.nonzero().squeeze(1)
        return self._old_index

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        self._old_index = None

    def begin_session(self, session: int) -> None:
        """A fresh SGD; from the second session on, freeze the current weights as the previous model."""
        self.optimizer.state.clear()
        self._old_index = None
        if session > 0:
            self.teacher.load_state_dict(self.model.state_dict())
            self.old.copy_(self.seen.seen)  # learn() marks the first batch's labels after this hook

    # --- warm-up of the new head rows -----------------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        """Before a ``train`` segment after the first session: the warm-up of the new classes' head rows."""
        if getattr(segment, "kind", None) == "train" and self.warmup and bool(self.seen.seen.any()):
            self.warm_up(segment)

    def warm_up(self, segment: Any) -> None:
        """One pass over ``segment``: SGD on the head only, cross-entropy over the segment's not-yet-seen classes,
        features from the frozen body in eval mode."""
        device = self.seen.seen.device
        classes = (getattr(segment, "meta", None) or {}).get("classes")
        new = torch.zeros_like(self.seen.seen)
        if classes is None:
            for _, y in segment.batches(device):
                new.index_fill_(0, y.long(), True)
        else:
            new[torch.as_tensor(list(classes), dtype=torch.long, device=device)] = True
        new &= ~self.seen.seen
        if not bool(new.any()):
            return
        head = last_linear(self.model)
        opt = torch.optim.SGD(head.parameters(), lr=self.lr)
        self.model.eval()
        for x, y in segment.batches(device):
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                feats = self.model.forward_features(x)
            with torch.enable_grad():
                loss = F.cross_entropy(mask_logits(self.model.forward_head(feats), new), y)
                loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    # --- training -------------------------------------------------------------------------------------------
    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        idx = self.old_index()
        if idx is None:
            return self.sgd_step(x, y)
        self.teacher.eval()
        with torch.no_grad():
            prev = self.teacher(x)[:, idx]
        return self.sgd_step(x, y, lambda z: F.cross_entropy(z, y)
                             + self.alpha * lwf_distillation(z[:, idx], prev, self.temperature))
