"""Experience replay with a reservoir buffer (ER) and ER with asymmetric cross-entropy (ER-ACE).

ER (Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019): every step trains on the incoming
batch concatenated with a batch drawn uniformly from a reservoir buffer, then offers the incoming batch to the buffer.

ER-ACE (Caccia, Aljundi, Asadi, Tuytelaars, Pineau, Belilovsky; "New Insights on Reducing Abrupt Representation
Change in Online Continual Learning", ICLR 2022; github.com/pclucas14/AML ``methods/er_ace.py``, and the baseline
the AdaB²N paper compares with, github.com/lvyilin/AdaB2N ``models/er_ace.py``): the incoming batch's cross-entropy
masks the classes seen so far that are absent from the batch, so new classes do not push the logits of old ones
down; the classes present and the classes not seen yet stay in it; the replayed batch's cross-entropy is over every
output. As in both official codes the incoming and the replayed batch go through the model in two separate
forwards (so BatchNorm normalises, and updates its running statistics, with each batch on its own: the
recency-biased statistics AdaB²N corrects), and no seen-class mask enters the training losses (``mask_unseen``
masks the predictions only). As in the AdaB²N code (pclucas14/AML runs it task-free instead), replay and the
asymmetric mask start with the second session: the first trains on the incoming batch over all classes; the buffer
is filled from the start.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.hparams import Count, Momentum, NonNegative, Positive

from .base import register
from .common.incremental import SGDLearner, mask_logits, present_classes
from .common.replay import ReservoirBuffer


def ace_incoming_loss(logits: Tensor, y: Tensor, unseen: Optional[Tensor] = None) -> Tensor:
    """ER-ACE's loss on the incoming batch: cross-entropy of ``logits`` over the classes present in ``y`` and the
    classes of the boolean mask ``unseen`` (those not seen yet; None: none), the other seen classes masked.

    The official codes unmask ``present`` and every class from the largest label seen so far on
    (``mask[:, seen_so_far.max():] = 1``), which, with labels arriving in index order, are the classes not seen
    yet; here the stream's class order may be any permutation, so the unseen classes are given as a mask."""
    keep = present_classes(y, logits.shape[1])
    if unseen is not None:
        keep = keep | unseen.to(keep.device)
    return F.cross_entropy(mask_logits(logits, keep), y)


@register
class ER(SGDLearner):
    """Replay: cross-entropy on [incoming batch; replayed batch], SGD on all weights, reservoir update after."""

    name = "er"
    replay_in_first_session = True

    def __init__(self, model: nn.Module, lr: Positive = 0.1, momentum: Momentum = 0.0, weight_decay: NonNegative = 0.0,
                 buffer_size: Count = 500, replay_batch_size: Count = 32, mask_unseen: bool = True,
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
    """ER with the asymmetric cross-entropy: incoming loss over present (and not yet seen) classes, replay over all;
    incoming and replayed batches forwarded separately, as the official baseline."""

    name = "er_ace"
    replay_in_first_session = False  # as the official code: no replay and no mask before the second task
    #: one forward of [incoming; replayed] (AdaB²N's ``er_ace_ada``) instead of two separate ones (ER-ACE's)
    concat_forward = False

    def __init__(self, model: nn.Module, lr: Positive = 0.03, momentum: Momentum = 0.0,
                 weight_decay: NonNegative = 0.0, buffer_size: Count = 500, replay_batch_size: Count = 10,
                 mask_unseen: bool = True, seed: int = 0) -> None:
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, buffer_size=buffer_size,
                         replay_batch_size=replay_batch_size, mask_unseen=mask_unseen, seed=seed)

    def loss(self, logits: Tensor, y: Tensor, n_new: int) -> Tensor:
        """``logits`` of [incoming; replayed] (``n_new`` incoming): the incoming loss over all classes in the first
        session, over present and not-yet-seen classes after; plus the replayed batch's over all classes."""
        new, old = logits[:n_new], logits[n_new:]
        if self.sessions.session > 0:
            incoming = ace_incoming_loss(new, y[:n_new], ~self.seen.seen)
        else:
            incoming = F.cross_entropy(new, y[:n_new])
        if old.shape[0] == 0:
            return incoming
        return incoming + F.cross_entropy(old, y[n_new:])

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        xs, ys = x, y
        replay = len(self.buffer) > 0 and (self.replay_in_first_session or self.sessions.session > 0)
        if replay:
            bx, by = self.buffer.sample(self.replay_batch_size, self.generator(x.device))
            xs, ys = torch.cat([x, bx]), torch.cat([y, by])
        self.model.train()
        with torch.enable_grad():
            if not replay or self.concat_forward:
                logits = self.model(xs)
            else:  # the official baseline: incoming first, then the replayed batch, each through BatchNorm alone
                logits = torch.cat([self.model(x), self.model(bx)])
            self.loss(logits, ys, n).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.buffer.add(x, y, self.generator(x.device))
        return self.mask(logits[:n].detach())
