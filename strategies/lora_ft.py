"""LoRA fine-tuning: one LoRA (``ctta.backbones.peft.add_lora``) on a frozen backbone, trained through every session.

The plain parameter-efficient baseline of MoRA's comparison (Lu et al., arXiv 2506.21035, Tables: "LoRA-FT"): the
same adapted layers, loss and optimizer as :mod:`strategies.mora`, but one shared rank-``r`` update that every
session keeps training (so it forgets). Head: a CLIP backbone keeps its fixed zero-shot text head (nothing of it
trains, ``logit_scale`` included); any other backbone trains its linear head with the adapters. Loss: cross-entropy
over the classes of the current session (``loss_classes="session"``, as CLIP continual learners on class-incremental
splits) or over all classes seen so far (``"seen"``); prediction masks unseen classes.

:class:`PeftIncremental` is the shared frame (head choice, loss, per-session optimizer restart); subclasses say which
parameters train in a session.
"""
from __future__ import annotations

import logging
from typing import Any, List, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.peft import LoRALinear, add_attention_peft, add_lora, freeze, head_parameter_names
from ctta.errors import UnsupportedError
from ctta.hparams import Count, NonNegative, Positive

from .base import register
from .common.incremental import IncrementalStrategy, mask_logits

log = logging.getLogger(__name__)

#: Linear targets on attention and MLP layers: timm ViT (qkv, proj, fc1, fc2) and open_clip (MLP c_fc / c_proj).
#: open_clip's attention is an ``nn.MultiheadAttention`` (a bare fused in-projection parameter, out_proj read
#: directly by torch): ``attention=True`` adapts its in- and out-projections via ``AttentionProjections``.
DEFAULT_TARGETS = ("*.attn.qkv", "*.attn.proj", "*.mlp.fc1", "*.mlp.fc2", "*.mlp.c_fc", "*.mlp.c_proj")


def is_clip(model: nn.Module) -> bool:
    """True for a CLIP zero-shot classifier (its head is the fixed text embedding, not a trainable layer)."""
    from ctta.backbones.clip import CLIPZeroShot

    return any(isinstance(m, CLIPZeroShot) for m in model.modules())


class PeftIncremental(IncrementalStrategy):
    """Frozen backbone + injected PEFT parameters (+ the linear head unless CLIP); Adam restarted each session."""

    settings = frozenset({"class_incremental", "few_shot_class_incremental"})

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, loss_classes: str, train_head: Optional[bool],
                 seed: int) -> None:
        super().__init__(model, seed, mask_unseen=True)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.loss_classes = loss_classes
        self.train_head = (not is_clip(model)) if train_head is None else bool(train_head)
        self._session_classes: Optional[Tensor] = None

    def _setup(self) -> None:
        """Freeze everything but the PEFT parameters (and the head); call after injecting."""
        self.head_names = head_parameter_names(self.model) if self.train_head else []
        freeze(self.model, except_=self.head_names, peft=True)
        named = dict(self.model.named_parameters())
        self.head = [named[n] for n in self.head_names]
        self.model.eval()  # frozen backbone: no batch statistics, no dropout
        self.optimizer = torch.optim.Adam(self.session_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def session_parameters(self) -> List[nn.Parameter]:
        """The parameters the current session trains."""
        raise NotImplementedError

    def _restart_optimizer(self) -> None:
        self.optimizer = torch.optim.Adam(self.session_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def begin_session(self, session: int) -> None:
        self._restart_optimizer()
        self._session_classes = torch.zeros(self.seen.num_classes, dtype=torch.bool, device=self.seen.seen.device)

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        if self._session_classes is None:
            self.begin_session(self.sessions.session)
        assert self._session_classes is not None
        self._session_classes.index_fill_(0, y.to(self._session_classes.device), True)
        self.model.eval()
        with torch.enable_grad():
            logits = self.model(x)
            keep = self._session_classes if self.loss_classes == "session" else self.seen.seen
            loss = F.cross_entropy(mask_logits(logits, keep), y)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.mask(logits.detach())

    def logits(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.model(x)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return self.session_parameters()

    def extra(self) -> Any:
        return {"session_classes": None if self._session_classes is None else self._session_classes.cpu()}

    def load_extra(self, state: Any) -> None:
        sc = (state or {}).get("session_classes")
        self._session_classes = None if sc is None else sc.to(self.seen.seen.device)


@register
class LoRAFineTune(PeftIncremental):
    """One LoRA of rank ``r`` on ``targets`` (and, with ``attention``, on the in/out-projections of every
    ``nn.MultiheadAttention``) trained with Adam through all sessions (see the module docstring)."""

    name = "lora_ft"

    def __init__(self, model: nn.Module, r: Count = 4, alpha: Positive = 1.0,
                 targets: Union[str, Sequence[str]] = DEFAULT_TARGETS, lr: Positive = 1e-3,
                 weight_decay: NonNegative = 0.0, loss_classes: Literal["session", "seen"] = "session",
                 train_head: Optional[bool] = None, attention: bool = True, seed: int = 0) -> None:
        super().__init__(model, lr, weight_decay, loss_classes, train_head, seed)
        wrappers = add_attention_peft(self.model, lambda m: LoRALinear(m, r, alpha)) if attention else []
        try:
            add_lora(self.model, r=r, alpha=alpha, select=targets if isinstance(targets, str) else list(targets))
        except UnsupportedError:
            if not wrappers:
                raise
        self.loras = [m for m in self.model.modules() if isinstance(m, LoRALinear)]
        self._setup()
        self.remember_initial_state()

    def session_parameters(self) -> List[nn.Parameter]:
        return [p for m in self.loras for p in m.peft_parameters()] + self.head


__all__ = ["DEFAULT_TARGETS", "LoRAFineTune", "PeftIncremental", "is_clip"]
