"""RoTTA: robust test-time adaptation in dynamic scenarios (Yuan, Xie, Li, "Robust Test-Time Adaptation in Dynamic
Scenarios", CVPR 2023, arXiv 2303.13899; code github.com/BIT-DA/RoTTA).

Model: every BatchNorm becomes a robust BatchNorm (RBN, ``strategies/common/robust_bn.py``): global statistics
updated by EMA with rate ``alpha`` in train mode, used as they are in eval mode. Student: the model, adapting the
affines of its norm layers (RBN, and LayerNorm / GroupNorm ones); teacher: a copy, the EMA of the student.
Memory: CSTU, ``memory_size`` samples, category-balanced, timeliness and uncertainty (``common/balanced_memory.py``).
Per test batch x:
  1. prediction: teacher logits on x in eval mode (the output, made before any update of this batch);
     pseudo-labels y = argmax p and uncertainties u = -sum p log(p + 1e-6), p = softmax;
  2. for each sample in order: offer (x_i, y_i, u_i) to the memory; after every ``update_frequency``-th sample seen
     (counted across batches), one update:
     a. the memory's images m and ages A (insertions seen / ``memory_size``); models in train mode (RBN updates);
     b. teacher logits on m, student logits on a strong augmentation of m (CoTTA's, one random draw per update);
     c. loss = mean_i w_i CE(softmax teacher_i, student_i), w = exp(-A) / (1 + exp(-A)) (time-aware reweighting);
        one optimiser step on the student;
     d. teacher <- (1 - nu) teacher + nu student, over all parameters.
As the reference benchmark's ``RoTTA`` (mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/
rotta.py``, after BIT-DA/RoTTA ``core/adapter/rotta.py``): the EMA written as its ``ema_update_model`` with momentum
1 - nu (two products and a sum), its ``get_tta_transforms`` (CIFAR ranges for every data set, edge padding, blur,
noise) drawn in torchvision's order from a CPU generator seeded with ``seed`` (the reference: torch's global one).
The reference at that commit calls ``loss_calculation(x)``, which takes no argument, on every path but mixed
precision on CUDA; the method is what it computes once that call is fixed.
Hyperparameters (``conf.py`` ``_C.ROTTA`` + ``cfgs/{cifar10_c,cifar100_c,imagenet_c}/rotta.yaml``, equal to
BIT-DA/RoTTA's ``configs/adapter/rotta.yaml``): memory 64, update every 64 samples, nu 0.001, alpha 0.05,
lambda_t = lambda_u = 1, Adam lr 1e-3, beta 0.9, wd 0; batch 64 in the original, 200 in the benchmark's CIFAR configs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import Strategy, register
from .common import AugmentConfig, TTAAugment, frozen_copy, norm_affine_parameters, soft_cross_entropy
from .common.balanced_memory import CategoryBalancedMemory, timeliness_weights
from .common.ema import ensemble_with_source_
from .common.incremental import num_outputs
from .common.optim import adam_or_sgd
from .common.robust_bn import use_robust_batchnorm_


@register
class RoTTA(Strategy):
    """Robust BatchNorm, a category-balanced memory (CSTU) and a time-reweighted mean teacher on strong views."""

    name = "rotta"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})
    plugin_refusal = "it keeps its own copy of the model (the teacher), which a wrapped model would not reach"

    def __init__(self, model: nn.Module, memory_size: Count = 64, update_frequency: Count = 64, nu: Unit = 0.001,
                 alpha: Unit = 0.05, lambda_t: NonNegative = 1.0, lambda_u: NonNegative = 1.0,
                 optimizer: Literal["adam", "sgd"] = "adam", lr: Positive = 1e-3, beta: Momentum = 0.9,
                 momentum: Momentum = 0.9, nesterov: bool = True, weight_decay: NonNegative = 0.0,
                 soft_augment: bool = False, hflip_p: Optional[Unit] = None, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.update_frequency, self.nu = int(update_frequency), float(nu)
        self.model.requires_grad_(False)
        self.rbn_layers = use_robust_batchnorm_(self.model, alpha)
        self.params = [p for _, p in norm_affine_parameters(self.model)]
        if not self.params:
            raise ConfigError("rotta needs normalisation layers with affine parameters; the backbone has none")
        for p in self.params:
            p.requires_grad_(True)
        self.teacher = frozen_copy(self.model)
        self.model.eval(), self.teacher.eval()
        self.optimizer = adam_or_sgd(self.params, optimizer, lr, beta, momentum, nesterov, weight_decay)
        self.memory = CategoryBalancedMemory(memory_size, num_outputs(model), lambda_t, lambda_u)
        aug = AugmentConfig.soft() if soft_augment else AugmentConfig()
        if hflip_p is not None:
            aug = dataclasses.replace(aug, hflip_p=hflip_p)  # e.g. 0 for digits (a mirror image is another class)
        self.augment = TTAAugment(aug, seed=seed, draw_order="torchvision")
        self.seen = 0  # test samples offered to the memory so far
        self.updates = 0
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.teacher.eval()
        return self.teacher(x)

    def adapt(self, x: Tensor) -> Tensor:
        with torch.no_grad():  # step 1
            self.model.eval()
            logits = self.predict(x)
            probs = torch.softmax(logits, dim=1)
            labels = torch.argmax(probs, dim=1).tolist()
            uncertainty = torch.sum(-probs * torch.log(probs + 1e-6), dim=1).tolist()
        for i in range(x.shape[0]):  # step 2
            self.memory.add(x[i], labels[i], uncertainty[i])
            self.seen += 1
            if self.seen % self.update_frequency == 0:
                self.update()
        return logits

    def update(self) -> None:
        """Steps 2a-2d: one student step on the memory against the teacher, then the teacher's EMA."""
        self.model.train(), self.teacher.train()
        images, ages = self.memory.get()
        strong = self.augment(images, 1)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        with torch.enable_grad():
            loss = (soft_cross_entropy(self.model(strong), teacher_logits) * timeliness_weights(ages)).mean()
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ensemble_with_source_(list(self.teacher.parameters()), [p.detach() for p in self.model.parameters()],
                              1 - self.nu)
        self.model.eval(), self.teacher.eval()
        self.updates += 1

    def extra_state(self) -> Any:
        return {"augment": self.augment.get_state(), "memory": self.memory.host_state(), "seen": self.seen,
                "updates": self.updates}

    def load_extra_state(self, state: Any) -> None:
        if state:
            self.augment.set_state(state["augment"])
            self.memory.load_host_state(state["memory"])
            self.seen, self.updates = int(state["seen"]), int(state["updates"])


__all__ = ["RoTTA"]
