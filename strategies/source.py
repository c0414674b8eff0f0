"""Source: the pre-trained model as it is, no adaptation (the reference row of every table)."""
from __future__ import annotations

from torch import nn

from .base import Strategy, register


@register
class Source(Strategy):
    """Predicts with the source model in eval mode; changes no parameter and no buffer."""

    name = "source"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.model.eval().requires_grad_(False)
        self.remember_initial_state()
