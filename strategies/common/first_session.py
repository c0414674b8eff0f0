"""First-session adaptation of a pretrained backbone, then frozen (RanPAC's and APER's shared mechanism).

Both LAMDA-PILOT learners (sun-hailong/LAMDA-PILOT@2647455 ``models/ranpac.py`` and ``models/aper_*.py``
``_train`` / ``_init_train``; zhoudw-zdw/RevisitingCIL ``models/aper_*.py`` likewise) tune the backbone's PEFT (or
all) parameters in session 0 only, through ``SimpleVitNet``: a cosine head ``sigma * cos(f, w_c)``
(``backbone/linears.py`` ``CosineLinear``, weights U(-1/sqrt(D), 1/sqrt(D)), sigma learnable from 1) over the
session's classes, cross-entropy, SGD (momentum 0.9) on every trainable parameter and the head, the learning rate
cosine-annealed per epoch (``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)``). Our stream gives a session's
epochs as consecutive passes over its images; the head's statistics (prototypes, Gram matrices) use the first pass
only, from features taken after the adaptation, so the first pass's images are kept until the session ends.

:class:`FirstSessionTuning` is a mixin of :class:`~strategies.common.incremental.IncrementalStrategy` holding that
loop (``train_weight``, ``train_sigma``, ``optimizer``, ``store`` and the pass bookkeeping);
:func:`add_ffn_adapters` is the AdaptFormer placement both use.
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import penultimate_features
from ctta.backbones.peft import Adapter, Scaler, peft_parameters, vit_block_names

from .replay import GrowingStore


def add_ffn_adapters(model: nn.Module, bottleneck: int, scale: float, dropout: float) -> List[nn.Parameter]:
    """AdaptFormer adapters beside every ViT block's MLP, as PILOT's ``backbone/vit_adapter.py`` (``ffn_option``
    parallel, init ``lora``, ReLU, dropout, fixed output scale): ``x + mlp(norm2(x)) + s * up(drop(relu(down(x))))``
    with ``x`` the block's stream after attention (the block's ``norm2`` moves inside the wrapped branch, so the
    adapter reads ``x``); returns the adapters' parameters."""
    for name in vit_block_names(model):
        block = model.get_submodule(name)
        width = block.mlp.fc2.out_features
        ad = Adapter(nn.Sequential(block.norm2, block.mlp), width, bottleneck, mode="parallel")
        ad.act = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
        ad.scaler = Scaler(scale, learnable=False)
        block.mlp, block.norm2 = ad.to(block.mlp.fc2.weight.device), nn.Identity()
    return peft_parameters(model)


def penultimate_dim(model: nn.Module) -> int:
    """Width of ``model``'s penultimate features (a probe on a zero image when the model does not say)."""
    size = getattr(model, "input_size", None) or (3, 32, 32)
    with torch.no_grad():
        return int(penultimate_features(model.eval(), torch.zeros(1, *size)).shape[1])


class SessionPasses:
    """Mixin: the passes of a session that the stream repeats for several epochs (samples per pass from the train
    segment), so a method keeps each image once: :meth:`_first_pass` gives a batch's first-pass rows, ``store``
    holds what the host keeps of them. The host calls :meth:`setup_passes` in its ``__init__``."""

    def setup_passes(self) -> None:
        """The pass bookkeeping and the store (every host)."""
        self.store = GrowingStore()  # this session's features (or session 0's images while adapting)
        self._pass = None  # distinct samples per pass of the current session (None: every sample counts)
        self._epochs = 1
        self._done = 0

    def segment_start(self, segment: Any) -> None:
        if getattr(segment, "kind", None) == "train":
            self._epochs = int((getattr(segment, "meta", None) or {}).get("epochs", 1))
            self._pass = int(segment.num_samples) // self._epochs

    def begin_session(self, session: int) -> None:
        self._done = 0

    def end_passes(self) -> None:
        """The session is over: the next one counts its own passes."""
        self._pass, self._epochs = None, 1

    def _first_pass(self, b: int) -> slice:
        """The rows of a batch of ``b`` that belong to the session's first pass (the head uses each image once)."""
        start = self._done
        self._done += b
        if self._pass is None:
            return slice(0, b)
        return slice(0, max(0, min(b, self._pass - start)))

    def passes_state(self) -> dict:
        return {"store": self.store.state(), "pass": self._pass, "epochs": self._epochs, "done": self._done}

    def load_passes_state(self, state: dict) -> None:
        self.store.load_state(state.get("store"))
        self._pass, self._epochs, self._done = state.get("pass"), int(state.get("epochs", 1)), int(state.get("done", 0))


class FirstSessionTuning(SessionPasses):
    """Mixin: session-0 training of ``params`` with a cosine head, per-epoch cosine learning rate, first-pass images
    kept in ``store``. The host calls :meth:`setup_first_session` (or :meth:`setup_passes` alone when it does not
    adapt) in its ``__init__``; it provides ``adapting``, ``features`` and ``head_logits`` and inherits ``logits`` /
    ``learn_batch`` (or overrides them and uses :meth:`adapt_step` as its session-0 ``learn_batch``)."""

    def setup_first_session(self, params: Sequence[nn.Parameter], num_classes: int, dim: int, lr: float,
                            momentum: float, weight_decay: float, min_lr: float) -> None:
        """The training head (``train_weight`` C x D U(-1/sqrt D, 1/sqrt D), ``train_sigma`` 1) and SGD over
        ``params`` and the head."""
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.train_weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim)))
        self.train_sigma = nn.Parameter(torch.ones(1))
        self.optimizer = torch.optim.SGD(list(params) + [self.train_weight, self.train_sigma], lr=self.lr,
                                         momentum=momentum, weight_decay=weight_decay)

    # --- training -------------------------------------------------------------------------------------------------
    def _train_logits(self, x: Tensor) -> Tensor:
        """Session 0's training head: sigma * cos(features, weights) (PILOT's CosineLinear)."""
        f = self.train_features(x)
        return self.train_sigma * F.normalize(f, dim=1) @ F.normalize(self.train_weight, dim=1).T

    def train_features(self, x: Tensor) -> Tensor:
        """The features the training head reads (the adapted backbone's penultimate features)."""
        return penultimate_features(self.model, x)

    def adapt_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One SGD step (train mode) at this epoch's cosine learning rate; keeps the first pass's images; returns
        the seen-class-masked training logits before the step."""
        epoch = self._done // self._pass if self._pass else 0
        lr = self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * epoch / self._epochs)) / 2
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        keep = self._first_pass(int(x.shape[0]))
        self.model.train()
        with torch.enable_grad():
            logits = self.mask(self._train_logits(x))
            F.cross_entropy(logits, y).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.store.add(x[keep], y[keep])
        return logits.detach()

    # --- the frozen-backbone sessions -------------------------------------------------------------------------------
    def logits(self, x: Tensor) -> Tensor:
        """While adapting, the training head's logits (eval mode); afterwards the host's ``head_logits`` of its
        ``features``."""
        if self.adapting:
            self.model.eval()
            return self._train_logits(x)
        return self.head_logits(self.features(x))

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """Session 0 while adapting: :meth:`adapt_step`; otherwise the masked head logits of the batch, and its
        first-pass features handed to :meth:`accumulate`."""
        if self.adapting:
            return self.adapt_step(x, y)
        f = self.features(x)
        out = self.mask(self.head_logits(f))
        keep = self._first_pass(int(x.shape[0]))
        self.accumulate(f[keep], y[keep])
        return out

    def accumulate(self, f: Tensor, y: Tensor) -> None:
        """Where the first-pass features of a frozen-backbone batch go (default: the session's store)."""
        self.store.add(f, y)

    def stored_images_to_features(self, batch_size: int) -> None:
        """Replace the kept images by ``self.features`` of them (after the adaptation), ``batch_size`` at a time."""
        x, y = self.store.items()
        feats = [self.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        self.store.clear()
        if feats:
            self.store.add(torch.cat(feats), y)


__all__ = ["FirstSessionTuning", "SessionPasses", "add_ffn_adapters", "penultimate_dim"]
