"""BN adaptation: normalise with the statistics of the test batch instead of the source statistics.

Schneider et al., "Improving robustness against common corruptions by covariate shift adaptation", NeurIPS 2020;
Nado et al., "Evaluating prediction-time batch normalization", 2020. As the ``norm`` baseline of the TENT and
CoTTA code: every BatchNorm layer uses the current batch's mean and variance (N = batch size), no parameter
is updated and the stored source statistics are kept untouched.
"""
from __future__ import annotations

from torch import nn

from .base import Strategy, register
from .common import use_batch_statistics


@register
class BNAdapt(Strategy):
    """Test-batch normalisation statistics; no gradient step."""

    name = "bn"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__(model, seed)
        self.model.eval().requires_grad_(False)
        use_batch_statistics(self.model)
        self.remember_initial_state()
