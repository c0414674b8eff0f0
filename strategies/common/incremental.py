"""Class-incremental bookkeeping shared by every learner: which classes were seen, and where sessions end.

Head convention (as Avalanche's ``IncrementalClassifier(masking=True)`` and PyCIL with a known total): the head keeps
all ``num_classes`` outputs and the logits of classes not seen in any labelled batch so far are masked to ``-inf``,
in training losses and at prediction alike, which is equivalent to a head that grows with the classes seen. Before
any labelled batch nothing is masked (a model that never learned predicts with its full head).

Session boundaries: the engine's ``segment_end`` hook closes a session at the end of each ``train`` segment; used
outside the engine, a session also ends at the first ``predict``/``adapt`` after labelled batches, and a new one
starts at the first ``learn`` after that; :meth:`SessionTracker.end_session` forces a boundary.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import last_linear

from ..base import Strategy

MASK_VALUE = float("-inf")


@torch.no_grad()
def fresh_linear_(layer: nn.Linear, generator: torch.Generator) -> None:
    """Re-draw ``layer`` as ``nn.Linear``'s default init: weight and bias uniform in +-1/sqrt(in_features)
    (kaiming-uniform with a = sqrt(5)), from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    for p in (layer.weight, layer.bias):
        if p is not None:
            p.copy_((torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(p))


def train_segment_epochs(segment: Any) -> Optional[Tuple[int, int]]:
    """For a train segment: (epochs it repeats, samples per epoch) from the stream's metadata; None for any other
    segment (the per-epoch schedules of CoSO and CODA-Prompt read it)."""
    if getattr(segment, "kind", None) != "train":
        return None
    epochs = max(int((getattr(segment, "meta", None) or {}).get("epochs", 1)), 1)
    return epochs, max(int(segment.num_samples) // epochs, 1)


class SeenClasses(nn.Module):
    """A boolean mask over the ``num_classes`` outputs: True for classes seen in a labelled batch (kept on device)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.register_buffer("seen", torch.zeros(self.num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, y: Tensor) -> None:
        """Mark the labels of ``y`` as seen (no host sync)."""
        self.seen.index_fill_(0, y.to(self.seen.device).long(), True)

    def mask(self, logits: Tensor) -> Tensor:
        """``logits`` with unseen classes at ``-inf``; unchanged while no class was seen yet."""
        return mask_logits(logits, self.seen)

    def count(self) -> int:
        """Number of seen classes (a host sync: for reports and tests, not per-step code)."""
        return int(self.seen.sum())


def mask_logits(logits: Tensor, keep: Tensor) -> Tensor:
    """``logits`` (N x C) with the columns where ``keep`` (C, or N x C) is False set to ``-inf``; unchanged where
    ``keep`` is all False (per row), so a prediction is always defined."""
    keep = keep.to(logits.device)
    if keep.dim() == 1:
        keep = keep.unsqueeze(0)
    keep = keep | ~keep.any(dim=1, keepdim=True)
    return logits.masked_fill(~keep, MASK_VALUE)


def present_classes(y: Tensor, num_classes: int) -> Tensor:
    """Boolean (num_classes,) mask of the labels present in ``y`` (on ``y``'s device, no host sync)."""
    out = torch.zeros(num_classes, dtype=torch.bool, device=y.device)
    return out.index_fill_(0, y.long(), True)


def num_outputs(model: nn.Module) -> int:
    """Number of classifier outputs of ``model`` (``num_classes`` attribute, else the last Linear's width)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    last = last_linear(model)
    if last is None:
        from ctta.errors import UnsupportedError

        raise UnsupportedError(f"cannot tell the number of classes of {type(model).__name__}: it has no "
                               f"num_classes attribute and no nn.Linear head")
    return int(last.out_features)


class SessionClasses:
    """The current session's classes as a boolean mask over the ``num_classes`` outputs, for the session-masked
    cross-entropy of LAE, CoSO, the prompt learners and EASE: the classes the train segment names (stream metadata),
    plus every label learned in the session. Checkpointed as ``session_classes`` / ``segment_classes``."""

    def __init__(self) -> None:
        self.segment: Optional[List[int]] = None  # the classes the current train segment names (None: unknown)
        self.mask: Optional[Tensor] = None  # None until the first session begins

    def segment_start(self, segment: Any) -> None:
        """Read the classes a train segment names; other segments change nothing."""
        if getattr(segment, "kind", None) == "train":
            classes = (getattr(segment, "meta", None) or {}).get("classes")
            self.segment = list(classes) if classes is not None else None

    def begin(self, num_classes: int, device: torch.device) -> Tensor:
        """A new session: the mask of the segment's classes (all False when the stream names none)."""
        self.mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
        if self.segment is not None:
            self.mask[torch.tensor(self.segment, device=device)] = True
        return self.mask

    def add(self, y: Tensor) -> Tensor:
        """Mark the labels of a batch learned in this session; returns the mask."""
        assert self.mask is not None, "begin() a session before learning in it"
        return self.mask.index_fill_(0, y, True)

    def state(self) -> Dict[str, Any]:
        return {"session_classes": None if self.mask is None else self.mask.cpu(), "segment_classes": self.segment}

    def load_state(self, state: Dict[str, Any], device: torch.device) -> None:
        sc = state.get("session_classes")
        self.mask = None if sc is None else sc.to(device)
        self.segment = state.get("segment_classes")


class SessionTracker:
    """Counts learning sessions from the order of calls: a ``learn`` after a prediction step opens a new session.

    ``on_learn()`` returns True when the call opens a session (the first one included); ``on_predict()`` returns
    True when the call closes the current one. ``session`` is the index of the current (or last) session, -1
    before any ``learn``. Plain Python state, carried across a resume by ``state()`` / ``load_state()``.
    """

    def __init__(self) -> None:
        self.session = -1
        self.in_session = False

    def on_learn(self) -> bool:
        if self.in_session:
            return False
        self.session += 1
        self.in_session = True
        return True

    def on_predict(self) -> bool:
        if not self.in_session:
            return False
        self.in_session = False
        return True

    def end_session(self) -> bool:
        """Close the current session explicitly (e.g. when a caller knows the boundary); same as ``on_predict``."""
        return self.on_predict()

    def state(self) -> Dict[str, Any]:
        return {"session": self.session, "in_session": self.in_session}

    def load_state(self, state: Dict[str, Any] | None) -> None:
        if state:
            self.session = int(state["session"])
            self.in_session = bool(state["in_session"])


class IncrementalStrategy(Strategy):
    """Base of the class-incremental learners: seen-class masking and session bookkeeping done once.

    Subclasses implement ``learn_batch(x, y)`` (``y``'s classes are already marked seen; return the masked logits
    seen before the update) and ``logits(x)`` (raw logits, no state change); optionally ``begin_session(k)`` /
    ``end_session(k)`` (called at the boundaries :class:`SessionTracker` detects) and ``extra()`` /
    ``load_extra(state)`` for non-tensor state carried across a resume.
    """

    step_kinds = frozenset({"train", "eval"})
    settings = frozenset({"class_incremental", "few_shot_class_incremental", "online_class_incremental",
                          "domain_incremental"})

    def __init__(self, model: nn.Module, seed: int = 0, mask_unseen: bool = True) -> None:
        super().__init__(model, seed)
        self.mask_unseen = bool(mask_unseen)
        self.seen = SeenClasses(num_outputs(model))
        self.sessions = SessionTracker()

    # --- hooks ------------------------------------------------------------------------------------------------
    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def logits(self, x: Tensor) -> Tensor:
        return self.model(x)

    def begin_session(self, session: int) -> None:
        return None

    def end_session(self, session: int) -> None:
        return None

    def extra(self) -> Any:
        return None

    def load_extra(self, state: Any) -> None:
        return None

    # --- the step kinds -----------------------------------------------------------------------------------------
    def mask(self, logits: Tensor) -> Tensor:
        """Unseen classes to ``-inf`` (when ``mask_unseen``)."""
        return self.seen.mask(logits) if self.mask_unseen else logits

    def learn(self, x: Tensor, y: Tensor) -> Tensor:
        if self.sessions.on_learn():
            self.begin_session(self.sessions.session)
        self.seen.update(y)
        return self.learn_batch(x, y)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.close_session()
        return self.mask(self.logits(x))

    def segment_end(self, segment: Any) -> None:
        """The engine's boundary signal: a finished ``train`` segment closes the session."""
        if getattr(segment, "kind", None) == "train":
            self.close_session()

    def close_session(self) -> None:
        """End the current session now (the end of a train segment, or failing that the first prediction step)."""
        if self.sessions.on_predict():
            self.end_session(self.sessions.session)

    def extra_state(self) -> Any:
        return {"sessions": self.sessions.state(), "extra": self.extra()}

    def load_extra_state(self, state: Any) -> None:
        if state:
            self.sessions.load_state(state.get("sessions"))
            self.load_extra(state.get("extra"))


class SGDLearner(IncrementalStrategy):
    """An incremental learner that trains every weight with SGD and predicts in eval mode (finetune, joint, ER).

    Subclasses add their state (buffers, stores) after ``super().__init__`` and then call
    ``remember_initial_state()``.
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float, weight_decay: float, mask_unseen: bool,
                 seed: int) -> None:
        super().__init__(model, seed, mask_unseen)
        self.model.requires_grad_(True)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.model.eval()

    def logits(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.model(x)

    def sgd_step(self, x: Tensor, y: Tensor, loss: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """One optimiser step in train mode on the seen-class-masked logits of ``x`` (cross-entropy with ``y`` unless
        ``loss(logits)`` is given); returns those logits, detached, and leaves the model in eval mode."""
        self.model.train()
        with torch.enable_grad():
            logits = self.mask(self.model(x))
            (F.cross_entropy(logits, y) if loss is None else loss(logits)).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return logits.detach()
