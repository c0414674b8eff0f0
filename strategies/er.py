"""Experience replay with a reservoir buffer (ER) and ER with asymmetric cross-entropy (ER-ACE).

ER (Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019): every step trains on the incoming
batch concatenated with a batch drawn uniformly from a reservoir buffer, then offers the incoming batch to the buffer.

ER-ACE (Caccia, Aljundi, Asadi, Tuytelaars, Pineau, Belilovsky; "New Insights on Reducing Abrupt Representation
Change in Online Continual Learning", ICLR 2022; github.com/pclucas14/AML): the incoming batch's cross-entropy is
taken only over the classes present in that batch, so new classes do not push the logits of old ones down; the
replayed batch's cross-entropy is over all classes seen so far. As in the official code, replay and the asymmetric
mask start with the second session (the first trains on the incoming batch over the classes seen so far; the buffer
is filled from the start).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register
from .common.incremental import SGDLearner, mask_logits, present_classes
from .common.replay import ReservoirBuffer


def ace_incoming_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` over only the classes present in ``y`` (ER-ACE's loss on the incoming batch)."""
    return F.cross_entropy(mask_logits(logits, present_classes(y, logits.shape[1])), y)


@register
class ER(SGDLearner):
    """Replay: cross-entropy on [incoming batch; replayed batch], SGD on all weights, reservoir update after."""

    name = "er"
    replay_in_first_session = True

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 buffer_size: int = 500, replay_batch_size: int = 32, mask_unseen: bool = True,
                 seed: int = 0) -> None:
        super().__init__(model, lr, momentum, weight_decay, mask_unseen, seed)
        self.replay_batch_size = int(replay_batch_size)
        self.buffer = ReservoirBuffer(int(buffer_size))
        self.remember_initial_state()

    def loss(self, logits: Tensor, y: Tensor, n_new: int) -> Tensor:
        return F.cross_entropy(logits, y)

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        xs, ys = x, y
        if len(self.buffer) and (self.replay_in_first_session or self.sessions.session > 0):
            bx, by = self.buffer.sample(self.replay_batch_size, self.generator(x.device))
            xs, ys = torch.cat([x, bx]), torch.cat([y, by])
        logits = self.sgd_step(xs, ys, lambda z: self.loss(z, ys, n))
        self.buffer.add(x, y, self.generator(x.device))
        return logits[:n]

    def extra(self) -> Any:
        return {"buffer": self.buffer.state()}

    def load_extra(self, state: Any) -> None:
        if state:
            self.buffer.load_state(state.get("buffer"))


@register
class ERACE(ER):
    """ER with the asymmetric cross-entropy: incoming loss over present classes only, replay over all seen."""

    name = "er_ace"
    replay_in_first_session = False  # as the official code: no replay and no mask before the second task

    def loss(self, logits: Tensor, y: Tensor, n_new: int) -> Tensor:
        new, old = logits[:n_new], logits[n_new:]
        incoming = ace_incoming_loss(new, y[:n_new]) if self.sessions.session > 0 else F.cross_entropy(new, y[:n_new])
        if old.shape[0] == 0:
            return incoming
        return incoming + F.cross_entropy(old, y[n_new:])
