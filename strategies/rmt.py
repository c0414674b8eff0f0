"""RMT: Robust Mean Teacher (Döbler, Marsden, Yang, "Robust Mean Teacher for Continual and Gradual Test-Time
Adaptation", CVPR 2023, arXiv 2211.13081).

Followed: the reference benchmark's ``RMT`` (mariodoebler/test-time-adaptation@8b2ed63,
``classification/methods/rmt.py`` with ``utils/losses.py`` ``SymmetricCrossEntropy``, ``utils/misc.py``
``ema_update_model``, ``augmentations/transforms_cotta.py`` ``get_tta_transforms``, ``conf.py`` ``_C.RMT`` /
``_C.CONTRAST`` / ``_C.M_TEACHER``, ``cfgs/{cifar10_c,cifar100_c,imagenet_c}/rmt.yaml``). All weights and biases
of the student and the projector are adapted; BatchNorm normalises with each batch's statistics (student, teacher).

Once, before the first test batch (lazily, on the device the strategy runs on), at the source weights:
  0. source prototypes: p_c = mean of the student's penultimate features of the source images of class c
     (``source_data``, in batches of ``source_batch``, at most the first batches holding 100000 images);
     warm-up: ``warmup_samples // source_batch`` steps on source batches of SCE(student(x_s), teacher(x_s)) with
     the learning rate rising linearly to ``lr``, each followed by the EMA update of step 5.
Per test batch x (``steps`` times), with f the student's features, g its head, t the teacher, x' = aug(x) one
random CoTTA view of the batch:
  1. s = g(f(x)), s' = g(f(x')), e = t(x);
  2. for each test sample, its nearest source prototype p (cosine similarity of f(x) with the p_c);
  3. L_cont = supervised-contrastive loss over the three views (p, f(x), f(x')) of every sample, projected by a
     two-layer MLP (``projection_dim``) and L2-normalised, temperature ``temperature``, each sample's views its
     only positives (SupCon, mode 'all');
  4. L = ``lambda_ce_trg`` mean(0.5 SCE(s, e) + 0.5 SCE(s', e)) + ``lambda_cont`` L_cont
         + ``lambda_ce_src`` CE(g(f(x_s)), y_s) on the next labelled source batch (source replay; 0: source-free);
     one optimiser step on the student and the projector;
  5. teacher <- ``mt`` teacher + (1 - ``mt``) student (every parameter);
  6. output: s + e, the student's and the teacher's logits before the update (``predict``: the same sum).
SCE(a, b) = -0.5 sum softmax(b) log softmax(a) - 0.5 sum softmax(a) log softmax(b) (``common/losses.py``).
Hyperparameters (CIFAR-10-C): Adam lr 1e-3, betas (0.9, 0.999), wd 0, 1 step, batch 200; LAMBDA_CE_SRC,
LAMBDA_CE_TRG, LAMBDA_CONT 1; NUM_SAMPLES_WARM_UP 50000; CONTRAST.TEMPERATURE 0.1, PROJECTION_DIM 128, MODE 'all';
M_TEACHER.MOMENTUM 0.999; all source images (SOURCE.NUM_SAMPLES -1) in batches of TEST.BATCH_SIZE. Per dataset:
configs/strategies/rmt.yaml.
As the reference, but: the source images are the caller's (``source_data``, shared with ``eata``, ``psmt``, ``lsa``)
in one seeded order that the source batches cycle through (the reference reshuffles its loader at every pass); the
nearest prototype is the argmax of a product of normalised vectors (the reference: ``cosine_similarity`` of
repeated tensors, the same index but at exact near-ties); the projector is initialised as ``nn.Linear`` does under
``torch.manual_seed(seed)`` and the view's random draws (``draw_order="torchvision"``) come from a generator seeded
with ``seed``, so a reference run seeded alike that draws nothing else draws the same numbers.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import UnsupportedError
from ctta.hparams import Count, Momentum, NonNegative, NonNegInt, Positive, Unit

from .base import Strategy, register
from .common import (
    AugmentConfig,
    SourceData,
    TTAAugment,
    as_float_images,
    frozen_copy,
    symmetric_cross_entropy,
    use_batch_statistics,
)
from .common.ema import ensemble_with_source_
from .common.incremental import num_outputs
from .common.prototypes import feature_dim
from .common.source_prototypes import (
    class_means,
    contrastive_loss,
    make_projector,
    nearest_prototype,
    prototype_contrast,
    seeded_source,
    source_class_means,
)

@register
class RMT(Strategy):
    """Mean teacher with symmetric cross-entropy, contrastive alignment to source prototypes, source replay and a
    source warm-up; predicts with the sum of student and teacher logits."""

    name = "rmt"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental"})  # not sfda: prototypes, warm-up and replay read source data
    plugin_refusal = ("it keeps its own teacher copy and calls the model's feature extractor and head separately, "
                      "which a wrapped model would not reach")

    def __init__(self, model: nn.Module, source_data: SourceData = None, source_samples: Optional[Count] = None,
                 source_batch: Count = 200, warmup_samples: NonNegInt = 50000, lambda_ce_src: NonNegative = 1.0,
                 lambda_ce_trg: NonNegative = 1.0, lambda_cont: NonNegative = 1.0, temperature: Positive = 0.1,
                 projection_dim: Count = 128, mt: Unit = 0.999, optimizer: Literal["adam", "sgd"] = "adam",
                 lr: Positive = 1e-3, beta: Momentum = 0.9, momentum: Momentum = 0.9, nesterov: bool = True,
                 weight_decay: NonNegative = 0.0, steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise UnsupportedError(f"rmt needs a backbone with forward_features(x) / forward_head(features) (wrap it "
                                   f"in ctta.backbones.Classifier); {type(model).__name__} has not")
        self.num_classes, dim = num_outputs(model), feature_dim(model)
        self.source_images, self.source_labels = seeded_source(source_data, self.num_classes, source_samples, seed,
                                                               self.name)
        self.source_batch, self.source_index = int(source_batch), 0  # source batches cycle in this order
        self.warmup_steps = int(warmup_samples) // self.source_batch
        self.lambda_ce_src, self.lambda_ce_trg, self.lambda_cont = lambda_ce_src, lambda_ce_trg, lambda_cont
        self.temperature, self.mt, self.lr, self.steps = temperature, mt, lr, steps
        self.model.eval().requires_grad_(True)  # eval: no dropout / stochastic depth (as the reference)
        use_batch_statistics(self.model)
        self.teacher = frozen_copy(self.model)
        device = next(self.model.parameters()).device
        self.projector = make_projector(dim, projection_dim, seed, device)  # global generator untouched
        self.augment = TTAAugment(AugmentConfig(), seed=seed, draw_order="torchvision")
        self.params = [p for n, p in self.model.named_parameters() if n.rsplit(".", 1)[-1] in ("weight", "bias")]
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, dampening=0.0,
                                             weight_decay=weight_decay, nesterov=nesterov)
        self.optimizer.add_param_group({"params": list(self.projector.parameters()), "lr": lr})
        self.register_buffer("prototypes", torch.zeros(self.num_classes, dim, device=device))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool, device=device))  # prototypes + warm-up done
        self.warmups = 0  # warm-ups run by this object (a test counts them)
        self.remember_initial_state()

    # --- step 0: source prototypes and warm-up, once -------------------------------------------------------------
    def next_source_batch(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        """The next labelled source batch (cycling through the seeded order), as floats on ``device``."""
        n, b = self.source_images.shape[0], self.source_batch
        start = self.source_index * b
        self.source_index = (self.source_index + 1) % (-(-n // b))
        return (as_float_images(self.source_images[start:start + b], device),
                self.source_labels[start:start + b].to(device).long())

    def source_prototypes(self, device: torch.device) -> Tensor:
        """Class means of the student's source features, read in source batches (at most ~100000 images)."""
        return source_class_means(self.model, self.source_images, self.source_labels, self.source_batch,
                                  self.num_classes, device)

    def warm_up(self, device: torch.device) -> None:
        """``warmup_steps`` steps of SCE(student, teacher) on source batches, lr rising linearly to ``lr``."""
        self.warmups += 1
        with torch.enable_grad():
            for i in range(self.warmup_steps):
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr * (i + 1) / self.warmup_steps
                xs, _ = self.next_source_batch(device)
                symmetric_cross_entropy(self.model(xs), self.teacher(xs)).mean(0).backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.teacher_update()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def ensure_ready(self, device: torch.device) -> None:
        """Step 0 if not done yet; afterwards ``reset()`` returns to the warmed-up state (as the reference)."""
        if bool(self.ready):
            return
        self.prototypes.copy_(self.source_prototypes(device))
        if self.warmup_steps > 0:
            self.warm_up(device)
        self.ready.fill_(True)
        self.remember_initial_state()

    # --- steps 1-6 ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.ensure_ready(x.device)
        return self.model(x) + self.teacher(x)

    def adapt(self, x: Tensor) -> Tensor:
        self.ensure_ready(x.device)
        return self.stepped(x, self._step, self.steps)

    def _step(self, x: Tensor) -> Tensor:
        features = self.model.forward_features(x)                                          # 1
        logits = self.model.forward_head(features)
        features_aug = self.model.forward_features(self.augment(x, 1))
        logits_aug = self.model.forward_head(features_aug)
        logits_ema = self.teacher(x)
        loss_cont = prototype_contrast(self.prototypes, features, features_aug, self.projector,  # 2, 3
                                       self.temperature)
        loss_self = (0.5 * symmetric_cross_entropy(logits, logits_ema)                     # 4
                     + 0.5 * symmetric_cross_entropy(logits_aug, logits_ema)).mean(0)
        loss = self.lambda_ce_trg * loss_self + self.lambda_cont * loss_cont
        if self.lambda_ce_src > 0:
            xs, ys = self.next_source_batch(x.device)
            loss = loss + self.lambda_ce_src * F.cross_entropy(self.model.forward_head(self.model.forward_features(xs)),
                                                               ys)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher_update()                                                              # 5
        return (logits + logits_ema).detach()                                              # 6

    def teacher_update(self) -> None:
        """Step 5: teacher <- mt teacher + (1 - mt) student, as the reference's ``ema_update_model`` (two products
        and a sum, every parameter)."""
        ensemble_with_source_(list(self.teacher.parameters()), [p.detach() for p in self.model.parameters()], self.mt)

    # --- state ---------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state after step 0 (student, teacher, projector, optimiser), as the reference's reset; the
        view draws and the source batches go on where they were (the reference's global generator and loader)."""
        going_on = self.extra_state()
        super().reset()
        self.load_extra_state(going_on)

    def extra_state(self) -> Any:
        return {"augment": self.augment.get_state(), "source_index": self.source_index}

    def load_extra_state(self, state: Any) -> None:
        if state:
            self.augment.set_state(state["augment"])
            self.source_index = int(state["source_index"])


__all__ = ["RMT", "class_means", "contrastive_loss", "nearest_prototype"]
