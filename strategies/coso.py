"""CoSO: Continuous Subspace Optimization for continual learning on a frozen ViT.

Cheng et al., "Continuous Subspace Optimization for Continual Learning" (arXiv 2505.11816; official code
github.com/quinn-ch/CoSO, ``models/coso.py``, ``coso/adamw.py``, ``exps/coso_cifar.json``). The pre-trained ViT is
frozen except selected 2-D weights (the attention output projections ``attn.proj.weight``, as the official code) and
the linear head. The selected weights are trained with :class:`SubspaceAdamW` (``strategies/common/subspace.py``):
updates stay in a gradient subspace orthogonal to the directions earlier tasks used, which a frequent-directions
sketch collects per task and keeps at its end (energy threshold 0.98; ``energy_rule``: ``reach`` keeps the
fewest directions reaching the share, ``below`` the official code's count, one fewer). The loss is cross-entropy over the current
session's classes of the logits divided by a temperature (3); the official per-task heads become one head whose old
rows get no gradient (the head's Adam state restarts each session, so they do not move).
"""
from __future__ import annotations

import fnmatch
import logging
import math
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.peft import freeze, head_parameter_names
from ctta.errors import ConfigError

from .base import register
from .common.incremental import IncrementalStrategy, mask_logits
from .common.subspace import SubspaceAdamW

log = logging.getLogger(__name__)


@register
class CoSO(IncrementalStrategy):
    """Projected-AdamW training of selected ViT weights (``targets``) plus the head; see the module docstring.

    ``cosine``: the learning rates follow a cosine from their base value to 0 over each session's train batches (the
    official per-epoch cosine schedule, per batch here) when the session length is known from the engine.
    """

    name = "coso"

    def __init__(self, model: nn.Module, targets: Union[str, Sequence[str]] = "*.attn.proj.weight",
                 lr: float = 3e-4, fc_lr: float = 5e-4, weight_decay: float = 0.0, proj_rank: int = 15,
                 sketch_rank: int = 100, sketch_decay: float = 1.0, update_gap: int = 1, threshold: float = 0.98,
                 energy_rule: str = "reach", temperature: float = 3.0, cosine: bool = True, seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        if not 0.0 < float(threshold) <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {threshold!r}")
        if not float(temperature) > 0:
            raise ConfigError(f"temperature must be positive, got {temperature!r}")
        if energy_rule not in ("reach", "below"):
            raise ConfigError(f"energy_rule must be 'reach' or 'below', got {energy_rule!r}")
        patterns = [targets] if isinstance(targets, str) else list(targets)
        named = dict(self.model.named_parameters())
        self.target_names = [n for n in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not self.target_names:
            raise ConfigError(f"coso: no parameter matches targets {patterns} in {type(model).__name__}")
        bad = [n for n in self.target_names if named[n].dim() != 2]
        if bad:
            raise ConfigError(f"coso: targets must be 2-D weights, got {bad[:3]}")
        self.head_names = head_parameter_names(self.model)
        freeze(self.model, except_=self.target_names + self.head_names)
        self.model.eval()
        self.targets = [named[n] for n in self.target_names]
        self.head = [named[n] for n in self.head_names]
        self.base_lrs = (float(fc_lr), float(lr))
        self.optimizer = SubspaceAdamW(
            [{"params": self.head, "lr": fc_lr},
             {"params": self.targets, "lr": lr, "subspace": True}],
            weight_decay=weight_decay, proj_rank=proj_rank, sketch_rank=sketch_rank, sketch_decay=sketch_decay,
            update_gap=update_gap)
        self.threshold = float(threshold)
        self.energy_rule = str(energy_rule)
        self.temperature = float(temperature)
        self.cosine = bool(cosine)
        self._session_classes: Optional[Tensor] = None
        self._segment_classes: Optional[List[int]] = None
        self._total = 0  # train batches of the current session (0: unknown)
        self._done = 0
        self.remember_initial_state()

    def logits(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.model(x)

    def segment_start(self, segment: Any) -> None:
        if getattr(segment, "kind", None) == "train":
            self._total = math.ceil(int(segment.num_samples) / max(int(segment.batch_size), 1))
            classes = (getattr(segment, "meta", None) or {}).get("classes")
            self._segment_classes = list(classes) if classes is not None else None

    def begin_session(self, session: int) -> None:
        dev = self.head[0].device
        self._session_classes = torch.zeros(self.seen.num_classes, dtype=torch.bool, device=dev)
        if self._segment_classes is not None:
            self._session_classes[torch.tensor(self._segment_classes, device=dev)] = True
        self.optimizer.reset_group_state([0])  # the head restarts (official: a new head per task)
        self._done = 0
        self._set_lr()

    def end_session(self, session: int) -> None:
        dims = self.optimizer.end_task(self.threshold, self.energy_rule)
        log.info("coso: historical subspace dimensions after session %d: %s", session, dims)
        self._segment_classes = None
        self._total = 0

    def _set_lr(self) -> None:
        factor = 1.0
        if self.cosine and self._total > 0:
            factor = 0.5 * (1.0 + math.cos(math.pi * min(self._done, self._total) / self._total))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        assert self._session_classes is not None
        self._session_classes.index_fill_(0, y, True)
        self.model.eval()
        self._set_lr()
        with torch.enable_grad():
            logits = self.model(x)
            loss = F.cross_entropy(mask_logits(logits, self._session_classes) / self.temperature, y)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._done += 1
        return self.mask(logits.detach())

    def trainable_parameters(self) -> List[nn.Parameter]:
        return self.targets + self.head

    def extra(self) -> Any:
        return {"session_classes": None if self._session_classes is None else self._session_classes.cpu(),
                "segment_classes": self._segment_classes, "total": self._total, "done": self._done}

    def load_extra(self, state: Any) -> None:
        state = state or {}
        sc = state.get("session_classes")
        self._session_classes = None if sc is None else sc.to(self.head[0].device)
        self._segment_classes = state.get("segment_classes")
        self._total = int(state.get("total", 0))
        self._done = int(state.get("done", 0))
