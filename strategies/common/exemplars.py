"""Class-balanced exemplar memories: herding selection (iCaRL) and the held set, kept in class blocks.

Herding (Welling, "Herding Dynamical Weights to Learn", ICML 2009; as iCaRL's Alg. 4, Rebuffi et al. CVPR 2017):
for a class with (normalised) features ``f_1..f_n`` and mean ``mu``, pick greedily, for ``i = 1..k``,
``p_i = argmin_x || mu - (x + sum_{j<i} f_{p_j}) / i ||`` among the samples not yet picked; the first ``m``
exemplars of the order are then the best ``m``-subset for any ``m <= k`` (old classes are cut to their prefix).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn


@torch.no_grad()
def herding_order(features: Tensor, k: int) -> Tensor:
    """The first ``min(k, n)`` indices of ``features`` (n x D) in herding order (ties: the lowest index)."""
    n = int(features.shape[0])
    mean = features.mean(0, keepdim=True)
    running = torch.zeros_like(mean)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    order = []
    for i in range(min(int(k), n)):
        cost = (mean - (features + running) / (i + 1)).norm(2, 1).masked_fill(taken, float("inf"))
        j = int(cost.argmin())
        order.append(j)
        taken[j] = True
        running += features[j:j + 1]
    return torch.tensor(order, dtype=torch.long, device=features.device)


class ExemplarSet(nn.Module):
    """Exemplars held as class blocks in insertion order (each class's block in its selection order)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("x", torch.empty(0), persistent=False)  # content travels in ``state()``
        self.register_buffer("y", torch.empty(0, dtype=torch.long), persistent=False)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor) -> None:
        """Append exemplars (after those held)."""
        if len(self) == 0:
            self.x, self.y = x.detach().clone(), y.detach().long().clone()
        else:
            self.x = torch.cat([self.x, x.detach().to(self.x.dtype)])
            self.y = torch.cat([self.y, y.detach().long().to(self.y.device)])

    @torch.no_grad()
    def reduce(self, per_class: int) -> None:
        """Keep each class's first ``per_class`` exemplars, classes in ascending label order (iCaRL's Alg. 5)."""
        if len(self) == 0:
            return
        keep = torch.cat([(self.y == c).nonzero().squeeze(1)[:per_class] for c in torch.unique(self.y)])
        self.x, self.y = self.x[keep], self.y[keep]

    def items(self) -> Tuple[Tensor, Tensor]:
        return self.x, self.y

    def counts(self, num_classes: int) -> Tensor:
        """Exemplars held per class (num_classes,)."""
        return torch.bincount(self.y, minlength=num_classes)

    def state(self) -> Dict[str, Any]:
        return {"x": self.x.clone(), "y": self.y.clone()}

    def load_state(self, state: Optional[Dict[str, Any]]) -> None:
        if state:
            self.x, self.y = state["x"].clone(), state["y"].clone().long()


__all__ = ["ExemplarSet", "herding_order"]
