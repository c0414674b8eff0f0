"""MoRA: continual learning with self-activated, sparse mixtures of rank-1 LoRA experts on a frozen backbone.

Lu, Zhao, Xue, Yao, Moore, Gong; "Little By Little: Continual Learning via Self-Activated Sparse Mixture-of-Rank
Adaptive Learning" (arXiv 2506.21035). Not the high-rank-updating "MoRA" of Jiang et al. 2024.

What is implemented (the module is :class:`ctta.backbones.peft.MixtureOfRankLoRA`, injected by ``add_mora``):

* Each adapted Linear (attention and MLP linears, ``targets``) holds one block of ``r`` rank-1 experts
  ``B_i A_i`` per task; the update for an input token ``x`` is ``alpha * sum_i w_i B_i (A_i x)`` over the live experts
  of every task so far (the paper's ``Delta W_t = sum_{i <= r_t} w_i B_i A_i``).
* Self-activation (no router): each expert scores itself from the layer input, ``s_i = A_i x / ||A x||_2`` (the
  paper's normalised key activation); gates ``w = softmax(s / tau)`` over the ``k`` best scores (the activation
  budget; the rest get 0), then zeroed where ``s_i < delta`` (the paper's adaptive sparse activation). At most ``k``
  experts are active per token.
* Task isolation: a session trains only its own new block (Adam over those parameters, restarted each session);
  earlier blocks have ``requires_grad`` off and are not in the optimizer, so they stay bit-identical.
* Rank pruning at the end of a task (our reading of "rank pruning"; the paper's exact rule was not readable here):
  the task's experts active on fewer than ``prune_freq`` of the session's training tokens are switched off for
  good (``alive`` flags, checkpointed), so later inputs and tasks never activate them.
* Head: CLIP's fixed zero-shot head (text embeddings of the class names, nothing trains) when the backbone is
  CLIP; otherwise the linear head trains with the experts. Loss: cross-entropy over the current session's classes
  (``loss_classes``), prediction masks unseen classes (``strategies/common/incremental.py``).

Choices the paper text available here did not fix, and what we took: the score is signed (``A_i x``, normalised),
``tau`` 0.5, ``delta`` 0 (an expert activates only on inputs aligned with its key), ``prune_freq`` 0.01, ``alpha`` 1
(the gates sum to at most 1), ``r`` 4 per task, ``k`` 2, Adam lr 1e-3. Adapted layers: on CLIP the fused q/k/v
in-projection and the out-projection of each ``nn.MultiheadAttention`` (``attention``, through
``AttentionProjections``) and the MLP linears; on timm ViTs ``qkv``/``proj``/``fc1``/``fc2``. Each projection has
its own experts and its own gating. No cross-task reuse regularisers or replay.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from torch import nn

from ctta.backbones.peft import MixtureOfRankLoRA, add_mora
from ctta.errors import CheckpointError
from ctta.hparams import Count, NonNegative, Positive, Unit

from .base import register
from .lora_ft import DEFAULT_TARGETS, PeftIncremental

log = logging.getLogger(__name__)


@register
class MoRA(PeftIncremental):
    """One block of ``r`` self-activated rank-1 experts per session and adapted layer, top-``k`` sparse gating,
    earlier blocks frozen, low-activation experts pruned at the end of each session. See the module docstring."""

    name = "mora"

    def __init__(self, model: nn.Module, r: Count = 4, k: Count = 2, tau: Positive = 0.5, delta: float = 0.0,
                 alpha: Positive = 1.0, prune_freq: Unit = 0.01,
                 targets: Union[str, Sequence[str]] = DEFAULT_TARGETS, lr: Positive = 1e-3,
                 weight_decay: NonNegative = 0.0, loss_classes: Literal["session", "seen"] = "session",
                 train_head: Optional[bool] = None, attention: bool = True, seed: int = 0) -> None:
        super().__init__(model, lr, weight_decay, loss_classes, train_head, seed)
        self.prune_freq = float(prune_freq)
        self.experts: List[MixtureOfRankLoRA] = add_mora(
            self.model, r=r, k=k, tau=tau, delta=delta, alpha=alpha,
            select=targets if isinstance(targets, str) else list(targets), tasks=1, attention=attention)
        self._setup()
        self.remember_initial_state()

    @property
    def task(self) -> int:
        """Index of the newest (trainable) expert block."""
        return self.experts[0].num_tasks - 1

    def session_parameters(self) -> List[nn.Parameter]:
        return [p for m in self.experts for p in m.task_parameters(self.task)] + self.head

    def _track(self, on: bool) -> None:
        for m in self.experts:
            m.track = on

    def begin_session(self, session: int) -> None:
        while self.task < session:  # a new block per session; the earlier ones freeze
            for m in self.experts:
                m.freeze_tasks(m.num_tasks)
                m.add_task()
        for m in self.experts:
            m.reset_stats()
        self._track(True)
        super().begin_session(session)

    def end_session(self, session: int) -> None:
        self._track(False)
        kept = 0
        for m in self.experts:
            kept += int(m.prune(self.task, self.prune_freq).sum()) if self.prune_freq > 0 else m.r
            m.freeze_tasks(m.num_tasks)
        log.info("mora: session %d keeps %d of %d new rank-1 experts", session, kept,
                 len(self.experts) * self.experts[0].r)

    def expert_counts(self) -> Dict[str, int]:
        """Experts in total and alive (for reports and tests; a host sync)."""
        total = sum(m.num_tasks * m.r for m in self.experts)
        alive = sum(int(m.alive(t).sum()) for m in self.experts for t in range(m.num_tasks))
        return {"total": total, "alive": alive}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Grow or shrink the expert blocks to the checkpoint's count first (shapes must match to load)."""
        keys = state.get("module", {}).keys()
        found = [int(mt.group(1)) for key in keys for mt in [re.search(r"\.A\.(\d+)$", key)] if mt]
        if not found:
            raise CheckpointError("mora: the checkpoint holds no MoRA expert blocks (keys '*.A.<task>')")
        n = max(found) + 1
        for m in self.experts:
            m.set_num_tasks(n)
            m.freeze_tasks(n - 1)
        self._restart_optimizer()
        super().load_checkpoint_state(state)


__all__ = ["MoRA"]
