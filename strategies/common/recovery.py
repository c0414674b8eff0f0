"""SAR's model recovery (Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023): an
exponential moving average of the adaptation loss, and a reset of the adapted parameters to their initial values when
it falls below a threshold (a collapse to trivial, over-confident solutions makes the entropy vanish).

Shared by ``sar`` and ``rsgs`` / ``csfa_rsgs``. The EMA is ``0.9 ema + (1 - 0.9) loss`` (SAR's ``update_ema``),
started at the first loss, not updated by a step whose loss averaged no sample; after a reset it is forgotten.
Everything stays on the device (``torch.where``, no host sync); ``recoveries`` counts the resets.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn


class LossEMARecovery(nn.Module):
    """Model recovery of ``params`` (with ``optimizer``'s state) below ``reset_constant``; 0 turns it off.

    A module, so the EMA, the initial values and the count move with ``.to()`` and are part of a checkpoint.
    ``clear_momentum``: a reset also empties SGD's momentum buffers (a zero buffer is SGD's empty start, dampening 0).
    SAR's code (mr-eggplant/SAR ``sar.py`` and the mariodoebler/test-time-adaptation port) resets its SAM optimiser
    with ``load_state_dict``, which does not reach the base SGD's momentum: it is kept there (``False``).
    """

    def __init__(self, params: List[nn.Parameter], optimizer: Optional[torch.optim.Optimizer],
                 reset_constant: float = 0.2, momentum: float = 0.9, clear_momentum: bool = True) -> None:
        super().__init__()
        self.params = list(params)
        self.optimizer = optimizer
        self.reset_constant = float(reset_constant)
        self.ema_momentum = float(momentum)
        self.clear_momentum = bool(clear_momentum)
        for i, p in enumerate(self.params):
            self.register_buffer(f"initial_{i}", p.detach().clone())
        self.register_buffer("ema", torch.zeros(()))
        self.register_buffer("ema_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("recoveries", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def recover_if_collapsing(self, loss: Tensor, kept: Tensor) -> Tensor:
        """Fold ``loss`` (averaged over ``kept`` samples; none: skipped) into the EMA, reset below the threshold.
        Returns the (0-d bool) reset flag."""
        if self.reset_constant <= 0:
            return torch.zeros((), dtype=torch.bool, device=self.ema.device)
        m = self.ema_momentum
        valid = torch.as_tensor(kept, device=self.ema.device) > 0
        loss = loss.detach().to(self.ema.dtype).reshape(())
        new = torch.where(self.ema_set, m * self.ema + (1 - m) * loss, loss)
        self.ema.copy_(torch.where(valid, new, self.ema))
        self.ema_set.logical_or_(valid)
        reset = self.ema_set & (self.ema < self.reset_constant)
        self.restore_(reset)
        self.ema_set.logical_and_(~reset)
        self.ema.copy_(torch.where(reset, torch.zeros_like(self.ema), self.ema))
        self.recoveries.add_(reset.long())
        return reset

    @torch.no_grad()
    def restore_(self, flag: Tensor) -> None:
        """Where ``flag`` (0-d bool), the parameters return to their initial values (and, with ``clear_momentum``,
        the optimiser's momentum buffers to zero)."""
        for i, p in enumerate(self.params):
            p.copy_(torch.where(flag, getattr(self, f"initial_{i}").to(p.dtype), p))
            if self.clear_momentum and self.optimizer is not None:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.copy_(torch.where(flag, torch.zeros_like(buf), buf))


__all__ = ["LossEMARecovery"]
