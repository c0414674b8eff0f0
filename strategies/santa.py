"""SANTA: Source Anchoring Network and Target Alignment (Chakrabarty, Sreenivas, Biswas, "SANTA: Source Anchoring
Network and Target Alignment for Continual Test Time Adaptation", TMLR 2023, openreview.net/pdf?id=V7guVYzvE4, the
link the reference's README gives; no arXiv id).

Followed: the reference benchmark's ``SANTA`` (mariodoebler/test-time-adaptation@8b2ed63,
``classification/methods/santa.py`` with ``utils/losses.py`` ``AugCrossEntropy``,
``augmentations/transforms_cotta.py`` ``get_tta_transforms``, ``conf.py`` ``_C.SANTA`` / ``_C.CONTRAST``,
``cfgs/{cifar10_c,cifar100_c,imagenet_c}/santa.yaml``). Only the norm layers' affine scales and shifts and the
projector are adapted; BatchNorm normalises with each batch's statistics (student and anchor).

Once, before the first test batch (lazily, on the device the strategy runs on), at the source weights:
  0. source prototypes: p_c = mean of the penultimate features of the source images of class c (``source_data``,
     in batches of ``source_batch``, at most the first batches holding 100000 images); the anchor a = a frozen
     copy of the source model.
Per test batch x (``steps`` times), with f the features, g the head, x' = aug(x) one random CoTTA view of the batch:
  1. s = g(f(x)), s' = g(f(x')), e = a(x);
  2. for each test sample, its nearest source prototype p (cosine similarity of f(x) with the p_c);
  3. L_cont = supervised-contrastive loss over the three views (p, f(x), f(x')) of every sample, projected by a
     two-layer MLP (``projection_dim``), L2-normalised, temperature ``temperature``, each sample's views its only
     positives (SupCon, mode 'all'; ``common/source_prototypes.py``, shared with ``rmt``);
  4. L = ``lambda_ce_trg`` mean(AugCE(s, s', e)) + ``lambda_cont`` L_cont, with
     AugCE = -(1 - alpha) sum softmax(s) log softmax(e) - alpha sum softmax(s') log softmax(e), alpha 0.5;
     one optimiser step on the norm affines and the projector;
  5. output: s, the logits before the update (``predict``: the student's logits).
Hyperparameters (CIFAR-10-C): Adam lr 1e-3, betas (0.9, 0.999), wd 0, 1 step, batch 200; LAMBDA_CE_TRG,
LAMBDA_CONT 1; CONTRAST.TEMPERATURE 0.1, PROJECTION_DIM 128, MODE 'all'; all source images (SOURCE.NUM_SAMPLES -1)
in batches of TEST.BATCH_SIZE. Per dataset: configs/strategies/santa.yaml.
As the reference, but (as ``rmt``): the source images are the caller's (``source_data``) in one seeded order; the
nearest prototype is the argmax of a product of normalised vectors (the reference: ``cosine_similarity`` of repeated
tensors, the same index but at exact near-ties); the projector is initialised as ``nn.Linear`` does under
``torch.manual_seed(seed)`` and the view's random draws (``draw_order="torchvision"``) come from a generator seeded
with ``seed``, so a reference run seeded alike that draws nothing else draws the same numbers.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from ctta.errors import UnsupportedError
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import Strategy, register
from .common import (
    AugmentConfig,
    SourceData,
    TTAAugment,
    aug_cross_entropy,
    frozen_copy,
    norm_affine_parameters,
    use_batch_statistics,
)
from .common.incremental import num_outputs
from .common.prototypes import feature_dim
from .common.source_prototypes import make_projector, prototype_contrast, seeded_source, source_class_means


@register
class SANTA(Strategy):
    """Norm-affine adaptation towards a frozen source anchor (cross-entropy of the test and augmented predictions to
    the anchor's) plus contrastive alignment of the test features with their nearest source prototypes."""

    name = "santa"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental"})  # not sfda: the prototypes read source data
    plugin_refusal = ("it keeps its own anchor copy and calls the model's feature extractor and head separately, "
                      "which a wrapped model would not reach")

    def __init__(self, model: nn.Module, source_data: SourceData = None, source_samples: Optional[Count] = None,
                 source_batch: Count = 200, lambda_ce_trg: NonNegative = 1.0, lambda_cont: NonNegative = 1.0,
                 alpha: Unit = 0.5, temperature: Positive = 0.1, projection_dim: Count = 128,
                 optimizer: Literal["adam", "sgd"] = "adam", lr: Positive = 1e-3, beta: Momentum = 0.9,
                 momentum: Momentum = 0.9, nesterov: bool = True, weight_decay: NonNegative = 0.0, steps: Count = 1,
                 seed: int = 0) -> None:
        super().__init__(model, seed)
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise UnsupportedError(f"santa needs a backbone with forward_features(x) / forward_head(features) (wrap "
                                   f"it in ctta.backbones.Classifier); {type(model).__name__} has not")
        self.num_classes, dim = num_outputs(model), feature_dim(model)
        self.source_images, self.source_labels = seeded_source(source_data, self.num_classes, source_samples, seed,
                                                               self.name)
        self.source_batch = int(source_batch)
        self.lambda_ce_trg, self.lambda_cont, self.alpha = lambda_ce_trg, lambda_cont, alpha
        self.temperature, self.steps = temperature, steps
        self.model.eval().requires_grad_(False)  # eval: no dropout / stochastic depth (as the reference)
        use_batch_statistics(self.model)
        self.params = [p.requires_grad_(True) for _, p in norm_affine_parameters(self.model)]
        self.anchor = frozen_copy(self.model)  # the source model, batch statistics, never updated
        device = next(self.model.parameters()).device
        self.projector = make_projector(dim, projection_dim, seed, device)  # global generator untouched
        self.augment = TTAAugment(AugmentConfig(), seed=seed, draw_order="torchvision")
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, dampening=0.0,
                                             weight_decay=weight_decay, nesterov=nesterov)
        self.optimizer.add_param_group({"params": list(self.projector.parameters()), "lr": lr})
        self.register_buffer("prototypes", torch.zeros(self.num_classes, dim, device=device))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool, device=device))  # prototypes computed
        self.remember_initial_state()

    # --- step 0: source prototypes, once ------------------------------------------------------------------------
    def ensure_ready(self, device: torch.device) -> None:
        """Step 0 if not done yet (at the source weights: the anchor's); ``reset()`` keeps the prototypes."""
        if bool(self.ready):
            return
        self.prototypes.copy_(source_class_means(self.anchor, self.source_images, self.source_labels,
                                                 self.source_batch, self.num_classes, device))
        self.ready.fill_(True)
        self.remember_initial_state()

    # --- steps 1-5 ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.ensure_ready(x.device)
        return self.model(x)

    def adapt(self, x: Tensor) -> Tensor:
        self.ensure_ready(x.device)
        return self.stepped(x, self._step, self.steps)

    def _step(self, x: Tensor) -> Tensor:
        features = self.model.forward_features(x)                                          # 1
        logits = self.model.forward_head(features)
        features_aug = self.model.forward_features(self.augment(x, 1))
        logits_aug = self.model.forward_head(features_aug)
        logits_anchor = self.anchor(x)
        loss_cont = prototype_contrast(self.prototypes, features, features_aug, self.projector,  # 2, 3
                                       self.temperature)
        loss_self = aug_cross_entropy(logits, logits_aug, logits_anchor, self.alpha).mean(0)  # 4
        loss = self.lambda_ce_trg * loss_self + self.lambda_cont * loss_cont
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()                                                             # 5

    # --- state ---------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the source state (norm affines, projector, optimiser; prototypes kept), as the reference's reset;
        the view draws go on where they were (the reference's global generator)."""
        going_on = self.extra_state()
        super().reset()
        self.load_extra_state(going_on)

    def extra_state(self) -> Any:
        return {"augment": self.augment.get_state()}

    def load_extra_state(self, state: Any) -> None:
        if state:
            self.augment.set_state(state["augment"])


__all__ = ["SANTA"]
