"""Fine-tuning: plain supervised SGD on every labelled batch (the lower bound of continual-learning tables)."""
from __future__ import annotations

from torch import Tensor, nn

from ctta.hparams import Momentum, NonNegative, Positive

from .base import register
from .common.incremental import SGDLearner


@register
class Finetune(SGDLearner):
    """Cross-entropy on ``train`` steps with SGD on all weights; ``eval`` steps predict in eval mode.

    Class-incremental convention (``strategies/common/incremental.py``): logits of classes not seen in any labelled
    batch so far are masked to -inf in the loss and at prediction (``mask_unseen``), i.e. a head that grows.
    """

    name = "finetune"
    step_kinds = frozenset({"train", "eval"})
    settings = frozenset({"class_incremental", "few_shot_class_incremental", "online_class_incremental",
                          "domain_incremental", "tta"})

    def __init__(self, model: nn.Module, lr: Positive = 0.01, momentum: Momentum = 0.9,
                 weight_decay: NonNegative = 0.0, mask_unseen: bool = True, seed: int = 0) -> None:
        super().__init__(model, lr, momentum, weight_decay, mask_unseen, seed)
        self.remember_initial_state()

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        return self.sgd_step(x, y)
