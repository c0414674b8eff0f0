"""Joint training on all data seen so far: the upper bound of continual-learning tables.

Two modes (``mode``):

* ``retrain`` (the upper bound as the literature defines it): the session's batches are only stored; when the
  session ends, the network goes back to its initial weights and is trained from scratch on the union of every
  session seen, with as many passes over it as the session had epochs (the store holds each sample once per epoch,
  so one shuffled pass over the store), in minibatches of the stream's batch size; ``passes`` multiplies that
  (a network trained from random weights needs more epochs on the union than the sessions give it to be a real
  bound). The initial weights are the backbone's as given: pretrained weights for a pretrained backbone (joint
  fine-tuning from the pretrained model), random ones otherwise. Its cost grows with the stream (session k trains
  on k sessions' data), as a real retrain does. Its train-step predictions come from the model of the previous
  session (nothing is trained while a session's batches arrive), so its online accuracy is not comparable.
* ``streaming``: every labelled sample is kept (on the device); each incoming batch is added to the store and one
  step trains on ``2 x batch`` samples drawn uniformly (with replacement) from everything seen so far. The compute
  per session equals replay's, so after many sessions the union is under-trained: it is a same-budget reference,
  not an upper bound (on Split CIFAR-10 it fell below ER-ACE's last accuracy at 2 epochs). Training on the incoming
  batch plus an equal sample of earlier data over-weighted the newest classes (below ER-ACE on 5-session digits).

The returned logits of a train step are the incoming batch's, from an eval-mode forward before any update.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ctta.hparams import Count, Momentum, NonNegative, Positive

from .base import register
from .common.incremental import SGDLearner
from .common.replay import GrowingStore

log = logging.getLogger(__name__)


@register
class Joint(SGDLearner):
    """Cross-entropy on all data seen so far, SGD on all weights: retrained from scratch at every session end
    (``mode: retrain``) or stepped on uniform samples of the union as batches arrive (``mode: streaming``)."""

    name = "joint"

    def __init__(self, model: nn.Module, lr: Positive = 0.1, momentum: Momentum = 0.0, weight_decay: NonNegative = 0.0,
                 mask_unseen: bool = True, mode: Literal["retrain", "streaming"] = "retrain", passes: Count = 1,
                 seed: int = 0) -> None:
        super().__init__(model, lr, momentum, weight_decay, mask_unseen, seed)
        self.mode = mode
        self.passes = passes
        self.batch_size = 0
        self.store = GrowingStore()
        self._initial_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self.remember_initial_state()

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.mask(self.logits(x))
        self.store.add(x, y)
        self.batch_size = max(self.batch_size, int(x.shape[0]))
        if self.mode == "streaming":
            xs, ys = self.store.sample(2 * x.shape[0], self.generator(x.device))
            self.sgd_step(xs, ys)
        return out

    def end_session(self, session: int) -> None:
        """``retrain``: from the initial weights, ``passes`` shuffled passes over the store (one pass = the
        session's epochs over the union of the sessions)."""
        if self.mode != "retrain" or len(self.store) == 0:
            return
        self.restore_initial_model()
        self.optimizer.load_state_dict(self._initial_optimizer)
        x, y = self.store.items()
        bs = self.batch_size
        log.info("joint: retraining from the initial weights on %d stored samples x %d passes (session %d)",
                 len(self.store), self.passes, session)
        for _ in range(self.passes):
            perm = torch.randperm(len(self.store), device=x.device, generator=self.generator(x.device))
            for start in range(0, len(perm), bs):
                sel = perm[start:start + bs]
                self.sgd_step(x[sel], y[sel])

    def extra(self) -> Any:
        return {"store": self.store.state(), "batch_size": self.batch_size}

    def load_extra(self, state: Any) -> None:
        if state:
            self.store.load_state(state.get("store"))
            self.batch_size = int(state.get("batch_size", 0))
