"""GDumb: a greedy class-balanced sampler and a dumb learner trained from scratch on the memory only.

Prabhu, Torr, Dokania, "GDumb: A Simple Approach that Questions Our Progress in Continual Learning", ECCV 2020
(robots.ox.ac.uk/~tvg/publications/2020/gdumb.pdf). Reference code: the official github.com/drimpossible/GDumb@4f412d7
(``src/main.py`` ``experiment`` / ``train``, ``src/utils.py`` ``cutmix_data``, ``src/opts.py`` defaults,
``scripts/replicate.sh`` for CIFAR-10) and aimagelab/mammoth@e75a491 (``models/gdumb.py`` ``fit_buffer``,
``utils/best_args.py`` seq-cifar10); hyperparameters in ``configs/strategies/gdumb.yaml``.

The algorithm:

1. sampler (the paper's Alg. 1, ``GreedyClassBalancedBuffer``): every labelled sample is offered to a memory of
   ``buffer_size``; it enters while there is room, else only if its class holds fewer than ``k / |classes seen|``,
   replacing a random sample of the largest class. Nothing is trained while batches arrive;
2. learner, at every session end (the paper trains the dumb learner whenever it is asked to predict): the network
   goes back to its initial weights (the same ones each time) and is trained on the memory alone for ``epochs``
   passes: SGD (``maxlr``, momentum, weight decay), one warm-up epoch at ``maxlr / 10``, then ``maxlr`` and
   cosine annealing with warm restarts (T_0 1, T_mult 2, down to ``minlr``) stepped per epoch; each pass is a
   shuffled permutation of the memory in minibatches of ``batch_size``, each minibatch CutMixed with probability
   ``cutmix_prob`` (``strategies/common/cutmix.py``), the cross-entropy over every output, gradient norm clipped
   at ``clip`` (0: none);
3. prediction: the retrained network, over the classes seen so far (before the first retraining: the initial one).

Where the two references differ, the official code is followed (it produced the paper's numbers): the greedy
sampler (Mammoth fills a reservoir buffer: ``sampler: reservoir`` reproduces it), cutmix probability 0.5 (Mammoth's
``cutmix_data`` default too), gradient clipping at 10 (Mammoth none), batch 16 (Mammoth the stream's 32), the same
initial weights at every retraining (the official code trains once, from the weights it built; Mammoth builds a new
random network and retrains only after the last task). Not reproduced: the official code's random crop and flip of
the memory (none here, as the other class-incremental strategies), its float16 training, and its reporting of the
best test accuracy over the passes (here the last pass's network).
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import register
from .common.cutmix import cutmix
from .common.incremental import IncrementalStrategy
from .common.replay import GreedyClassBalancedBuffer, ReservoirBuffer

log = logging.getLogger(__name__)


@register
class GDumb(IncrementalStrategy):
    """Greedy class-balanced memory; at every session end, the initial network trained from scratch on it."""

    name = "gdumb"

    def __init__(self, model: nn.Module, buffer_size: Count = 500, epochs: Count = 256, maxlr: Positive = 0.05,
                 minlr: NonNegative = 5e-4, momentum: Momentum = 0.9, weight_decay: NonNegative = 1e-6,
                 batch_size: Count = 16, cutmix_alpha: NonNegative = 1.0, cutmix_prob: Unit = 0.5,
                 clip: NonNegative = 10.0, sampler: Literal["greedy", "reservoir"] = "greedy",
                 mask_unseen: bool = True, seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen)
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.maxlr, self.minlr = float(maxlr), float(minlr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.cutmix_alpha, self.cutmix_prob, self.clip = float(cutmix_alpha), float(cutmix_prob), float(clip)
        self.sampler = sampler
        self.buffer = GreedyClassBalancedBuffer(int(buffer_size)) if sampler == "greedy" \
            else ReservoirBuffer(int(buffer_size))
        self.model.requires_grad_(True)
        self.model.eval()
        self.optimizer = self.new_optimizer()  # the retraining's (rebuilt at each): what the cost report counts
        self._evict_gen = torch.Generator().manual_seed(seed)  # the greedy sampler's draws (host)
        self._rng = np.random.default_rng(seed)  # cutmix's scalar draws (host)
        self.remember_initial_state()

    def new_optimizer(self) -> torch.optim.SGD:
        """SGD at ``maxlr`` with the paper's momentum and weight decay over every weight."""
        return torch.optim.SGD(self.model.parameters(), lr=self.maxlr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    # --- the stream: store only ------------------------------------------------------------------------------
    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """Offer the batch to the memory; the logits are the current network's (nothing is trained here)."""
        with torch.no_grad():
            out = self.mask(self.logits(x))
        if isinstance(self.buffer, GreedyClassBalancedBuffer):
            self.buffer.add(x, y, self._evict_gen)
        else:
            self.buffer.add(x, y, self.generator(x.device))
        return out

    def logits(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.model(x)

    # --- the dumb learner ------------------------------------------------------------------------------------
    def end_session(self, session: int) -> None:
        """Back to the initial weights, then ``epochs`` passes over the memory (warm-up, cosine warm restarts)."""
        if len(self.buffer) == 0:
            return
        self.restore_initial_model()
        self.optimizer = self.new_optimizer()
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(self.optimizer, T_0=1, T_mult=2,
                                                                         eta_min=self.minlr)
        x, y = self.buffer.items()
        gen = self.generator(x.device)
        log.info("gdumb: training from the initial weights on %d stored samples x %d epochs (session %d)",
                 len(y), self.epochs, session)
        self.model.train()
        with torch.enable_grad():
            for epoch in range(self.epochs):
                if epoch <= 1:  # one warm-up epoch at maxlr / 10, then maxlr
                    for group in self.optimizer.param_groups:
                        group["lr"] = self.maxlr * (0.1 if epoch == 0 else 1.0)
                else:
                    scheduler.step()
                perm = torch.randperm(len(y), device=x.device, generator=gen)
                for start in range(0, len(perm), self.batch_size):
                    sel = perm[start:start + self.batch_size]
                    self.step(x[sel], y[sel], gen)
        self.model.eval()

    def step(self, x: Tensor, y: Tensor, gen: torch.Generator) -> None:
        """One SGD step on the (CutMixed) cross-entropy over every output, the gradient norm clipped."""
        self.optimizer.zero_grad(set_to_none=True)
        xm, ya, yb, lam = cutmix(x, y, self.cutmix_alpha, self.cutmix_prob, self._rng, gen)
        z = self.model(xm)
        loss = F.cross_entropy(z, ya) if lam == 1.0 else lam * F.cross_entropy(z, ya) + \
            (1 - lam) * F.cross_entropy(z, yb)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()

    # --- state -----------------------------------------------------------------------------------------------
    def extra(self) -> Any:
        return {"buffer": self.buffer.state(), "evict": self._evict_gen.get_state(),
                "rng": self._rng.bit_generator.state}

    def load_extra(self, state: Any) -> None:
        if state:
            self.buffer.load_state(state.get("buffer"))
            self._evict_gen.set_state(state["evict"])
            self._rng.bit_generator.state = state["rng"]
