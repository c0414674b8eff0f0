"""CoSO: Continuous Subspace Optimization for continual learning on a frozen ViT.

Cheng et al., "Continuous Subspace Optimization for Continual Learning" (arXiv 2505.11816; official code
github.com/quinn-ch/CoSO, ``models/coso.py``, ``coso/adamw.py``, ``exps/coso_cifar.json``). The pre-trained ViT is
frozen except selected 2-D weights (the attention output projections ``attn.proj.weight``, as the official code) and
the linear head. The selected weights are trained with :class:`SubspaceAdamW` (``strategies/common/subspace.py``):
updates stay in a gradient subspace orthogonal to the directions earlier tasks used, which a frequent-directions
sketch collects per task and keeps at its end (energy threshold 0.98; ``energy_rule``: ``below``, the official
count ``sum(cumsum(share) < threshold)``, or ``reach``, the fewest directions reaching the share, one more). The
sketch is the official ``DoubleSVD`` (each gradient shrunk by its own (r+1)-th singular value before merging;
``sketch_shrink_block: false`` gives the textbook frequent-directions sketch). The loss is cross-entropy over the
current session's classes of the logits divided by a temperature (3). The official per-task heads (``CoSOVitNet``'s
``classifier_pool``, fresh ``nn.Linear`` layers) become the rows of one head: ``head_init: fresh`` (default) re-draws
the head as ``nn.Linear``'s default init (U(+-1/sqrt(width)), weight and bias, from the strategy's seed), so a
checkpoint's head trained upstream on the same classes is not used (``keep``: use it); in training the logits are the
session's rows only (``F.linear`` of the features with those rows, in the stream's class order, as the official
task head computes them), old rows get no gradient and keep still (the head's Adam state restarts each session).

Learning-rate schedule (``cosine``): the official ``utils/scheduler.py`` ``CosineSchedule`` with K = epochs, as
``models/coso.py`` drives it: built at the start of each task (its constructor sets the epoch-0 rate and then resets
``last_epoch`` to -1) and stepped after each epoch, so the first step sets epoch 0's rate again. In epoch e
(0 .. K-1) every rate is ``base * cos(99 pi max(e - 1, 0) / (200 (K - 1)))``: the base rate in the first two epochs,
then a quarter cosine, ``cos(99 pi (K - 2) / (200 (K - 1)))`` of it in the last epoch (9.7 % at K = 20; the 1.6 % of
``e / (K - 1)`` is never reached), constant within an epoch. The epochs come from the engine's ``segment_start``
(the train segment's ``meta["epochs"]``; its ``num_samples`` counts every pass), the epoch of a batch from the
samples learned before it. With one epoch (where the official formula divides by zero) or outside the engine the
rates stay at their base values.

The projected AdamW follows ``coso/adamw.py`` operation for operation (H the sketch directions concatenated as they
are; ``orthonormal_history: true`` re-orthonormalises H by QR and projects updates off it again, not the official
code). benchmarks/coso_reference.py runs the official learner side by side.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Annotated, Any, List, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.peft import freeze, head_parameter_names
from ctta.errors import ConfigError
from ctta.hparams import Count, NonNegative, Positive, Range, Unit
from ctta.seeding import stable_seed

from .base import register
from .common.incremental import IncrementalStrategy, SessionClasses, fresh_linear_, mask_logits, train_segment_epochs
from .common.optim import epoch_cosine  # noqa: F401  (re-exported: tests and users import it from here)
from .common.subspace import SubspaceAdamW

log = logging.getLogger(__name__)


@register
class CoSO(IncrementalStrategy):
    """Projected-AdamW training of selected ViT weights (``targets``) plus the head; see the module docstring.

    ``cosine``: the official per-epoch quarter-cosine schedule (:func:`epoch_cosine`) when the engine tells the
    session's epochs; false: constant rates.
    """

    name = "coso"

    def __init__(self, model: nn.Module, targets: Union[str, Sequence[str]] = "*.attn.proj.weight",
                 lr: Positive = 3e-4, fc_lr: Positive = 5e-4, weight_decay: NonNegative = 0.0, proj_rank: Count = 15,
                 sketch_rank: Count = 100, sketch_decay: Unit = 1.0, update_gap: Count = 1,
                 threshold: Annotated[float, Range(gt=0, le=1)] = 0.98,
                 energy_rule: Literal["reach", "below"] = "below", temperature: Positive = 3.0, cosine: bool = True,
                 sketch_shrink_block: bool = True, head_init: Literal["fresh", "keep"] = "fresh",
                 orthonormal_history: bool = False, seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        patterns = [targets] if isinstance(targets, str) else list(targets)
        named = dict(self.model.named_parameters())
        self.target_names = [n for n in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not self.target_names:
            raise ConfigError(f"coso: no parameter matches targets {patterns} in {type(model).__name__}")
        bad = [n for n in self.target_names if named[n].dim() != 2]
        if bad:
            raise ConfigError(f"coso: targets must be 2-D weights, got {bad[:3]}")
        self.head_names = head_parameter_names(self.model)
        head = self.model.get_submodule(self.head_names[0].rpartition(".")[0])
        self.head_layer = head if isinstance(head, nn.Linear) else None
        self.head_init = str(head_init)
        if self.head_init == "fresh":
            if self.head_layer is None:
                raise ConfigError(f"coso: head_init 'fresh' needs an nn.Linear head, got {type(head).__name__}; "
                                  f"use head_init: keep")
            fresh_linear_(self.head_layer, torch.Generator().manual_seed(stable_seed(seed, "coso-head")))
        # the session's rows of the head, as the official task head, need the features (else: masked full logits)
        self._rows = self.head_layer is not None and all(
            hasattr(self.model, a) for a in ("forward_features", "forward_head"))
        freeze(self.model, except_=self.target_names + self.head_names)
        self.model.eval()
        self.targets = [named[n] for n in self.target_names]
        self.head = [named[n] for n in self.head_names]
        self.base_lrs = (float(fc_lr), float(lr))
        self.optimizer = SubspaceAdamW(
            [{"params": self.head, "lr": fc_lr},
             {"params": self.targets, "lr": lr, "subspace": True}],
            weight_decay=weight_decay, proj_rank=proj_rank, sketch_rank=sketch_rank, sketch_decay=sketch_decay,
            update_gap=update_gap, shrink_block=sketch_shrink_block, orthonormalize=orthonormal_history)
        self.threshold = float(threshold)
        self.energy_rule = str(energy_rule)
        self.temperature = float(temperature)
        self.cosine = bool(cosine)
        self.session_classes = SessionClasses()
        self._session_index: Optional[Tensor] = None  # the session's classes in the stream's order (its head rows)
        self._epochs = 0  # epochs of the current session (0: unknown)
        self._epoch_samples = 0  # samples per epoch
        self._done = 0  # samples learned in the current session
        self.remember_initial_state()

    def logits(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.model(x)

    def segment_start(self, segment: Any) -> None:
        self.session_classes.segment_start(segment)
        info = train_segment_epochs(segment)
        if info is not None:
            self._epochs, self._epoch_samples = info

    def begin_session(self, session: int) -> None:
        dev = self.head[0].device
        self.session_classes.begin(self.seen.num_classes, dev)
        self._session_index = None
        if self.session_classes.segment is not None:
            self._session_index = torch.tensor(self.session_classes.segment, dtype=torch.long, device=dev)
        self.optimizer.reset_group_state([0])  # the head restarts (official: a new head per task)
        self._done = 0
        self._set_lr()

    def end_session(self, session: int) -> None:
        dims = self.optimizer.end_task(self.threshold, self.energy_rule)
        log.info("coso: historical subspace dimensions after session %d: %s", session, dims)
        self.session_classes.segment = None
        self._session_index = None
        self._epochs = self._epoch_samples = 0

    def epoch(self) -> int:
        """The epoch (0-based) of the next train batch in the current session, from the samples learned so far."""
        if self._epochs <= 0:
            return 0
        return min(self._done // self._epoch_samples, self._epochs - 1)

    def _set_lr(self) -> None:
        factor = epoch_cosine(self.epoch(), self._epochs) if self.cosine else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        keep = self.session_classes.add(y)
        idx = self._session_index if self._rows else None
        if idx is not None and self._done == 0 and not bool((y[:, None] == idx[None]).any(1).all()):
            log.warning("coso: labels outside the train segment's classes %s; training on the masked full head",
                        self.session_classes.segment)  # checked once per session (a host sync)
            idx = self._session_index = None
        self.model.eval()
        self._set_lr()
        with torch.enable_grad():
            if idx is not None:  # the session's own head: its rows, in the stream's class order
                feats = self.model.forward_features(x)
                w, b = self.head_layer.weight, self.head_layer.bias
                rows = F.linear(feats, w[idx], None if b is None else b[idx])
                loss = F.cross_entropy(rows / self.temperature, (y[:, None] == idx[None]).long().argmax(1))
                with torch.no_grad():
                    logits = self.model.forward_head(feats)
            else:
                logits = self.model(x)
                loss = F.cross_entropy(mask_logits(logits, keep) / self.temperature, y)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._done += int(x.shape[0])
        return self.mask(logits.detach())

    def trainable_parameters(self) -> List[nn.Parameter]:
        return self.targets + self.head

    def extra(self) -> Any:
        return {**self.session_classes.state(), "epochs": self._epochs,
                "session_index": None if self._session_index is None else self._session_index.tolist(),
                "epoch_samples": self._epoch_samples, "done": self._done}

    def load_extra(self, state: Any) -> None:
        state = state or {}
        self.session_classes.load_state(state, self.head[0].device)
        si = state.get("session_index")
        self._session_index = None if si is None else torch.tensor(si, dtype=torch.long, device=self.head[0].device)
        self._epochs = int(state.get("epochs", 0))
        self._epoch_samples = int(state.get("epoch_samples", 0))
        self._done = int(state.get("done", 0))
