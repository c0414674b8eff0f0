"""EATA: efficient anti-forgetting test-time adaptation (Niu, Wu, Zhang, Chen, Zheng, Zhao, Tan, "Efficient Test-Time
Model Adaptation without Forgetting", ICML 2022, arXiv 2204.02610; code github.com/mr-eggplant/EATA).

Adapted: the affine scale and shift of every normalisation layer (BatchNorm on test-batch statistics). Before the
first test batch, once (``fisher_weight > 0``), at the source weights theta_s:
  0. Fisher (Eqn. 9): F = mean over batches (``fisher_batch``) of ``source_samples`` source images (``source_data``,
     shuffled) of the squared gradients of CE(f(x), argmax f(x)) (``strategies/common/fisher.py``).
Per test batch x (``steps`` times), with E(x) the softmax entropy, E0 = ``e_margin`` ln C and m the moving average
of the model's predicted probabilities (unset at the start and after a reset):
  1. S1 = {x : E(x) < E0} (reliable samples, Eqn. 3);
  2. S2 = {x in S1 : |cos(m, softmax f(x))| < ``d_margin``} (non-redundant samples, Eqn. 5; S2 = S1 while m is
     unset); m <- mean of softmax f(x) over S2 if unset, else 0.9 m + 0.1 mean (Eqn. 4; kept when S2 is empty);
  3. loss = mean over S2 of E(x) / exp(E(x) - E0) (the weight detached, Eqn. 6)
            + ``fisher_weight`` sum_i F_i (theta_i - theta_s,i)^2 (Eqn. 8);
     one optimiser step if S2 is not empty (no step at all otherwise);
  4. ``reset_every`` > 0 (RDumb): after every ``reset_every`` steps, back to the state at construction (weights,
     optimiser, m); the Fisher is kept.
  The prediction returned is the logits of the step's forward, before its update.
As the reference benchmark's ``EATA`` (mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/eata.py``,
7ab8781, which builds on mr-eggplant/EATA; its ``eta`` and ``rdumb`` configs are this class with other values):
means over the selected samples (a host synchronisation per step, as its indexing), model in ``eval()`` mode with
BatchNorm on batch statistics, the step counter of ``reset_every`` counting steps with and without an update.
Hyperparameters (``conf.py`` + ``cfgs/cifar10_c/eata.yaml``): Adam lr 1e-3, beta 0.9, wd 0, 1 step, batch 200;
E0 = 0.4 ln C (``EATA.MARGIN_E0``), ``EATA.D_MARGIN`` 0.4, ``EATA.FISHER_ALPHA`` 1.0, 2000 source samples
(``SOURCE.NUM_SAMPLES``) in batches of ``TEST.BATCH_SIZE`` (200); the 0.9 of m is hard-coded there. ImageNet-C and
CIFAR-100-C values: configs/strategies/eata.yaml. The source images are the caller's (``source_data``, shared with
``psmt`` and ``lsa``): a seeded random subset in a seeded order (the reference draws its own with ``random.sample``
and a shuffled loader).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, NonNegInt, Positive, Unit
from ctta.seeding import stable_seed

from .base import Strategy, register
from .common import (
    SourceData,
    fisher_penalty,
    load_source_data,
    norm_affine_parameters,
    softmax_entropy,
    source_fisher,
    use_batch_statistics,
)
from .common.incremental import num_outputs


@register
class EATA(Strategy):
    """Reliable, non-redundant, entropy-weighted entropy minimisation of the norm affines with a source Fisher
    penalty; optionally reset every ``reset_every`` steps."""

    name = "eata"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental"})  # not sfda: the Fisher reads source data

    def __init__(self, model: nn.Module, source_data: SourceData = None, source_samples: Optional[Count] = 2000,
                 fisher_batch: Count = 200, fisher_weight: NonNegative = 1.0, e_margin: Positive = 0.4,
                 d_margin: Unit = 0.4, probs_momentum: Unit = 0.9, optimizer: Literal["adam", "sgd"] = "adam",
                 lr: Positive = 1e-3, beta: Momentum = 0.9, momentum: Momentum = 0.9, nesterov: bool = True,
                 weight_decay: NonNegative = 0.0, steps: Count = 1, reset_every: NonNegInt = 0,
                 seed: int = 0) -> None:
        super().__init__(model, seed)
        self.fisher_weight, self.d_margin, self.probs_momentum = float(fisher_weight), float(d_margin), probs_momentum
        self.steps, self.reset_every = int(steps), int(reset_every)
        num_classes = num_outputs(model)
        self.e0 = float(e_margin) * math.log(num_classes)
        self.source_images: Optional[Tensor] = None
        if self.fisher_weight > 0:  # read the source data first: a missing set is a one-line error
            x, _ = load_source_data(source_data, num_classes, source_samples, seed, self.name)
            order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(
                stable_seed(seed, f"{self.name}-fisher-order")))
            self.source_images = x[order]
        self.fisher_batch = int(fisher_batch)
        self.model.eval().requires_grad_(False)  # eval: no dropout / stochastic depth (as the reference)
        use_batch_statistics(self.model)
        named = norm_affine_parameters(self.model)
        if not named:
            raise ConfigError(f"{self.name} needs normalisation layers with affine parameters; the backbone has none")
        self.params = [p for _, p in named]
        for p in self.params:
            p.requires_grad_(True)
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=nesterov,
                                             weight_decay=weight_decay)
        self.source_state: Dict[str, Tensor] = {n: p.detach().clone() for n, p in named}
        #: the source Fisher (computed once, at the first step, then fixed); None until then or without it
        self.fisher: Optional[Dict[str, Tensor]] = None
        self.register_buffer("model_probs", torch.zeros(num_classes))  # m of Eqn. 4
        self.register_buffer("probs_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # steps since the last reset
        self.last_kept: Optional[Tuple[int, int]] = None  # (|S1|, |S2|) of the last step
        self.remember_initial_state()

    # --- step 0: the source Fisher --------------------------------------------------------------------------
    def ensure_fisher(self) -> Optional[Dict[str, Tensor]]:
        if self.fisher_weight <= 0:
            return None
        if self.fisher is None:
            if self.source_images is None:
                raise RuntimeError(f"{self.name}: the source Fisher is gone and its source images were released")
            net = copy.deepcopy(self.model)
            with torch.no_grad():
                for n, p in net.named_parameters():
                    if n in self.source_state:
                        p.copy_(self.source_state[n])
            self.fisher = source_fisher(net, self.source_images, self.fisher_batch)
            self.source_images = None
        return self.fisher

    # --- steps 1-4 ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def adapt(self, x: Tensor) -> Tensor:
        return self.stepped(x, self._counted_step, self.steps)

    def _counted_step(self, x: Tensor) -> Tensor:
        """One step, counted; RDumb's full reset every ``reset_every`` steps."""
        prediction = self._step(x)
        self.updates.add_(1)
        if self.reset_every > 0 and int(self.updates) % self.reset_every == 0:
            self.reset()
        return prediction

    def _step(self, x: Tensor) -> Tensor:
        fisher = self.ensure_fisher()
        with torch.enable_grad():
            logits = self.model(x)
            ent = softmax_entropy(logits)
            s1 = ent.detach() < self.e0                                                   # 1: reliable
            ent, selected = ent[s1], logits[s1]
            if bool(self.probs_set):                                                      # 2: non-redundant
                cos = F.cosine_similarity(self.model_probs.unsqueeze(0), selected.softmax(1), dim=1)
                s2 = cos.detach().abs() < self.d_margin
                ent, selected = ent[s2], selected[s2]
            self._update_probs(selected.detach().softmax(1))
            kept = ent.shape[0]
            weight = 1 / torch.exp(ent.detach() - self.e0)                                # 3: entropy weight
            loss = ent.mul(weight).mean(0)
            if fisher is not None:
                loss = loss + self.fisher_weight * fisher_penalty(dict(self.model.named_parameters()),
                                                                  self.source_state, fisher)
            if kept > 0:
                loss.backward()
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.last_kept = (int(s1.sum()), kept)
        return logits.detach()

    @torch.no_grad()
    def _update_probs(self, probs: Tensor) -> None:
        """Eqn. 4: the moving average m of the selected samples' probabilities (set at the first non-empty batch)."""
        if probs.shape[0] == 0:
            return
        mean = probs.mean(0)
        if bool(self.probs_set):
            m = self.probs_momentum
            self.model_probs.copy_(m * self.model_probs + (1 - m) * mean)
        else:
            self.model_probs.copy_(mean)
            self.probs_set.fill_(True)

    # --- state ----------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):  # keep the source weights and the Fisher on the model's device
        out = super()._apply(fn, recurse)
        if hasattr(self, "source_state"):
            self.source_state = {k: fn(v) for k, v in self.source_state.items()}
        if getattr(self, "fisher", None) is not None:
            self.fisher = {k: fn(v) for k, v in self.fisher.items()}
        return out

    def extra_state(self) -> Any:
        return {"fisher": None if self.fisher is None else {k: v.clone() for k, v in self.fisher.items()}}

    def load_extra_state(self, state: Any) -> None:
        # a saved Fisher is loaded (resume); the initial state has none, and a reset keeps the one computed
        if state and state.get("fisher") is not None:
            dev = self.params[0].device
            self.fisher = {k: v.to(dev) for k, v in state["fisher"].items()}
            self.source_images = None


__all__ = ["EATA"]
