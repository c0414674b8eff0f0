"""CSFA, the full method of Yu, Lu, Zhang (arXiv 2506.05736, 2025): the calibrated prototype head plus RSGS.

Calibrated Source-Free Adaptation for GILCD streams: labelled ``train`` batches (the base session, then a few
shots of each newly appearing class) build the training-free calibrated prototype head of ``csfa``
(``strategies/csfa.py``); every unlabelled ``adapt`` batch predicts with that head, then runs one RSGS step
(``strategies/rsgs.py``): entropy-filtered GSAM minimisation of the head's entropy over the classes seen so far,
with respect to the norm layers' affine parameters, normalising with test-batch statistics.

Choices the paper leaves open (documented): the prototypes are computed under the same normalisation the head
predicts with (test-batch statistics of each labelled batch, so the shots of a drifted stage are described in
that stage's statistics); prototypes are fixed once their session ended (training-free: RSGS changes the
features under them, the prototypes are not recomputed); the entropy filter's C counts the classes seen so far;
hyperparameters are those of ``csfa`` and ``rsgs``, SAR's model recovery included (``reset_constant``; a recovery
resets the norm affines and the optimiser, not the prototypes or the label space).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ctta.backbones.classifier import features_and_logits
from ctta.hparams import Momentum, NonNegative, Positive, Unit

from .base import register
from .csfa import CSFA
from .rsgs import RSGSUpdate, entropy_threshold, rsgs_parameters


@register
class CSFARSGS(CSFA):
    """Calibrated prototype head (``csfa``) adapted source-free by RSGS on every unlabelled batch."""

    name = "csfa_rsgs"
    step_kinds = frozenset({"train", "adapt", "eval"})
    settings = frozenset({"gilcd"})

    def __init__(self, model: nn.Module, shift_weight: Unit = 0.1, temperature: Positive = 16.0,
                 scale: Positive = 16.0, lr: Positive = 1e-3, momentum: Momentum = 0.9, weight_decay: NonNegative = 0.0,
                 rho: Positive = 0.05, alpha: NonNegative = 0.1, e_margin: Positive = 0.4,
                 reset_constant: NonNegative = 0.2, seed: int = 0) -> None:
        self._params: list = []
        super().__init__(model, shift_weight, temperature, scale, seed)
        self.update = RSGSUpdate(self._params, lr, momentum, weight_decay, rho, alpha, e_margin, reset_constant)
        self.optimizer = self.update.optimizer
        self.remember_initial_state()

    def configure(self) -> None:
        """Test-batch statistics, norm affines trainable (RSGS), everything else frozen."""
        self._params = rsgs_parameters(self.model)

    def features(self, x: Tensor):  # type: ignore[override]
        with torch.no_grad():
            f, logits = features_and_logits(self.model, x)
        return f.float(), logits

    def _differentiable_logits(self, x: Tensor) -> Tensor:
        f, backbone_logits = features_and_logits(self.model, x)
        return self.mask(self.head_logits(f.float(), backbone_logits))

    def adapt(self, x: Tensor) -> Tensor:
        self.close_session()
        threshold = entropy_threshold(self.seen, self.update.e_margin)
        logits, _ = self.update.step(x, self._differentiable_logits, threshold)
        return logits
