"""ROID: diversity- and certainty-weighted soft likelihood ratio, weight ensembling and prior correction (Marsden,
Döbler, Yang, "Universal Test-time Adaptation through Weight Ensembling, Diversity Weighting, and Prior Correction",
WACV 2024, arXiv 2306.00650; code github.com/mariodoebler/test-time-adaptation).

Adapted: the affine scale and shift of every normalisation layer (BatchNorm on test-batch statistics); theta_s:
their source values; m: a moving average of the predicted class distribution, uniform 1/C at the start and after a
reset. Per test batch x of size B (``steps`` times), p = softmax f(x):
  1. weights (no gradient): diversity d = 1 - cos(m, p) and certainty c = -H(p), each min-max normalised over the
     batch; kept samples K = {d >= mean d} (the others, whose prediction repeats the recent ones, weigh 0);
     w = exp(d c / ``temperature``); then m <- ``probs_momentum`` m + (1 - ``probs_momentum``) mean_batch p;
  2. loss = sum over K of w SLR(f(x)) / B, SLR = -sum_c p_c log(p_c / (1 - p_c) + 1e-5) with p clipped at 0.99
     (the soft likelihood ratio, ``strategies/common/losses.py``)
          + sum over K of w SCE(f(aug(x_K)), f(x_K)) / B (consistency: symmetric cross-entropy, alpha 0.5, against
     one random view of the kept images, CoTTA's colour/affine/flip augmentations without blur and noise, reflect
     padding; gradients through both sides);
  3. one optimiser step, then weight ensembling theta <- ``momentum_src`` theta + (1 - ``momentum_src``) theta_s;
  4. prior correction of the returned prediction: pi = mean_batch p, s = max(1/B, 1/C) / max pi,
     output = f(x) * (pi + s) / (1 + s C) (the logits scaled by the smoothed batch prior, as the code; ``predict``
     applies it too). The prediction is that of step 1's forward, before the update.
As the reference benchmark's ``ROID`` (mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/roid.py``,
c505795): model in ``eval()`` mode with BatchNorm on batch statistics, the SLR and SCE of its ``utils/losses.py``,
its ``get_tta_transforms(cotta_augs=False, padding_mode="reflect")`` (one random draw per batch; ours from its own
seeded generator, the reference's from torch's global one). Where the reference divides by a batch of the test
configuration, ours divides by the batch's size (equal on every full batch); a batch whose d (or c) is constant
gets d (c) = 0 instead of the reference's NaN.
Hyperparameters (``conf.py`` ``_C.ROID`` + ``cfgs/cifar10_c/roid.yaml``): Adam lr 1e-3, beta 0.9, wd 0, 1 step,
batch 200, momentum_src 0.99, probs_momentum 0.9, temperature 1/3, weighting / consistency / prior correction on;
CIFAR-100-C the same; ImageNet-C SGD lr 2.5e-4, momentum 0.9, Nesterov, batch 64 (configs/strategies/roid.yaml).
"""
from __future__ import annotations

from typing import Any, Literal, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit
from ctta.seeding import stable_seed

from .base import Strategy, register
from .common import (
    AugmentConfig,
    TTAAugment,
    norm_affine_parameters,
    soft_likelihood_ratio,
    softmax_entropy,
    symmetric_cross_entropy,
    use_batch_statistics,
)
from .common.ema import ensemble_with_source_
from .common.incremental import num_outputs
from .common.optim import adam_or_sgd


def _min_max(v: Tensor) -> Tensor:
    """(v - min v) / (max v - min v); zeros where v is constant (the reference: NaN)."""
    lo, span = v.min(), v.max() - v.min()
    return torch.where(span > 0, (v - lo) / span, torch.zeros_like(v))


def diversity_certainty_weights(logits: Tensor, class_probs: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """ROID's sample weights and kept mask: d = minmax(1 - cos(m, p)), c = minmax(-H(p)), kept = d >= mean d,
    w = exp(d c / temperature) on the kept samples, 0 elsewhere."""
    div = _min_max(1 - F.cosine_similarity(class_probs.unsqueeze(dim=0), logits.softmax(1), dim=1))
    keep = ~(div < div.mean())
    cert = _min_max(-softmax_entropy(logits))
    weights = torch.exp(div * cert / temperature)
    weights[~keep] = 0.0
    return weights, keep


def prior_corrected(logits: Tensor) -> Tensor:
    """ROID's prior correction: ``logits * (pi + s) / (1 + s C)``, pi the batch's mean softmax, s = max(1/B, 1/C) /
    max pi (a smoothing that keeps a class absent from the batch from being zeroed)."""
    prior = logits.softmax(1).mean(0)
    smooth = max(1 / logits.shape[0], 1 / logits.shape[1]) / torch.max(prior)
    return logits * ((prior + smooth) / (1 + smooth * logits.shape[1]))


@register
class ROID(Strategy):
    """Diversity- and certainty-weighted SLR + consistency on the norm affines, ensembled with the source weights;
    predictions corrected by the batch's class prior."""

    name = "roid"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, use_weighting: bool = True, use_consistency: bool = True,
                 use_prior_correction: bool = True, momentum_src: Unit = 0.99, probs_momentum: Unit = 0.9,
                 temperature: Positive = 1 / 3, sce_alpha: Unit = 0.5, optimizer: Literal["adam", "sgd"] = "adam",
                 lr: Positive = 1e-3, beta: Momentum = 0.9, momentum: Momentum = 0.9, nesterov: bool = True,
                 weight_decay: NonNegative = 0.0, steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.use_weighting, self.use_consistency = bool(use_weighting), bool(use_consistency)
        self.use_prior_correction = bool(use_prior_correction)
        self.momentum_src, self.probs_momentum = float(momentum_src), float(probs_momentum)
        self.temperature, self.sce_alpha, self.steps = float(temperature), float(sce_alpha), int(steps)
        self.model.eval().requires_grad_(False)  # eval: no dropout / stochastic depth (as the reference)
        use_batch_statistics(self.model)
        self.params = [p for _, p in norm_affine_parameters(self.model)]
        if not self.params:
            raise ConfigError("roid needs normalisation layers with affine parameters; the backbone has none")
        for p in self.params:
            p.requires_grad_(True)
        self.source_params = [p.detach().clone() for p in self.params]  # theta_s (constant)
        self.optimizer = adam_or_sgd(self.params, optimizer, lr, beta, momentum, nesterov, weight_decay)
        num_classes = num_outputs(model)
        self.register_buffer("class_probs", torch.full((num_classes,), 1.0 / num_classes))  # m
        self.augment = TTAAugment(AugmentConfig(padding="reflect", blur=False, noise_std=0.0),
                                  seed=stable_seed(seed, "roid-augment"))
        self.last_kept = 0  # |K| of the last step
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        return prior_corrected(logits) if self.use_prior_correction else logits

    def adapt(self, x: Tensor) -> Tensor:
        return self.stepped(x, self._step, self.steps)

    def _step(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        n = x.shape[0]
        with torch.no_grad():
            probs = logits.softmax(1)
            if self.use_weighting:  # step 1
                weights, keep = diversity_certainty_weights(logits, self.class_probs, self.temperature)
                self.class_probs.copy_(self.probs_momentum * self.class_probs
                                       + (1 - self.probs_momentum) * probs.mean(0))
            else:
                keep = torch.ones(n, dtype=torch.bool, device=x.device)
                weights = torch.ones(n, dtype=logits.dtype, device=x.device)
        loss = soft_likelihood_ratio(logits)  # step 2
        if self.use_weighting:
            loss = (loss * weights)[keep]
        loss = loss.sum() / n
        if self.use_consistency:
            kept = x[keep]
            aug_logits = self.model(self.augment(kept, 1))
            sce = symmetric_cross_entropy(aug_logits, logits[keep], self.sce_alpha)
            loss = loss + (sce * weights[keep]).sum() / n
        loss.backward()  # step 3 (K is never empty: the most diverse sample, d = 1 >= mean d, is kept)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_kept = int(keep.sum())
        self._merge()
        prediction = logits.detach()
        return prior_corrected(prediction) if self.use_prior_correction else prediction  # step 4

    @torch.no_grad()
    def _merge(self) -> None:
        """Step 3's weight ensembling with the source weights (CMF, ``strategies/cmf.py``, filters instead)."""
        ensemble_with_source_(self.params, self.source_params, self.momentum_src)

    def extra_state(self) -> Any:
        return {"augment": self.augment.get_state()}

    def load_extra_state(self, state: Any) -> None:
        if state and "augment" in state:
            self.augment.set_state(state["augment"])


__all__ = ["ROID", "diversity_certainty_weights", "prior_corrected"]
