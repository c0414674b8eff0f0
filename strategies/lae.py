"""LAE: Learning-Accumulation-Ensemble with parameter-efficient modules on a frozen ViT.

Gao, Zhu, Xu, Lou, Yu, Chen; "A Unified Continual Learning Framework with General Parameter-Efficient Tuning"
(ICCV 2023, arXiv 2303.10070; official code gqk/LAE@1680e49, ``main.py``, ``libml/model/pet/adapter.py``,
``libml/model/head/dynamic_simple.py``; run side by side by ``benchmarks/lae_reference.py``).

* Learning: PET modules (``pet_type`` adapter | lora | prefix, from ``ctta.backbones.peft``) on the first blocks of a
  frozen ViT, each with learnable scalar scales (adaptation-speed calibration); the *online* modules and the linear
  head learn with Adam on the current session's logits only (cross-entropy over the classes of the session). In every
  session after the first the online modules are frozen during a warm-up (the official ``num_freeze_epochs`` = 3 of
  ``num_epochs`` = 5) while the head trains alone.
* Accumulation: the *offline* modules are a copy of the online ones taken when session 1 starts, then an EMA of them
  after every train step (decay 0.9999).
* Ensemble: prediction = element-wise max of the two experts' softmax (unseen classes masked); before session 1
  only the online expert exists. ``predict`` returns the log of that ensemble probability (argmax unchanged).
* Head: the official code classifies with new per-task linear heads (``DynamicSimpleHead``: weights N(0, 0.001^2),
  bias 0, each trained only in its task); ``head_init: reset`` (default) re-initialises our one head the same way
  (a row is trained only in its session: the loss covers the session's classes and Adam restarts per session);
  ``keep`` keeps the backbone's own head (e.g. an upstream-trained one, which already knows the classes).

Epochs in a stream of train batches: the engine's ``segment_start`` gives the session's segment, whose
``num_samples`` counts every pass over the session (``epochs`` in its meta). The warm-up is the first
``num_freeze_epochs / num_epochs`` of those samples (3/5 of the session with the official values), so a 5-epoch
session freezes exactly its first 3 passes; ``freeze_batches`` overrides it with a number of train batches (needed
when ``learn`` is called outside the engine, where the session length is unknown).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ctta.backbones.peft import (add_adapter, add_kv_lora, add_prefix, freeze, head_parameter_names, peft_modules,
                                 vit_block_names)
from ctta.errors import ConfigError
from ctta.hparams import Count, NonNegative, NonNegInt, Positive, Unit
from ctta.seeding import stable_seed

from .base import register
from .common.incremental import IncrementalStrategy, SessionClasses, mask_logits

log = logging.getLogger(__name__)

PET_TYPES = ("adapter", "lora", "prefix")


def attach_pets(model: nn.Module, pet_type: str, blocks: Sequence[int], pet_kwargs: Dict[str, Any]) -> List[str]:
    """Inject LAE's PET modules into the given ViT blocks (official placement); returns the PET parameter names.

    adapter: parallel to the block's attention (``attn(norm1(x)) + s * up(gelu(down(norm1(x))))``);
    lora: :class:`KVLoRA` on the keys and values of ``attn.qkv``; prefix: :class:`PrefixAttention` on ``attn``.
    """
    names = vit_block_names(model)
    bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(names)]
    if bad or not blocks:
        raise ConfigError(f"adapt_blocks must be a non-empty list of block indices in [0, {len(names)}), got "
                          f"{list(blocks)!r}")
    kw = dict(pet_kwargs)
    targets = [f"{names[b]}.attn" for b in blocks]
    if pet_type == "adapter":
        width = model.get_submodule(targets[0]).proj.out_features
        add_adapter(model, targets, dim=width, bottleneck=int(kw.pop("down_sample", 5)), mode="parallel",
                    learnable_scale=bool(kw.pop("learnable_scale", True)))
    elif pet_type == "lora":
        add_kv_lora(model, r=int(kw.pop("rank", 5)), select=[f"{t}.qkv" for t in targets],
                    learnable_scale=bool(kw.pop("learnable_scale", True)))
    elif pet_type == "prefix":
        add_prefix(model, targets, length=int(kw.pop("length", 10)), compensatory=bool(kw.pop("compensatory", True)),
                   learnable_scale=bool(kw.pop("learnable_scale", True)))
    else:
        raise ConfigError(f"pet_type must be one of {PET_TYPES}, got {pet_type!r}")
    if kw:
        raise ConfigError(f"unknown pet_kwargs for {pet_type}: {sorted(kw)}")
    ids = {id(p) for m in peft_modules(model) for p in m.peft_parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@torch.no_grad()
def reset_head(model: nn.Module, head_names: Sequence[str], seed: int) -> None:
    """The official new head's init (``SimpleHead.weights_init``): weights N(0, 0.001^2), bias 0 (seeded draw)."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(stable_seed(seed, "lae-head"))
    for n in head_names:
        p = params[n]
        if p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.001)
        else:
            p.zero_()


@register
class LAE(IncrementalStrategy):
    """Online PET modules learn each session (frozen during the warm-up of later sessions); offline = their EMA;
    prediction = max of the two experts' softmax. See the module docstring."""

    name = "lae"

    def __init__(self, model: nn.Module, pet_type: Literal["adapter", "lora", "prefix"] = "adapter",
                 adapt_blocks: Optional[Sequence[NonNegInt]] = None, pet_kwargs: Optional[Dict[str, Any]] = None,
                 lr: Positive = 0.0028125, weight_decay: NonNegative = 0.0, ema_decay: Unit = 0.9999,
                 num_epochs: Count = 5, num_freeze_epochs: NonNegInt = 3, freeze_batches: Optional[NonNegInt] = None,
                 head_init: Literal["reset", "keep"] = "reset", seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        if num_freeze_epochs > num_epochs:
            raise ConfigError(f"lae: num_freeze_epochs={num_freeze_epochs!r} must be <= num_epochs={num_epochs!r}")
        self.pet_type = str(pet_type)
        self.ema_decay = float(ema_decay)
        self.freeze_fraction = num_freeze_epochs / num_epochs
        self.freeze_batches = freeze_batches
        n_blocks = len(vit_block_names(model))
        blocks = list(adapt_blocks) if adapt_blocks is not None else list(range(min(5, n_blocks)))
        self.pet_names = attach_pets(self.model, self.pet_type, blocks, pet_kwargs or {})
        self.head_names = head_parameter_names(self.model)
        if head_init == "reset":
            reset_head(self.model, self.head_names, seed)
        elif head_init != "keep":
            raise ConfigError(f"lae: head_init must be 'reset' or 'keep', got {head_init!r}")
        freeze(self.model, except_=self.head_names, peft=True)
        self.model.eval()  # the frozen ViT has no batch statistics; dropout off
        params = dict(self.model.named_parameters())
        self.pets = [params[n] for n in self.pet_names]
        self.head = [params[n] for n in self.head_names]
        self.optimizer = torch.optim.Adam(self.pets + self.head, lr=lr, weight_decay=weight_decay)
        # the offline (EMA) expert: one buffer per PET parameter, in a submodule so it is checkpointed
        self.offline = nn.Module()
        for i, p in enumerate(self.pets):
            self.offline.register_buffer(f"p{i}", p.detach().clone())
        self.offline_ready = False
        self._warmup = 0  # samples (or batches with freeze_batches) of the current session's warm-up
        self._done = 0
        self.session_classes = SessionClasses()
        self._segment_samples: Optional[int] = None
        self.remember_initial_state()

    # --- experts --------------------------------------------------------------------------------------------------
    def offline_parameters(self) -> List[Tensor]:
        return [getattr(self.offline, f"p{i}") for i in range(len(self.pets))]

    def _offline_logits(self, x: Tensor) -> Tensor:
        return functional_call(self.model, dict(zip(self.pet_names, self.offline_parameters())), (x,))

    def logits(self, x: Tensor) -> Tensor:
        """Log of the ensemble probability: max over experts of the (seen-masked) softmax."""
        self.model.eval()
        prob = F.softmax(self.mask(self.model(x)), dim=1)
        if self.offline_ready:
            prob = torch.maximum(prob, F.softmax(self.mask(self._offline_logits(x)), dim=1))
        return prob.log()

    # --- sessions --------------------------------------------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        self.session_classes.segment_start(segment)
        if getattr(segment, "kind", None) == "train":
            self._segment_samples = int(segment.num_samples)

    def begin_session(self, session: int) -> None:
        self.optimizer.state.clear()  # a new optimizer per session, as the official code
        self.session_classes.begin(self.seen.num_classes, self.pets[0].device)
        self._done = 0
        if session == 0:
            self._warmup = 0
        elif self.freeze_batches is not None:
            self._warmup = self.freeze_batches
        elif self._segment_samples is not None:
            self._warmup = int(round(self._segment_samples * self.freeze_fraction))
        else:
            log.warning("lae: session length unknown (learn called outside the engine) and no freeze_batches: "
                        "no warm-up freeze in session %d", session)
            self._warmup = 0
        if session >= 1 and not self.offline_ready:
            with torch.no_grad():
                for o, p in zip(self.offline_parameters(), self.pets):
                    o.copy_(p)
            self.offline_ready = True

    def end_session(self, session: int) -> None:
        self.session_classes.segment = None
        self._segment_samples = None
        for p in self.pets:
            p.requires_grad_(True)

    def in_warmup(self) -> bool:
        """True while the online modules are frozen (the first part of a session after the first)."""
        return self._done < self._warmup

    # --- learning ----------------------------------------------------------------------------------------------------
    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        frozen = self.in_warmup()
        for p in self.pets:
            p.requires_grad_(not frozen)
        keep = self.session_classes.add(y)
        self.model.eval()
        with torch.enable_grad():
            logits = self.model(x)
            loss = F.cross_entropy(mask_logits(logits, keep), y)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.offline_ready:
            with torch.no_grad():
                torch._foreach_lerp_(self.offline_parameters(), [p.detach() for p in self.pets], 1.0 - self.ema_decay)
        self._done += 1 if self.freeze_batches is not None else int(x.shape[0])
        return self.mask(logits.detach())

    def trainable_parameters(self) -> List[nn.Parameter]:
        return self.pets + self.head

    def extra(self) -> Any:
        return {"offline_ready": self.offline_ready, "warmup": self._warmup, "done": self._done,
                **self.session_classes.state(), "segment_samples": self._segment_samples}

    def load_extra(self, state: Any) -> None:
        state = state or {}
        self.offline_ready = bool(state.get("offline_ready", False))
        self._warmup = int(state.get("warmup", 0))
        self._done = int(state.get("done", 0))
        self.session_classes.load_state(state, self.pets[0].device)
        self._segment_samples = state.get("segment_samples")
