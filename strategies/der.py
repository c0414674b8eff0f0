"""Dark Experience Replay (DER) and DER++.

Buzzega, Boschini, Porrello, Abati, Calderara, "Dark Experience for General Continual Learning: a Strong, Simple
Baseline", NeurIPS 2020 (arXiv 2004.07211). Reference code: github.com/aimagelab/mammoth@e75a491 (``models/der.py``
``Der.observe``, ``models/derpp.py`` ``Derpp.observe``, ``utils/buffer.py`` ``Buffer`` with reservoir sampling);
hyperparameters from its ``utils/best_args.py`` (seq-cifar10), see ``configs/strategies/der.yaml`` / ``derpp.yaml``.

The algorithm box (Alg. 1 of the paper), per incoming batch ``(x, y)``:

1. ``z = f(x)``; loss ``CE(z, y)``;
2. if the buffer holds samples: draw ``(x', z')`` and add ``alpha * MSE(f(x'), z')`` (DER);
   DER++ draws another ``(x'', y'')`` and adds ``beta * CE(f(x''), y'')``;
3. one SGD step; then offer ``(x, y, z)`` to the reservoir buffer: ``z`` are the logits of that forward, kept as
   they were at insertion (never refreshed).

As the reference, the incoming batch and each buffer draw go through the network in separate forwards (BatchNorm
normalises each batch on its own), and every loss term covers every output: no seen-class mask enters the training
losses, as for ER-ACE (``mask_unseen`` masks the predictions only; the effect of masking the cross-entropies is
measured in benchmarks/RESULTS.md, "DER and DER++ against Mammoth").
No augmentation here (the reference crops and flips both the incoming and the replayed images). The reservoir and the incremental
bookkeeping are ER's (``strategies/er.py``, ``common/replay.py``, ``common/incremental.py``).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.hparams import Count, Momentum, NonNegative, Positive

from .base import register
from .er import ER


@register
class DER(ER):
    """ER whose buffer keeps the logits seen at insertion; replay matches them with ``alpha`` * MSE."""

    name = "der"

    def __init__(self, model: nn.Module, lr: Positive = 0.03, momentum: Momentum = 0.0,
                 weight_decay: NonNegative = 0.0, buffer_size: Count = 500, replay_batch_size: Count = 32,
                 alpha: NonNegative = 0.3, mask_unseen: bool = True, seed: int = 0) -> None:
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, buffer_size=buffer_size,
                         replay_batch_size=replay_batch_size, mask_unseen=mask_unseen, seed=seed)
        self.alpha = float(alpha)

    def replay_loss(self, generator: torch.Generator) -> Tensor:
        """``alpha`` * MSE between the network's logits on a buffer draw and the logits stored with it."""
        bx, _, bz = self.buffer.sample_with_logits(self.replay_batch_size, generator)
        return self.alpha * F.mse_loss(self.model(bx), bz)

    def objective(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """The training loss of the incoming batch (CE, plus the replay terms once the buffer holds samples) and the
        batch's raw logits; forwards in the model's current mode."""
        z = self.model(x)
        loss = F.cross_entropy(z, y)
        if len(self.buffer):
            loss = loss + self.replay_loss(generator)
        return loss, z

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """One SGD step on :meth:`objective`, then the incoming batch with its logits offered to the buffer."""
        gen = self.generator(x.device)
        self.model.train()
        with torch.enable_grad():
            loss, z = self.objective(x, y, gen)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        z = z.detach()
        self.buffer.add(x, y, gen, logits=z)
        return self.mask(z)


@register
class DERPP(DER):
    """DER++: DER plus ``beta`` * cross-entropy on the labels of a second, independent buffer draw."""

    name = "derpp"

    def __init__(self, model: nn.Module, lr: Positive = 0.03, momentum: Momentum = 0.0,
                 weight_decay: NonNegative = 0.0, buffer_size: Count = 500, replay_batch_size: Count = 32,
                 alpha: NonNegative = 0.2, beta: NonNegative = 0.5, mask_unseen: bool = True, seed: int = 0) -> None:
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, buffer_size=buffer_size,
                         replay_batch_size=replay_batch_size, alpha=alpha, mask_unseen=mask_unseen, seed=seed)
        self.beta = float(beta)

    def replay_loss(self, generator: torch.Generator) -> Tensor:
        """DER's term, then ``beta`` * CE on another draw (drawn after the first, as the reference)."""
        loss = super().replay_loss(generator)
        bx, by = self.buffer.sample(self.replay_batch_size, generator)
        return loss + self.beta * F.cross_entropy(self.model(bx), by)
