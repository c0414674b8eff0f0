"""AdaB²N normalisation (Lyu, Wang, Zhang, Sun, Su, Zhu, Jing; "Overcoming Recency Bias of Normalization Statistics
in Continual Learning: Balance and Adaptation", NeurIPS 2023; github.com/lvyilin/AdaB2N).

A BatchNorm whose statistics are balanced across the tasks of a continual stream:

* training (batch) statistics weight the samples of each task by a Bayesian task-wise contribution: a Dirichlet
  posterior mean ``pi_t = alpha_t / sum_s alpha_s`` with ``alpha_t = exp(w_t) + n_t`` (``w`` a learnable prior
  log-concentration per task and layer, ``n_t`` the number of samples of task ``t`` in the batch, the sum over every
  task so far, ``s = 0..T``), shared equally by the ``n_t`` samples of the task:
  ``mu = sum_i pi_{t(i)} / n_{t(i)} * mean_hw(x_i)``, and likewise the variance. A task so far that is absent from
  the batch (``n_t = 0``) keeps its prior mass ``exp(w_t)`` in the denominator, as the official code does, so the
  weights of the samples then sum to less than one;
* running (testing) statistics use the modified momentum ``eta_1 = m^kappa``,
  ``eta_k = eta_{k-1} / (eta_{k-1} + (1 - m)^kappa)``: kappa = 1 is BatchNorm's fixed momentum ``m``,
  kappa = 0 the cumulative average ``1/k``, values between balance old and recent batches;
* a regulariser (weighted by lambda in the loss) pulls the batch statistics towards the running ones:
  ``mse(mu_B, mu_run) + mse(var_B, var_run)``, the running statistics taken after this batch's update (detached).

Differences from the official layer (kept small and stated): the running variance is updated with the unbiased
batch variance (``var_B * m/(m-1)``, ``m`` = values per channel) as ``nn.BatchNorm2d`` does, and the regulariser
compares the running variance with the batch variance in that same convention (the official code uses the biased
one for both; the difference is a factor ``m/(m-1)``, e.g. 1.002 at batch 42 x 4 x 4). Works for any BatchNorm
input ``(N, C, *)``; with no task ids, or in the first task (every sample of task 0), the batch statistics are
BatchNorm's.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ctta.errors import ConfigError, UnsupportedError

from .norm import NORM_TYPES


class AdaB2NBatchNorm(_BatchNorm):
    """BatchNorm with task-balanced batch statistics, a modified running momentum and a statistics regulariser.

    The learner sets, before each training forward, the per-sample task ids and the task counts of the batch
    (:meth:`set_tasks`); the last training forward leaves its regulariser value in ``reg_loss``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 kappa: float = 1.0, num_tasks: int = 20, init_weight: float = 0.0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        if not 0.0 <= float(kappa) <= 1.0:
            raise ConfigError(f"kappa must lie in [0, 1], got {kappa!r}")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ConfigError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        self.kappa = float(kappa)
        self.num_tasks = num_tasks
        # learnable prior log-concentration of each task (one per layer, as the official code)
        self.task_weight = nn.Parameter(torch.full((num_tasks,), float(init_weight)))
        # last modified momentum eta_k (<= 0: none yet); a buffer so a resumed run continues the recursion
        self.register_buffer("eta", torch.zeros(()))
        self.task_ids: Optional[Tensor] = None  # (N,) task of each sample of the next training batch
        self.task_counts: Optional[Tensor] = None  # (T,) samples per task in that batch, T = current task + 1
        self.reg_loss: Optional[Tensor] = None

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, kappa: float = 1.0, num_tasks: int = 20,
                       init_weight: float = 0.0) -> "AdaB2NBatchNorm":
        """A layer with ``bn``'s settings, affine parameters and running statistics (on ``bn``'s device)."""
        if not bn.track_running_stats or bn.running_mean is None:
            raise UnsupportedError(f"AdaB2N needs BatchNorm layers that track running statistics; got {bn!r}")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, kappa, num_tasks, init_weight)
        ref = bn.running_mean
        new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(bn.state_dict(), strict=False)  # task_weight and eta keep their initial values
        new.train(bn.training)
        return new

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *), got {tuple(input.shape)}")

    def set_tasks(self, task_ids: Optional[Tensor], task_counts: Optional[Tensor]) -> None:
        """Task id of each sample of the next training batch and the per-task counts (``None``: plain BN stats)."""
        if task_counts is not None and task_counts.shape[0] > self.num_tasks:
            raise ConfigError(f"AdaB2N layer built for num_tasks={self.num_tasks} got counts of "
                              f"{task_counts.shape[0]} tasks; raise num_tasks")
        self.task_ids, self.task_counts = task_ids, task_counts

    # --- the pieces of the method, each usable on its own ---------------------------------------------------------
    def sample_weights(self, task_ids: Tensor, task_counts: Tensor) -> Tensor:
        """Weight of each sample in the batch statistics: ``pi_t / n_t`` of its task ``t``, with
        ``pi = alpha / alpha.sum()`` over every task so far (``task_counts`` has one entry per task ``0..T``, zero for
        a task absent from the batch, whose prior mass ``exp(w_t)`` stays in the sum): the weights sum to one when
        every task so far is in the batch, to less otherwise (the official formula)."""
        counts = task_counts.to(self.task_weight.dtype)
        alpha = self.task_weight[:counts.shape[0]].exp() + counts
        pi = alpha / alpha.sum()
        return (pi / counts.clamp_min(1.0))[task_ids]

    def next_eta(self) -> Tensor:
        """Advance and return the modified momentum (a 0-dim tensor on the layer's device; no host sync)."""
        m = self.momentum
        if m is None:  # cumulative moving average, as nn.BatchNorm with momentum=None
            eta = 1.0 / self.num_batches_tracked.to(self.eta.dtype)
        elif self.kappa == 1.0:
            eta = torch.full_like(self.eta, m)
        else:
            first = torch.full_like(self.eta, m ** self.kappa)
            later = self.eta / (self.eta + (1.0 - m) ** self.kappa)
            eta = torch.where(self.eta > 0, later, first)
        self.eta.copy_(eta)
        return eta

    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, biased variance) per channel, task-weighted when task ids are set."""
        flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)  # N x C x L
        if self.task_ids is None or self.task_counts is None:
            var, mean = torch.var_mean(flat, dim=(0, 2), correction=0)
            return mean, var
        if self.task_ids.shape[0] != x.shape[0]:
            raise RuntimeError(f"AdaB2N: {self.task_ids.shape[0]} task ids for a batch of {x.shape[0]} samples")
        w = self.sample_weights(self.task_ids.to(x.device), self.task_counts.to(x.device)).to(x.dtype)
        mean = flat.mean(2).t().mv(w)
        var = (flat - mean.view(1, -1, 1)).square().mean(2).t().mv(w)
        return mean, var

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        self.num_batches_tracked.add_(1)
        eta = self.next_eta()
        mean, var = self.batch_statistics(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        m = x.numel() // x.shape[1]
        unbiased = var * (m / (m - 1)) if m > 1 else var
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), eta)
            self.running_var.lerp_(unbiased.detach(), eta)
        # the updated running statistics are constants of the regulariser (cloned: a later update stays out of
        # the autograd graph of this one)
        self.reg_loss = F.mse_loss(mean, self.running_mean.clone()) + F.mse_loss(unbiased, self.running_var.clone())
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kappa={self.kappa}, num_tasks={self.num_tasks}"


def replace_batchnorm(model: nn.Module, kappa: float = 1.0, num_tasks: int = 20, init_weight: float = 0.0,
                      momentum: Optional[float] = None) -> List[AdaB2NBatchNorm]:
    """Replace every BatchNorm of ``model`` (in place) by an :class:`AdaB2NBatchNorm` carrying its state; return them.

    ``momentum`` (when given) replaces the layers' BN momentum ``m``. A model without BatchNorm (e.g. a ViT, which
    normalises with LayerNorm) is refused with a one-line UnsupportedError.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, _BatchNorm) and not isinstance(child, AdaB2NBatchNorm)]
    if not targets:
        have = sorted({type(m).__name__ for m in model.modules() if isinstance(m, NORM_TYPES)})
        already = any(isinstance(m, AdaB2NBatchNorm) for m in model.modules())
        if already:
            return [m for m in model.modules() if isinstance(m, AdaB2NBatchNorm)]
        raise UnsupportedError(f"AdaB2N replaces BatchNorm layers and {type(model).__name__} has none (its norm "
                               f"layers: {', '.join(have) or 'none'}); use a BatchNorm CNN such as resnet18_reduced")
    for parent, name, child in targets:
        new = AdaB2NBatchNorm.from_batchnorm(child, kappa, num_tasks, init_weight)
        if momentum is not None:
            new.momentum = float(momentum)
        setattr(parent, name, new)
    return [m for m in model.modules() if isinstance(m, AdaB2NBatchNorm)]


def adab2n_layers(model: nn.Module) -> List[AdaB2NBatchNorm]:
    return [m for m in model.modules() if isinstance(m, AdaB2NBatchNorm)]
