"""CoTTA: continual test-time domain adaptation (Wang, Fink, Van Gool, Dai; CVPR 2022).

Algorithm (per test batch x), following the paper and the official code (qinenergy/cotta, ``cifar/cotta.py``):
  1. student logits on x; anchor (frozen source model) confidence on x; teacher logits on x;
  2. if the anchor's mean max-probability is below ``ap``, the teacher's prediction is the mean over ``views``
     augmented copies of x, else the teacher's plain prediction (augmentation-averaged pseudo-label);
  3. update the student by minimising the cross-entropy between student and teacher predictions (all weights);
  4. teacher <- EMA of the student with momentum ``mt``;
  5. stochastic restore: every weight element returns to its source value with probability ``rst``;
  6. the teacher's prediction of step 2 is the output.

CIFAR-10-C hyperparameters (``cifar/cfgs/cifar10/cotta.yaml``): Adam lr 1e-3, beta 0.9, wd 0, 1 step,
mt 0.999, rst 0.01, ap 0.92, 32 views, batch 200; BatchNorm on test-batch statistics everywhere.

Differences from the official code, all for speed and none changing the method: the 32 views go through the
teacher in chunks of several views per forward, with BatchNorm statistics still computed per view (as in 32
separate forwards); the views are always computed and the pseudo-label picked on the device (no host sync to
read the anchor's confidence; the official code also always computes them); restore masks are drawn on the device.
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Union

import torch
from torch import Tensor, nn

from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import Strategy, register
from .common import (
    auto_views_per_chunk,  # noqa: F401  (kept importable from here)
    augmented_prediction,
    ema_update_,
    frozen_copy,
    make_augment,
    soft_cross_entropy,
    stochastic_restore_,
    teacher_pseudo_label,
    use_batch_statistics,
)


@register
class CoTTA(Strategy):
    """Weight- and augmentation-averaged mean teacher with stochastic restore; adapts all weights."""

    name = "cotta"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})
    plugin_refusal = "it keeps its own copies of the model (teacher, anchor), which a wrapped model would not reach"

    def __init__(self, model: nn.Module, lr: Positive = 1e-3, beta: Momentum = 0.9, weight_decay: NonNegative = 0.0,
                 steps: Count = 1, mt: Unit = 0.999, rst: Unit = 0.01, ap: NonNegative = 0.92, views: Count = 32,
                 soft_augment: bool = False, hflip_p: Optional[Unit] = None,
                 views_per_chunk: Union[Count, Literal["auto"]] = "auto", seed: int = 0) -> None:
        super().__init__(model, seed)
        self.steps, self.mt, self.rst, self.ap, self.views = steps, mt, rst, ap, views
        self.views_per_chunk = views_per_chunk
        self.model.train().requires_grad_(True)
        use_batch_statistics(self.model)
        self.source_state: Dict[str, Tensor] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.teacher = frozen_copy(self.model)
        self.anchor = frozen_copy(self.model)
        self.augment = make_augment(soft_augment, hflip_p, seed)  # hflip_p=0 for digits/text (mirror = other class)
        params = [p for n, p in self.model.named_parameters() if n.rsplit(".", 1)[-1] in ("weight", "bias")]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.teacher(x)

    @torch.no_grad()
    def augmented_prediction(self, x: Tensor) -> Tensor:
        """Teacher logits averaged over ``views`` augmented copies of x, sent through in device-sized chunks."""
        return augmented_prediction(self.teacher, self.augment, x, self.views, self.views_per_chunk)

    def adapt(self, x: Tensor) -> Tensor:
        for _ in range(self.steps):
            pseudo = teacher_pseudo_label(self.teacher, self.anchor, self.augment, x, self.ap, self.views,
                                          self.views_per_chunk)
            with torch.enable_grad():
                self.student_step(x, pseudo)
            self.teacher_update()
            stochastic_restore_(self.model, self.source_state, self.rst, self.generator(x.device))
        return pseudo

    def student_step(self, x: Tensor, pseudo: Tensor) -> None:
        """Step 3: one optimizer step of the student towards the teacher's soft prediction."""
        soft_cross_entropy(self.model(x), pseudo).mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def teacher_update(self) -> None:
        """Step 4: teacher <- EMA of the student."""
        ema_update_(self.teacher, self.model, self.mt)

    def _apply(self, fn, recurse=True):  # keep the source copy on the model's device
        out = super()._apply(fn, recurse)
        self.source_state = {k: fn(v) for k, v in self.source_state.items()}
        return out

    def extra_state(self) -> Any:
        return {"augment": self.augment.get_state()}

    def load_extra_state(self, state: Any) -> None:
        if state:
            self.augment.set_state(state["augment"])
