"""CMF: continual momentum filtering of the adapted weights with the source and a hidden model (Lee, Chang,
"Continual Momentum Filtering on Parameter Space for Online Test-time Adaptation", ICLR 2024, OpenReview
BllUWdpIOA (no arXiv id known to us); code: the reference benchmark below).

Adapted: the affine scale and shift of every normalisation layer (BatchNorm on test-batch statistics), as ROID;
theta_s: their source values (constant); theta_h: the hidden model's, a Kalman-filtered estimate of good target
weights (theta_s at the start and after a reset), with a scalar variance P (0 at the start). Per test batch x (``steps``
times):
  1. ROID's loss and step (``strategies/roid.py``): diversity- and certainty-weighted soft likelihood ratio on the
     kept samples + weighted SCE consistency to one augmented view, one optimiser step on theta (the student);
  2. predict: theta_h <- alpha theta_h + (1 - alpha) theta_s (the hidden model drifts back to the source),
     P <- alpha^2 P + q, q = ``q`` * n / 38400 (n: the number of adapted scalars; 38400: the reference's constant);
  3. update: beta = R / (P + R), R = 1 - q (1 - the Kalman gain), clipped below at ``beta_min`` and set to 1 from
     ``beta_max`` on; theta_h <- beta theta_h + (1 - beta) theta (the student as the observation); P <- beta P;
  4. parameter ensemble: theta <- gamma theta + (1 - gamma) theta_h;
  5. ROID's prior correction of the prediction made in step 1 (before the update).
As the reference benchmark's ``CMF`` (mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/cmf.py``;
its ``ema_update_model`` of ``utils/misc.py`` written as two products and a sum: ``ensemble_with_source_``): the
loss, weights, view (``get_tta_transforms(cotta_augs=False, padding_mode="reflect")``) and model mode of its ROID
(it reads ``cfg.ROID``); the view's numbers drawn in torchvision's order from a generator seeded with ``seed`` (the
reference: torch's global one, which it uses for nothing else). Its ``CMF.TYPE`` ('lp', or 'op': ensemble with the
predicted instead of the updated hidden model) is not offered: at 8b2ed63 the predict step updates the hidden model
in place, so both give the update-step model. The reference's hidden model also carries the frozen weights (which
stay equal to the source's up to rounding and never reach the student); ours holds only the adapted ones. Its reset
keeps P; ours returns it to 0 with everything else.
Hyperparameters (``conf.py`` ``_C.CMF`` / ``_C.ROID`` + ``cfgs/cifar10_c/cmf.yaml``): alpha 0.99, gamma 0.99, q 0.005,
beta in [0.89, 0.9999) else 1 (hard-coded); Adam lr 1e-3, beta 0.9, wd 0, 1 step, batch 200; CIFAR-100-C the same;
ImageNet-C SGD lr 2.5e-4, momentum 0.9, Nesterov, batch 64 (configs/strategies/cmf.yaml).
"""
from __future__ import annotations

from typing import Any, List, Literal, Tuple

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import register
from .common import AugmentConfig, TTAAugment
from .common.ema import ensemble_with_source_
from .roid import ROID

#: the reference's divisor of the number of adapted scalars in q (``param_size_ratio``)
Q_REFERENCE_PARAMS = 38400


def filter_gain(variance: float, q: float, alpha: float, beta_min: float, beta_max: float) -> Tuple[float, float]:
    """One predict + update of CMF's scalar variance: (beta, new variance), beta = R / (P + R), R = 1 - q, with
    P = alpha^2 variance + q; beta clipped below at ``beta_min`` and 1 from ``beta_max`` on (Python floats)."""
    variance = alpha ** 2 * variance + q
    r = 1 - q
    beta = r / (variance + r)
    beta = beta if beta > beta_min else beta_min
    beta = beta if beta < beta_max else 1.0
    return beta, beta * variance


@register
class CMF(ROID):
    """ROID's loss on the norm affines; after each step a Kalman-like filter fuses source, hidden and student."""

    name = "cmf"

    def __init__(self, model: nn.Module, alpha: Unit = 0.99, gamma: Unit = 0.99, q: Unit = 0.005,
                 beta_min: Unit = 0.89, beta_max: Unit = 0.9999, use_weighting: bool = True,
                 use_consistency: bool = True, use_prior_correction: bool = True, probs_momentum: Unit = 0.9,
                 temperature: Positive = 1 / 3, sce_alpha: Unit = 0.5, optimizer: Literal["adam", "sgd"] = "adam",
                 lr: Positive = 1e-3, beta: Momentum = 0.9, momentum: Momentum = 0.9, nesterov: bool = True,
                 weight_decay: NonNegative = 0.0, steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, use_weighting=use_weighting, use_consistency=use_consistency,
                         use_prior_correction=use_prior_correction, momentum_src=1.0, probs_momentum=probs_momentum,
                         temperature=temperature, sce_alpha=sce_alpha, optimizer=optimizer, lr=lr, beta=beta,
                         momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, steps=steps, seed=seed)
        if not beta_min <= beta_max:
            raise ConfigError(f"cmf: beta_min ({beta_min}) must not exceed beta_max ({beta_max})")
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.num_adapted = sum(p.numel() for p in self.params)
        self.q = float(q) * (self.num_adapted / Q_REFERENCE_PARAMS)
        for i, p in enumerate(self.params):  # theta_h, starting at the source weights
            self.register_buffer(f"hidden_{i}", p.detach().clone())
        self.variance = 0.0  # P
        self.last_beta = 1.0  # beta of the last update (1: the hidden model ignored the student)
        self.augment = TTAAugment(AugmentConfig(padding="reflect", blur=False, noise_std=0.0), seed=seed,
                                  draw_order="torchvision")
        self.remember_initial_state()

    @property
    def hidden(self) -> List[Tensor]:
        """theta_h, one tensor per adapted parameter."""
        return [getattr(self, f"hidden_{i}") for i in range(len(self.params))]

    @torch.no_grad()
    def _merge(self) -> None:
        """Steps 2-4 (the reference's ``bayesian_filtering``): predict, update, parameter ensemble."""
        hidden = self.hidden
        ensemble_with_source_(hidden, self.source_params, self.alpha)  # 2. predict
        self.last_beta, self.variance = filter_gain(self.variance, self.q, self.alpha, self.beta_min, self.beta_max)
        if self.last_beta < 1.0:  # 3. update (the reference skips a momentum of 1)
            ensemble_with_source_(hidden, [p.detach() for p in self.params], self.last_beta)
        ensemble_with_source_(self.params, hidden, self.gamma)  # 4. parameter ensemble

    def extra_state(self) -> Any:
        state = super().extra_state()
        if "variance" in self.__dict__:  # not yet set while ROID's __init__ records its state (recorded again here)
            state.update(variance=self.variance, last_beta=self.last_beta)
        return state

    def load_extra_state(self, state: Any) -> None:
        super().load_extra_state(state)
        if state and "variance" in state:
            self.variance, self.last_beta = float(state["variance"]), float(state["last_beta"])


__all__ = ["CMF", "filter_gain", "Q_REFERENCE_PARAMS"]
