"""PSMT: Parameter-Selective Mean Teacher (Tian & Lyu, "Parameter-Selective Continual Test-Time Adaptation", ACCV 2024,
arXiv 2407.02253).

``variant: released`` (default) is the released code: JiaxuTian/PSMT, ``classification/methods/psmt.py`` at commit
2c74335843fbe73bbcdc394a987d138d0f850ee2, with the values of its ``classification/cfgs/cifar10_c/psmt.yaml`` and the
constants of that file. Once, before the first test batch (run lazily on the device, at the source weights theta_s):
  0. EWC Fisher on source data: F = mean over batches (``fisher_batch`` = 200) of ``source_samples`` = 10000 source
     images of the squared gradients of CE(f(x), argmax f(x)) (BatchNorm on batch statistics, as at test time).
Per test batch x (``steps`` times):
  1. teacher logits t = f_teacher(x), student logits s = f_student(x);
  2. loss = SCE(s, t) + ``fisher_weight`` * sum_i F_i (theta_i - theta_s,i)^2, SCE = RMT's symmetric cross-entropy
     (``sce_alpha`` = 0.5); one Adam step on every weight and bias;
  3. importance g_i^2 = the squared gradients of that loss (this batch); the elements strictly below the
     ``restore_share`` = 3% quantile of g^2 over all elements (linear interpolation) form the restore mask m;
  4. teacher <- mt teacher + (1 - mt) student  (first EMA step, with the updated student);
  5. student: where m, back to the source weights;
  6. teacher: where m, the student's value (the source weight); elsewhere a second EMA step with the student
     (``update_ema_variables_two``), so unmasked teacher weights move by 1 - mt^2 per batch;
  7. output: t + s, the sum of the teacher's and the student's logits before the update.
Values: Adam lr 1e-3, betas (0.9, 0.999), wd 0, 1 step, mt 0.999 (cfg OPTIM / M_TEACHER), ``lamb = 500``,
``perc = 0.03``, ``num_samples=10000`` and the Fisher loader's batch ``cfg.TEST.BATCH_SIZE`` = 200 (psmt.py).
Where the released code does something that changes nothing, it is not done here:
- its 32 "augmented" teacher views are 32 forwards of the plain batch (the transform is commented out) and its
  second student forward on "augmented" inputs is overwritten by a plain one: one forward of each model here;
  the anchor (source model) confidence and cfg ``COTTA.AP`` (0.72) only choose between these identical predictions;
- cfg ``COTTA.RST`` (0.01) only switches the restore of step 5 on (its value is never used: the mask is chosen,
  not drawn); ``restore_share: 0`` restores nothing but keeps step 6's second EMA step, as that code would.
- that cfg file is a copy of the CIFAR-100-C one (``ADAPTATION: cotta``, ``DATASET: cifar100_c``): its OPTIM,
  M_TEACHER and COTTA values are the ones taken; the source images are our CIFAR train set (``source_data``).
Masks and the restore are matched by parameter name (the released code zips ``parameters()`` with a list built
from ``named_modules()``, the same order for networks whose parameters are all weights and biases).

``variant: paper`` is this project's earlier reading of the paper, without source data (test-time data only):
  1. pseudo-label: the teacher's prediction, augmentation-averaged over ``views`` copies when the frozen source
     model's mean confidence on x is below ``ap`` (CoTTA's rule, ``common/mean_teacher.py``);
  2. student consistency loss: CoTTA's soft cross-entropy against the pseudo-label; its squared gradients give F
     (per batch, or a running mean with ``fisher_decay`` > 0);
  3. selective distillation: plus ``fisher_weight * sum_i F_i (theta_i - theta*_i)^2`` with theta* the teacher's
     weights (``anchor: teacher``; the paper's theta_{t-1} would make the penalty zero) or the source weights
     (``anchor: source``); one Adam step;
  4. selective teacher update: the top ``preserve_ratio`` of elements by F keep their teacher value, the others
     take one EMA step; 5. optional CoTTA stochastic restore (``rst``); 6. output: the pseudo-label.
Options of one variant are ignored by the other: released uses ``source_data``, ``source_samples``,
``fisher_batch``, ``restore_share``, ``sce_alpha``; paper uses ``ap``, ``views``, ``preserve_ratio``,
``fisher_decay``, ``anchor``, ``rst``, ``soft_augment``, ``hflip_p``, ``views_per_chunk``.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Literal, Optional, Union

import torch
from torch import Tensor, nn

from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit
from ctta.seeding import stable_seed

from .base import Strategy, register
from .common import (
    DiagonalFisher,
    SourceData,
    copy_or_ema_update_,
    ema_update_,
    fisher_penalty,
    frozen_copy,
    load_source_data,
    lowest_fraction_masks,
    make_augment,
    masked_ema_update_,
    masked_restore_,
    masks_for,
    soft_cross_entropy,
    source_fisher,
    stochastic_restore_,
    symmetric_cross_entropy,
    teacher_pseudo_label,
    top_fraction_masks,
    use_batch_statistics,
)


def _is_weight(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("weight", "bias")


@register
class PSMT(Strategy):
    """Mean teacher with a source-data Fisher penalty, a lowest-importance restore of student and teacher, and a
    teacher + student output (released); or the paper-reading variant (Fisher-masked EMA, CoTTA pseudo-labels)."""

    name = "psmt"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental"})  # not sfda: the released PSMT reads source data
    plugin_refusal = "it keeps its own copies of the model (teacher), which a wrapped model would not reach"

    def __init__(self, model: nn.Module, variant: Literal["released", "paper"] = "released",
                 source_data: SourceData = None, source_samples: Optional[Count] = 10000, fisher_batch: Count = 200,
                 lr: Positive = 1e-3, beta: Momentum = 0.9, weight_decay: NonNegative = 0.0, steps: Count = 1,
                 mt: Unit = 0.999, fisher_weight: NonNegative = 500.0, restore_share: Unit = 0.03,
                 sce_alpha: Unit = 0.5, ap: NonNegative = 0.92, views: Count = 32, preserve_ratio: Unit = 0.03,
                 fisher_decay: Momentum = 0.0, anchor: Literal["teacher", "source"] = "teacher", rst: Unit = 0.0,
                 soft_augment: bool = False, hflip_p: Optional[Unit] = None,
                 views_per_chunk: Union[Count, Literal["auto"]] = "auto", seed: int = 0) -> None:
        super().__init__(model, seed)
        self.variant = variant
        self.steps, self.mt, self.fisher_weight = steps, mt, fisher_weight
        if variant == "released":
            # read the source data first: a missing or unreadable set is a one-line error before any copy is made
            x, _ = load_source_data(source_data, getattr(model, "num_classes", None), source_samples, seed, "psmt")
            order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(
                stable_seed(seed, "psmt-fisher-order")))  # the released Fisher loader shuffles
            self.source_images: Optional[Tensor] = x[order]
            self.fisher_batch, self.restore_share, self.sce_alpha = fisher_batch, restore_share, sce_alpha
            self.model.eval()  # as released: eval mode (no dropout / stochastic depth), BatchNorm on batch statistics
        else:
            self.ap, self.views, self.rst, self.views_per_chunk = ap, views, rst, views_per_chunk
            self.preserve_ratio, self.anchor_kind = preserve_ratio, anchor
            self.model.train()
        self.model.requires_grad_(True)
        use_batch_statistics(self.model)
        self.source_state: Dict[str, Tensor] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.teacher = frozen_copy(self.model)
        named = [(n, p) for n, p in self.model.named_parameters() if _is_weight(n)]
        self.optimizer = torch.optim.Adam([p for _, p in named], lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
        #: released: the source Fisher (computed once, then fixed); None until the first adapt step
        self.fisher: Optional[Dict[str, Tensor]] = None
        if variant == "paper":
            self.anchor = frozen_copy(self.model)
            self.augment = make_augment(soft_augment, hflip_p, seed)
            self.batch_fisher = DiagonalFisher(named, decay=fisher_decay)
            # a test may pin the update mask (1 = EMA step); None = from the Fisher information each step
            self.fixed_update_mask: Optional[Dict[str, Tensor]] = None
        self.remember_initial_state()

    # --- the source Fisher (released) ------------------------------------------------------------------------
    def ensure_fisher(self) -> Dict[str, Tensor]:
        """Step 0, once: the EWC Fisher of the source weights on the source images, on the model's device."""
        if self.fisher is None:
            if self.source_images is None:
                raise RuntimeError("psmt: the source Fisher is gone and its source images were released")
            net = copy.deepcopy(self.model)
            with torch.no_grad():
                for n, p in net.named_parameters():
                    p.copy_(self.source_state[n])
            self.fisher = source_fisher(net, self.source_images, self.fisher_batch)
            self.source_images = None  # 10000 CIFAR images: 30 MB not needed again (the Fisher is kept and saved)
        return self.fisher

    def restore_masks(self) -> Dict[str, Tensor]:
        """Step 3: True where the squared gradient of this batch's loss is below the ``restore_share`` quantile."""
        importance = {n: p.grad.detach().square() for n, p in self.model.named_parameters()
                      if _is_weight(n) and p.requires_grad and p.grad is not None}
        return lowest_fraction_masks(importance, self.restore_share)

    # --- steps -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        if self.variant == "released":
            return self.teacher(x) + self.model(x)
        return self.teacher(x)

    def adapt(self, x: Tensor) -> Tensor:
        out = x.new_empty(0)
        for _ in range(self.steps):
            out = self._released_step(x) if self.variant == "released" else self._paper_step(x)
        return out

    def _released_step(self, x: Tensor) -> Tensor:
        fisher = self.ensure_fisher()
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        with torch.enable_grad():
            student_logits = self.model(x)
            loss = symmetric_cross_entropy(student_logits, teacher_logits, self.sce_alpha).mean()
            if self.fisher_weight > 0:
                params = dict(self.model.named_parameters())
                loss = loss + self.fisher_weight * fisher_penalty(params, self.source_state, fisher)
            loss.backward()
        restore = self.restore_masks()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update_(self.teacher, self.model, self.mt)                    # step 4
        masked_restore_(self.model, self.source_state, restore)           # step 5
        copy_or_ema_update_(self.teacher, self.model, self.mt, restore)   # step 6
        return teacher_logits + student_logits.detach()                   # step 7

    def _paper_step(self, x: Tensor) -> Tensor:
        pseudo = teacher_pseudo_label(self.teacher, self.anchor, self.augment, x, self.ap, self.views,
                                      self.views_per_chunk)
        with torch.enable_grad():
            soft_cross_entropy(self.model(x), pseudo).mean().backward()
            self.batch_fisher.update_()
            if self.fisher_weight > 0:
                params = dict(self.model.named_parameters())
                anchor = self.source_state if self.anchor_kind == "source" else dict(self.teacher.named_parameters())
                (self.fisher_weight * fisher_penalty(params, anchor, self.batch_fisher.values)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        masked_ema_update_(self.teacher, self.model, self.mt, masks_for(self.teacher, self.update_mask()))
        stochastic_restore_(self.model, self.source_state, self.rst, self.generator(x.device))
        return pseudo

    def update_mask(self) -> Dict[str, Tensor]:
        """Paper variant: True where the teacher takes the EMA step, all but the top ``preserve_ratio`` of F."""
        if self.fixed_update_mask is not None:
            return self.fixed_update_mask
        preserve = top_fraction_masks(self.batch_fisher.values, self.preserve_ratio)
        return {n: ~m for n, m in preserve.items()}

    # --- state -----------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):  # keep the source weights and the Fisher values on the model's device
        out = super()._apply(fn, recurse)
        if hasattr(self, "source_state"):
            self.source_state = {k: fn(v) for k, v in self.source_state.items()}
        if getattr(self, "fisher", None) is not None:
            self.fisher = {k: fn(v) for k, v in self.fisher.items()}
        if hasattr(self, "batch_fisher"):
            self.batch_fisher.values = {k: fn(v) for k, v in self.batch_fisher.values.items()}
        return out

    def extra_state(self) -> Any:
        if self.variant == "released":
            return {"fisher": None if self.fisher is None else {k: v.clone() for k, v in self.fisher.items()}}
        return {"augment": self.augment.get_state(), "fisher": self.batch_fisher.state_dict()}

    def load_extra_state(self, state: Any) -> None:
        if not state:
            return
        if self.variant == "released":
            # a saved Fisher is loaded (resume); the initial state has none, and reset keeps the one computed
            if state.get("fisher") is not None:
                dev = next(self.model.parameters()).device
                self.fisher = {k: v.to(dev) for k, v in state["fisher"].items()}
                self.source_images = None
            return
        self.augment.set_state(state["augment"])
        self.batch_fisher.load_state_dict(state["fisher"])
