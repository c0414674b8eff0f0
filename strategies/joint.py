"""Joint training on all data seen so far: the upper bound of continual-learning tables.

Streaming version of "retrain on the union of the sessions": every labelled sample is kept (on the device); the
incoming batch is added to the store, and each step trains on a batch of ``2 x batch`` samples drawn uniformly
(with replacement) from everything seen so far, i.e. i.i.d. minibatches of the union of the sessions seen. (Training
on the incoming batch plus an equal sample of earlier data over-weights the newest classes: on 5-session digits it
fell below ER-ACE.) The returned logits are the incoming batch's, from an eval-mode forward before the update.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import register
from .common.incremental import SGDLearner
from .common.replay import GrowingStore


@register
class Joint(SGDLearner):
    """Cross-entropy on uniform minibatches of all data seen so far (incoming batch included), SGD on all weights."""

    name = "joint"

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 mask_unseen: bool = True, seed: int = 0) -> None:
        super().__init__(model, lr, momentum, weight_decay, mask_unseen, seed)
        self.store = GrowingStore()
        self.remember_initial_state()

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.mask(self.logits(x))
        self.store.add(x, y)
        xs, ys = self.store.sample(2 * x.shape[0], self.generator(x.device))
        self.model.train()
        with torch.enable_grad():
            F.cross_entropy(self.mask(self.model(xs)), ys).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return out

    def extra(self) -> Any:
        return {"store": self.store.state()}

    def load_extra(self, state: Any) -> None:
        if state:
            self.store.load_state(state.get("store"))
