"""CSFA prototype calibration: a training-free prototype head for GILCD (Yu, Lu, Zhang, arXiv 2506.05736, 2025).

"Generalized Incremental Learning under Concept Drift across Evolving Data Streams" calls its whole framework
CSFA (Calibrated Source-Free Adaptation); its first part, registered here as ``csfa``, recognises the classes that
appear in the stream with "a training-free prototype calibration mechanism that dynamically fuses emerging
prototypes with base representations". The full method (this head plus the RSGS update) is ``csfa_rsgs``.

What this implements (no public code exists; the paper's method section could not be read here, only its
abstract, so the mechanism follows TEEN, the training-free calibration it describes; see
``strategies/common/prototypes.py``):

* every ``train`` batch adds its penultimate features to per-class running sums (exact class means);
* the first session (GILCD's ``base`` segment) defines the *base* classes; their prototypes are the plain means;
* at the end of every later session (the first prediction step after its labelled shots) the prototypes of the
  classes first seen in it are calibrated once: ``p' = (1 - lam) p + lam * normalise(sum_j softmax_j(tau cos(p,
  b_j)) b_j)`` over the base prototypes ``b_j``; later sessions never change earlier prototypes;
* the classifier is ``scale * cos(feature, prototype)`` over the classes seen so far; unseen classes get ``-inf``
  (``common.incremental`` masking), so a class is never predicted before its labelled samples arrived.

Choices the paper leaves open (documented, configurable): the backbone is frozen and used with its source
normalisation statistics (``model.eval()``), so ``learn``/``adapt``/``predict`` change no weight; the base
prototypes replace the backbone's linear head for the base classes too (as TEEN does), so the head a pre-trained
model may already have for later classes is never used; ``lam = 0.1``, ``tau = 16`` and ``scale = 16`` are TEEN's
CIFAR values (``scripts/cifar.sh``: ``shift_weight 0.1``, ``softmax_t 16``, ``temperature 16``); before any labelled
batch the backbone's own head predicts.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ctta.backbones.classifier import features_and_logits
from ctta.hparams import Positive, Unit

from .base import register
from .common.incremental import IncrementalStrategy, num_outputs
from .common.prototypes import PrototypeMemory, calibrate, cosine_logits, feature_dim


@register
class CSFA(IncrementalStrategy):
    """Training-free prototype head: class means from labelled batches, new classes calibrated towards the base."""

    name = "csfa"
    step_kinds = frozenset({"train", "adapt", "eval"})
    settings = frozenset({"gilcd", "few_shot_class_incremental", "class_incremental"})

    def __init__(self, model: nn.Module, shift_weight: Unit = 0.1, temperature: Positive = 16.0,
                 scale: Positive = 16.0, seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        self.shift_weight = float(shift_weight)
        self.temperature = float(temperature)
        self.scale = float(scale)
        n_cls = num_outputs(model)
        self.memory = PrototypeMemory(n_cls, feature_dim(model))
        # the head: calibrated prototypes of the classes whose session ended; base classes; classes already fixed
        self.register_buffer("prototypes", torch.zeros(n_cls, feature_dim(model)))
        self.register_buffer("base", torch.zeros(n_cls, dtype=torch.bool))
        self.register_buffer("fixed", torch.zeros(n_cls, dtype=torch.bool))
        self.configure()
        self.remember_initial_state()

    # --- model state ------------------------------------------------------------------------------------------
    def configure(self) -> None:
        """Frozen backbone with source statistics (CSFA itself trains nothing)."""
        self.model.requires_grad_(False)
        self.model.eval()

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features and the backbone's logits of ``x``, without gradients and without any update."""
        self.model.eval()
        with torch.no_grad():
            f, logits = features_and_logits(self.model, x)
        return f.float(), logits

    # --- the head ---------------------------------------------------------------------------------------------
    def head_logits(self, f: Tensor, backbone_logits: Tensor) -> Tensor:
        """Cosine logits against the current prototypes; the backbone's head while no class was seen."""
        protos = torch.where(self.fixed.unsqueeze(1), self.prototypes, self.memory.means())
        out = cosine_logits(f, protos, self.scale)
        return torch.where(self.seen.seen.any(), out, backbone_logits.to(out.dtype))

    def logits(self, x: Tensor) -> Tensor:
        return self.head_logits(*self.features(x))

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        f, backbone_logits = self.features(x)
        out = self.mask(self.head_logits(f, backbone_logits))
        self.memory.update(f, y)
        return out

    def adapt(self, x: Tensor) -> Tensor:
        return self.predict(x)

    # --- sessions ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def end_session(self, session: int) -> None:
        """Fix the prototypes of the classes first seen in this session: plain means for the first (base)
        session, calibrated towards the base prototypes for every later one (one pass, no host sync)."""
        means = self.memory.means()
        new = self.memory.present() & ~self.fixed
        if session == 0:
            self.base |= new
            fused = means
        else:
            calibrated = calibrate(means, means, self.shift_weight, self.temperature,
                                   base_mask=self.base | ~self.base.any())
            fused = torch.where(self.base.any(), calibrated, means)
        self.prototypes.copy_(torch.where(new.unsqueeze(1), fused, self.prototypes))
        self.fixed |= new
