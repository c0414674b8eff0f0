"""SAR: sharpness-aware and reliable entropy minimisation (Niu, Wu, Zhang, Wen, Chen, Zhao, Tan, "Towards Stable
Test-Time Adaptation in Dynamic Wild World", ICLR 2023, arXiv 2302.12400; code github.com/mr-eggplant/SAR).

Adapted: the affine scale and shift of the normalisation layers (BatchNorm on test-batch statistics), except the
top layers SAR leaves frozen (``freeze_top``: a ResNet's ``layer4``, a ViT-B's ``blocks.9``-``blocks.11`` and its
final ``norm``). Per test batch x (``steps`` times), with E(x) the softmax entropy and E0 = ``e_margin`` ln C:
  1. logits at w; S1 = {x : E(x) < E0} (reliable samples, Eqn. 2); L1 = mean of E over S1; g = grad L1;
  2. SAM (Eqn. 4-5): e = rho g / ||g||; logits at w + e; S2 = {x in S1 : E(x; w + e) < E0} (filtered again, the
     weights having moved); L2 = mean of E(x; w + e) over S2; back to w; one SGD step along grad L2 at w + e;
  3. model recovery (Eqn. 6-7): ema <- 0.9 ema + 0.1 L2 (started at the first L2; a step whose S2 is empty leaves
     it); if ema < e_m = ``reset_constant`` after the step, the adapted parameters return to their initial values
     and the EMA is forgotten (``strategies/common/recovery.py``, shared with ``rsgs``).
  The prediction returned is the logits of step 1 (before the update). An empty S1 gives zero gradients (no
  perturbation); the SGD step still applies the momentum, as the code does.
As the reference benchmark's ``SAR`` (mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/sar.py``,
which builds on mr-eggplant/SAR@20f6e24 ``sar.py`` and its davda54/sam ``SAM``): the means are over the kept
samples (a host synchronisation per forward, as the reference's indexing), the perturbation is undone by copying
the weights back, and a recovery leaves the SGD momentum as it is (its SAM optimiser is reset with
``load_state_dict``, which does not reach the base SGD's buffers; ``reset_momentum: true`` clears them). The
reference forgets the EMA after a recovery (the original code keeps it: its ``forward`` overwrites the reset).
Hyperparameters (``conf.py`` + ``cfgs/cifar10_c/sar.yaml``): SGD (SAR always builds SAM on SGD; the config's
``METHOD: Adam`` and ``BETA`` are not read), lr 1e-3, momentum 0.9 (``OPTIM.MOMENTUM``; no Nesterov, no weight
decay, not passed), rho 0.05 (SAM's default), E0 = 0.4 ln C (``EATA.MARGIN_E0``), e_m = 0.2
(``SAR.RESET_CONSTANT_EM``), 1 step, batch 200. ImageNet-C: lr 2.5e-4 at batch 64 (ViT/Swin: 1e-3).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import Strategy, register
from .common import is_top_layer, sar_parameters, softmax_entropy, use_batch_statistics
from .common.incremental import num_outputs
from .common.recovery import LossEMARecovery
from .common.sam import sam_step


@register
class SAR(Strategy):
    """Reliable (entropy-filtered) SAM entropy minimisation of the norm affines, with model recovery."""

    name = "sar"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, lr: Positive = 1e-3, momentum: Momentum = 0.9, rho: Positive = 0.05,
                 e_margin: Positive = 0.4, reset_constant: NonNegative = 0.2, ema_momentum: Unit = 0.9,
                 reset_momentum: bool = False, freeze_top: bool = True, steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.steps, self.rho = int(steps), float(rho)
        self.threshold = float(e_margin) * math.log(num_outputs(model))
        self.model.eval().requires_grad_(False)  # eval: no dropout / stochastic depth (as the reference)
        use_batch_statistics(self.model)
        named = sar_parameters(self.model, freeze_top)
        if not named:
            raise ConfigError("sar needs normalisation layers with affine parameters (outside the top layers)")
        self.params = [p for _, p in named]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        self.recovery = LossEMARecovery(self.params, self.optimizer, reset_constant, ema_momentum,
                                        clear_momentum=reset_momentum)
        self.last_kept: Optional[Tuple[int, int]] = None  # (|S1|, |S2|) of the last step
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def adapt(self, x: Tensor) -> Tensor:
        return self.stepped(x, self._step, self.steps)

    def _step(self, x: Tensor) -> Tensor:
        state: dict = {}

        def closure(perturbed: bool) -> Tensor:
            logits = self.model(x)
            if not perturbed:  # step 1: reliable samples at w
                ent = softmax_entropy(logits)
                state["logits"], state["s1"] = logits.detach(), ent.detach() < self.threshold
                return ent[state["s1"]].mean(0)
            ent = softmax_entropy(logits)[state["s1"]]  # step 2: S1 filtered again at w + e
            s2 = ent.detach() < self.threshold
            loss = ent[s2].mean(0)
            state["loss2"], state["kept2"] = loss.detach(), s2.sum()
            return loss

        self.optimizer.zero_grad(set_to_none=True)
        sam_step(self.params, closure, self.rho)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.recovery.recover_if_collapsing(state["loss2"], state["kept2"])  # step 3
        self.last_kept = (int(state["s1"].sum()), int(state["kept2"]))
        return state["logits"]


__all__ = ["SAR", "is_top_layer", "sar_parameters"]
