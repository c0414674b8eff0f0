"""RSGS: Reliable Surrogate Gap Sharpness-aware minimisation (Yu, Lu, Zhang, arXiv 2506.05736, 2025).

The source-free part of the paper's CSFA framework: on every unlabelled batch, minimise the prediction entropy
with a GSAM step (sharpness-aware perturbation plus surrogate-gap minimisation; Zhuang et al., ICLR 2022; see
``strategies/common/sam.py``) while an entropy filter discards unreliable samples. The paper's method section could
not be read here (only its abstract), so the algorithm is SAR's reliable sharpness-aware entropy minimisation
(Niu et al., ICLR 2023; github.com/mr-eggplant/SAR) with SAM's update replaced by GSAM's, which is what the
abstract describes. Per batch:

1. forward at ``w`` (test-batch normalisation statistics); per-sample entropy ``E(x)`` over the classes seen so
   far; keep the samples with ``E(x) < E0 = e_margin * ln C`` (C = classes seen so far, all outputs before any
   labelled batch; SAR's ``0.4 ln C``); loss = mean entropy of the kept samples; gradient ``g``;
2. perturb ``w + rho g/||g||``; forward again; keep, among the first filter's samples, those whose perturbed
   entropy is still below ``E0`` (SAR's second filter); gradient ``g_p`` of their mean entropy;
3. descend along ``g_p - alpha * g_orth`` (``g_orth``: the part of ``g`` orthogonal to ``g_p``) with the base
   optimiser. The prediction returned is the one of step 1, made before the update.

Choices the paper leaves open (documented, configurable): the adapted parameters are the affine scale and shift
of the normalisation layers, as in SAR and TENT; SGD with momentum 0.9 (SAR's optimiser) at ``lr = 1e-3`` (SAR
uses 2.5e-4 for ImageNet ResNet-50 at batch 64; a CIFAR ResNet-20 has ~1/50 of the norm parameters); ``rho = 0.05``
(SAR) held constant (no learning-rate schedule in a stream); ``alpha = 0.1`` (GSAM's surrogate-gap weight, a value
inside the range GSAM tunes). Model recovery is on by default, as SAR's (``sar.py``): an EMA (0.9) of the perturbed
loss of the kept samples, and a reset of the adapted parameters and the optimiser to their initial state when it
falls below ``reset_constant = 0.2`` (SAR's value; an absolute entropy, set for ImageNet's 1000 classes; 0 turns
recovery off). Whether the CSFA paper keeps it could not be checked (only its abstract is available offline, and it
does not mention it), so SAR's mechanism is followed, as for the filter; the label space seen so far is not reset
(it is not adapted weight state). Averaging is
over the kept samples with a zero loss when none is kept (no host sync; the base optimiser's momentum still moves
the weights on such a batch). On GILCD ``train`` steps ``rsgs`` only records the labels' classes (a source-free
method uses no labels), so its head is the backbone's own head masked to the classes seen so far.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, Positive

from .base import Strategy, register
from .common.incremental import SeenClasses, num_outputs
from .common.norm import norm_affine_parameters, use_batch_statistics
from .common.recovery import LossEMARecovery
from .common.sam import gsam_step


def masked_entropy(logits: Tensor) -> Tensor:
    """Per-sample softmax entropy, safe for ``-inf`` logits (masked classes add zero, with zero gradient)."""
    log_p = logits.log_softmax(dim=1)
    finite = torch.isfinite(log_p)
    safe = log_p.masked_fill(~finite, 0.0)
    return -(safe.exp().masked_fill(~finite, 0.0) * safe).sum(dim=1)


def entropy_threshold(seen: SeenClasses, e_margin: float) -> Tensor:
    """``e_margin * ln C`` as a device tensor, C = classes seen so far (all outputs before any labelled batch)."""
    c = seen.seen.sum()
    c = torch.where(c > 0, c, torch.full_like(c, seen.num_classes)).clamp_min(2)
    return e_margin * torch.log(c.float())


class RSGSUpdate(LossEMARecovery):
    """The RSGS step on some parameters, for any differentiable ``logits_fn(x)`` (shared by ``rsgs`` and
    ``csfa_rsgs``, whose signatures declare the ranges of these hyperparameters).

    Model recovery (SAR, ``sar.py``; ``strategies/common/recovery.py``, shared with ``sar``): an EMA
    (``0.9 ema + (1 - 0.9) loss``, started at the first loss) of the perturbed step's loss over the samples both
    filters kept (skipped when none is kept); when it falls below ``reset_constant`` (SAR: 0.2) after an update, the
    parameters return to their values at construction, the optimiser's momentum to its empty start and the EMA is
    forgotten. ``reset_constant = 0``: no recovery. All on the device (a ``torch.where``, no host sync);
    ``recoveries`` counts the resets. A module, so the EMA, the initial values and the count move with ``.to()`` and
    are part of the strategy's checkpoint.
    """

    def __init__(self, params: List[nn.Parameter], lr: float, momentum: float, weight_decay: float, rho: float,
                 alpha: float, e_margin: float, reset_constant: float = 0.2) -> None:
        if not params:
            raise ConfigError("rsgs needs normalisation layers with affine parameters; the backbone has none")
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, optimizer, reset_constant, momentum=0.9, clear_momentum=True)
        self.rho, self.alpha, self.e_margin = float(rho), float(alpha), float(e_margin)

    def step(self, x: Tensor, logits_fn: Callable[[Tensor], Tensor], threshold: Tensor) -> Tuple[Tensor, Tensor]:
        """One RSGS update on ``x``; returns (logits before the update, the first filter's keep mask)."""
        state: dict = {}

        def closure(perturbed: bool) -> Tensor:
            logits = logits_fn(x)
            ent = masked_entropy(logits)
            reliable = ent.detach() < threshold
            if not perturbed:
                state["logits"], state["keep"] = logits.detach(), reliable
                keep = reliable
            else:
                keep = state["keep"] & reliable
            w = keep.to(ent.dtype)
            loss = (ent * w).sum() / w.sum().clamp_min(1.0)
            if perturbed:
                state["loss2"], state["kept2"] = loss.detach(), w.sum().detach()
            return loss

        self.optimizer.zero_grad(set_to_none=True)
        gsam_step(self.params, closure, self.rho, self.alpha)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.reset_constant > 0:
            self.recover_if_collapsing(state["loss2"], state["kept2"])
        return state["logits"], state["keep"]


def rsgs_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Freeze ``model``, switch its BatchNorm layers to test-batch statistics and unfreeze the norm affines."""
    model.train().requires_grad_(False)
    use_batch_statistics(model)
    params = [p for _, p in norm_affine_parameters(model)]
    for p in params:
        p.requires_grad_(True)
    return params


@register
class RSGS(Strategy):
    """Entropy-filtered GSAM entropy minimisation of the norm affines; the backbone's head over seen classes."""

    name = "rsgs"
    step_kinds = frozenset({"adapt", "train", "eval"})
    settings = frozenset({"tta", "gilcd", "domain_incremental"})

    def __init__(self, model: nn.Module, lr: Positive = 1e-3, momentum: Momentum = 0.9, weight_decay: NonNegative = 0.0,
                 rho: Positive = 0.05, alpha: NonNegative = 0.1, e_margin: Positive = 0.4, steps: Count = 1,
                 reset_constant: NonNegative = 0.2, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.steps = int(steps)
        self.seen = SeenClasses(num_outputs(model))
        self.update = RSGSUpdate(rsgs_parameters(self.model), lr, momentum, weight_decay, rho, alpha, e_margin,
                                 reset_constant)
        self.optimizer = self.update.optimizer
        self.last_keep: Optional[Tensor] = None
        self.remember_initial_state()

    def logits(self, x: Tensor) -> Tensor:
        return self.seen.mask(self.model(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x)

    def learn(self, x: Tensor, y: Tensor) -> Tensor:
        """Source-free: a labelled batch only widens the label space (no weight changes)."""
        self.seen.update(y)
        return self.predict(x)

    def adapt(self, x: Tensor) -> Tensor:
        threshold = entropy_threshold(self.seen, self.update.e_margin)
        prediction = None
        for _ in range(self.steps):
            logits, self.last_keep = self.update.step(x, self.logits, threshold)
            prediction = logits if prediction is None else prediction
        return prediction


__all__ = ["RSGS", "RSGSUpdate", "entropy_threshold", "masked_entropy", "rsgs_parameters"]
