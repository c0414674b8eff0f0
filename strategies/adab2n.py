"""AdaB²N on ER-ACE: Adaptive Balance of BatchNorm (Lyu et al., NeurIPS 2023; github.com/lvyilin/AdaB2N).

Every BatchNorm of the backbone becomes an :class:`~strategies.common.adab2n_norm.AdaB2NBatchNorm` (task-balanced
batch statistics with learnable task-wise contributions, modified running momentum kappa, statistics
regulariser); the host is ER-ACE with its losses unchanged, but, as the official ``er_ace_ada``
(lvyilin/AdaB2N ``models/er_ace_ada.py``), the incoming and the replayed batch go through the model in one forward
of their concatenation (the ER-ACE baseline forwards them separately), so the layers see every task in one batch;
before that forward a hook gives the layers the task id of every sample -- the current session for the incoming
samples, the stored task of each replayed sample (the reservoir keeps it). As in ``er_ace_ada``, from the second
task on (and from session ``ada_t0``) the loss adds ``lambd`` times the sum of the layers' regularisers; the task
weights are parameters of the model, trained by the same SGD.

Defaults are the paper's online setting for Split CIFAR-10 / CIFAR-100 (``utils/best_args.py`` with ``--bs 10``):
incoming and replayed batch 10, SGD lr 0.03 without momentum; Split mini-ImageNet uses lr 0.1 (and lambd from
{1e-5, 1e-4, 1e-3, 1e-2}); see ``configs/strategies/adab2n.yaml``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, NonNegInt, Positive, Unit

from .base import register
from .common.adab2n_norm import AdaB2NBatchNorm, replace_batchnorm
from .er import ERACE


@register
class AdaB2N(ERACE):
    """ER-ACE with every BatchNorm replaced by AdaB²N and the statistics regulariser added to the loss."""

    name = "adab2n"
    concat_forward = True  # er_ace_ada: one forward of [incoming; replayed]

    def __init__(self, model: nn.Module, lr: Positive = 0.03, momentum: Momentum = 0.0,
                 weight_decay: NonNegative = 0.0, buffer_size: Count = 500, replay_batch_size: Count = 10,
                 mask_unseen: bool = True, kappa: Unit = 0.7, lambd: NonNegative = 0.1, ada_t0: NonNegInt = 0,
                 init_weight: float = 0.0, num_tasks: Count = 20, bn_momentum: Optional[Unit] = None,
                 seed: int = 0) -> None:
        # before the host builds its optimizer, so the task weights are trained with the rest
        layers = replace_batchnorm(model, kappa=kappa, num_tasks=num_tasks, init_weight=init_weight,
                                   momentum=bn_momentum)
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, buffer_size=buffer_size,
                         replay_batch_size=replay_batch_size, mask_unseen=mask_unseen, seed=seed)
        self.lambd = float(lambd)
        self.ada_t0 = ada_t0
        self.num_tasks = num_tasks
        self._norms: List[AdaB2NBatchNorm] = layers  # plain list: the modules are registered in the model
        self._incoming: Optional[Tuple[int, int]] = None  # (incoming batch size, task) during a learn step
        self.model.register_forward_pre_hook(self._set_task_ids)

    # --- per-sample task ids ----------------------------------------------------------------------------------
    def _set_task_ids(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        """Forward pre-hook: in a training forward of a learn step, hand the layers the task of every sample."""
        if self._incoming is None or not module.training:
            return
        x = args[0]
        n, task = self._incoming
        ids = torch.full((n,), task, dtype=torch.long, device=x.device)
        if x.shape[0] > n and self.buffer.last_tasks is not None:
            ids = torch.cat([ids, self.buffer.last_tasks.to(x.device)])
        if ids.shape[0] != x.shape[0]:
            raise RuntimeError(f"adab2n: {ids.shape[0]} task ids for a training batch of {x.shape[0]} samples")
        counts = torch.zeros(task + 1, device=x.device).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float))
        for m in self._norms:
            m.set_tasks(ids, counts)

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        task = max(self.sessions.session, 0)
        if task >= self.num_tasks:
            raise ConfigError(f"adab2n was built for num_tasks={self.num_tasks} sessions and the stream has more "
                              f"(session {task}); raise strategy.num_tasks")
        self.buffer.task = task  # the incoming samples enter the buffer with their task id
        self.buffer.last_tasks = None
        self._incoming = (int(x.shape[0]), task)
        try:
            return super().learn_batch(x, y)
        finally:
            self._incoming = None
            for m in self._norms:
                m.set_tasks(None, None)

    # --- loss: ER-ACE's plus the statistics regulariser ---------------------------------------------------------
    def regulariser(self) -> Tensor:
        """Sum over the layers of the last training forward's statistics regulariser."""
        return torch.stack([m.reg_loss for m in self._norms if m.reg_loss is not None]).sum()

    def loss(self, logits: Tensor, y: Tensor, n_new: int) -> Tensor:
        base = super().loss(logits, y, n_new)
        session = self.sessions.session
        if self.lambd > 0 and session > 0 and session >= self.ada_t0:
            base = base + self.lambd * self.regulariser()
        return base
