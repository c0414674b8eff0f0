"""EASE: Expandable Subspace Ensemble, one new adapter (subspace) per session on a frozen pretrained ViT.

Zhou, Sun, Ye, Zhan; "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental Learning"
(CVPR 2024, arXiv 2403.12030). Reference for the numbers: LAMDA-PILOT (sun-hailong/LAMDA-PILOT@2647455,
``models/ease.py`` ``Learner``: ``incremental_train``, ``_init_train``, ``replace_fc``, ``solve_sim_reset``,
``solve_similarity``; ``backbone/vit_ease.py`` (``Adapter``, ``Block``, ``forward_train`` / ``forward_test`` /
``forward_proto``); ``utils/inc_net.py`` ``EaseNet``; ``backbone/linears.py`` ``EaseCosineLinear.forward_reweight``;
``exps/ease.json``), run side by side by ``benchmarks/ease_reference.py``. The official sun-hailong/CVPR24-EASE
(same first author of the code) could not be fetched here; PILOT's port is followed throughout.

Algorithm (session t, classes C_t):

1. Expand: a fresh AdaptFormer adapter beside every block's MLP (bottleneck 64, ReLU, dropout 0.1, output scale
   0.1, zero up-projection: :func:`ctta.backbones.peft.add_ffn_adapter_sets`); the adapters of sessions < t and the
   pretrained weights stay frozen. Subspace k is the ViT's [CLS] feature ``phi_k(x)`` routed through adapter k.
2. Train adapter t with a fresh cosine proxy head ``sigma cos(phi_t(x), w_c)`` over C_t only (weights
   U(-1/sqrt D, 1/sqrt D), sigma learnable from 1), cross-entropy, SGD (momentum 0.9, weight decay 5e-4) on the
   adapter and the proxy head, lr cosine-annealed per epoch (``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)``);
   the loop, the per-epoch lr and the first-pass image store are :class:`~strategies.common.first_session.
   FirstSessionTuning`'s, run every session here with a new head and optimizer.
3. Prototypes: for each new class c and every subspace k <= t, ``P[k, c]`` = mean of ``phi_k`` over c's training
   images (one pass, eval mode; :class:`~strategies.common.prototypes.PrototypeMemory`).
4. Semantic-guided complement (:func:`complement_prototypes`): an old class o (learned in session s < t) has no
   data in the later subspaces j > s; ``P[j, o] = sum_n softmax_n(cos(P[s, o], P[s, n])) P[j, n]`` over the classes
   n with real prototypes in both s and j (those learned in sessions >= j). ``recalc_sim: true`` (exps/ease.json,
   ``solve_sim_reset``) recomputes every such entry each session; ``false`` (``solve_similarity``) only the newest
   subspace's, from the new classes.
5. Inference (``use_reweight``, ``forward_reweight``): for class c of session s,
   ``logit_c = cos(phi_s(x), P[s, c]) + (alpha / T) sum_{k != s} cos(phi_k(x), P[k, c])`` over the T + 1 subspaces
   so far (fc's sigma stays 1 in PILOT: never in a loss); ``use_reweight: false``: the cosine of the concatenated
   feature with the concatenated prototype (its ``fc``).

Not ported (all false / 0 in exps/ease.json): ``use_init_ptm`` (the pretrained feature as an extra subspace,
weighted ``beta`` = 0), ``use_diagonal``, ``use_old_data``, ``moni_adam``. PILOT's data manager augments its
training images (``mode="train"``); ours trains on the stream's images as they come.

Costs: T + 1 forward passes per test image after T + 1 sessions (one per subspace); stored: T + 1 adapters and
(T + 1) x C x D prototypes; trainable in a session: one adapter and the proxy head.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import penultimate_features
from ctta.backbones.peft import AdapterSet, add_ffn_adapter_sets, freeze, set_active_adapter
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit
from ctta.seeding import stable_seed

from .base import register
from .common.first_session import FirstSessionTuning
from .common.incremental import IncrementalStrategy, SessionClasses, mask_logits, num_outputs
from .common.prototypes import PrototypeMemory, feature_dim

log = logging.getLogger(__name__)


def complement_prototypes(protos: Tensor, real: Tensor, owner: Tensor, recalc: bool = True) -> Tensor:
    """EASE's semantic-guided prototype complement (see the module docstring, step 4) of ``protos`` (K x C x D):
    ``real`` (K x C) marks the prototypes computed from data, ``owner`` (C) the session each class was learned in
    (-1: unseen). Fills ``P[j, c]`` for every class of session ``s`` and later subspace ``j`` (all ``j > s`` with
    ``recalc``, else only ``j = K - 1``); returns a new tensor."""
    out = protos.clone()
    k = protos.shape[0]
    for s in range(k - 1):
        old = owner == s
        if not bool(old.any()):
            continue
        for j in range(s + 1, k) if recalc else [k - 1]:
            co = real[s] & real[j]
            if not bool(co.any()):
                continue
            sim = F.normalize(protos[s, old], dim=1) @ F.normalize(protos[s, co], dim=1).T
            out[j, old] = sim.softmax(dim=1) @ protos[j, co]
    return out


def reweighted_logits(cosines: Tensor, owner: Tensor, alpha: float) -> Tensor:
    """``sum_k w[k, c] cos_k`` over the K subspaces (``cosines``: K x N x C): weight 1 in each class's own subspace,
    ``alpha / (K - 1)`` in the others (PILOT's ``forward_reweight``)."""
    k = cosines.shape[0]
    if k == 1:
        return cosines[0]
    own = torch.arange(k, device=owner.device).unsqueeze(1) == owner.unsqueeze(0)  # K x C
    w = torch.where(own, 1.0, alpha / (k - 1)).to(cosines.dtype)
    return (w.unsqueeze(1) * cosines).sum(0)


@register
class EASE(FirstSessionTuning, IncrementalStrategy):
    """A new adapter per session (earlier ones frozen), prototypes in every subspace, old classes' prototypes in
    new subspaces synthesised from class similarity, reweighted cosine ensemble. See the module docstring."""

    name = "ease"

    def __init__(self, model: nn.Module, lr: Positive = 0.025, momentum: Momentum = 0.9,
                 weight_decay: NonNegative = 0.0005, min_lr: NonNegative = 0.0, bottleneck: Count = 64,
                 adapter_scale: Positive = 0.1, adapter_dropout: Unit = 0.1, alpha: NonNegative = 0.1,
                 recalc_sim: bool = True, use_reweight: bool = True, feature_batch_size: Count = 256,
                 seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.alpha, self.recalc_sim, self.use_reweight = float(alpha), bool(recalc_sim), bool(use_reweight)
        self.feature_batch_size = int(feature_batch_size)
        self.dim = feature_dim(model)
        n_cls = num_outputs(model)
        self.sets: List[AdapterSet] = add_ffn_adapter_sets(self.model, int(bottleneck), float(adapter_scale),
                                                           float(adapter_dropout))
        freeze(self.model)
        self.model.eval()
        self._add_adapter(0)
        self.train_weight = nn.Parameter(torch.empty(n_cls, self.dim))
        self.train_sigma = nn.Parameter(torch.ones(1))
        self._reset_proxy_head(0)
        self.register_buffer("protos", torch.zeros(0, n_cls, self.dim))  # K x C x D
        self.register_buffer("real", torch.zeros(0, n_cls, dtype=torch.bool))  # K x C: computed from data
        self.register_buffer("owner", torch.full((n_cls,), -1, dtype=torch.long))  # session of each class
        self.setup_passes()
        self.session_classes = SessionClasses()
        self._build_optimizer()
        self.remember_initial_state()

    # --- subspaces ----------------------------------------------------------------------------------------------
    @property
    def num_subspaces(self) -> int:
        """Adapters so far (the one being trained included)."""
        return len(self.sets[0])

    def _add_adapter(self, session: int) -> None:
        """Session ``session``'s adapter in every block (seeded draw), the only trainable one."""
        g = torch.Generator().manual_seed(stable_seed(self.seed, "ease-adapter", session))
        for s in self.sets:
            s.add(g)
        self._trainable_adapter(session)

    def _trainable_adapter(self, index: Optional[int]) -> None:
        """Gradients on for adapter ``index`` only (None: every adapter frozen)."""
        for s in self.sets:
            for i, ad in enumerate(s.adapters):
                ad.requires_grad_(i == index)

    def adapter_parameters(self, index: int) -> List[nn.Parameter]:
        """The parameters of adapter ``index`` in every block."""
        return [p for s in self.sets for p in s.adapters[index].parameters()]

    def _reset_proxy_head(self, session: int) -> None:
        """A fresh proxy head: weights U(-1/sqrt D, 1/sqrt D) (seeded), sigma 1 (PILOT's new ``proxy_fc``)."""
        g = torch.Generator().manual_seed(stable_seed(self.seed, "ease-head", session))
        bound = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            w = torch.empty(self.train_weight.shape).uniform_(-bound, bound, generator=g)
            self.train_weight.copy_(w)
            self.train_sigma.fill_(1.0)

    def _build_optimizer(self) -> None:
        """SGD over the newest adapter and the proxy head (a new optimizer per session, as PILOT's ``_train``)."""
        params = self.adapter_parameters(self.num_subspaces - 1) + [self.train_weight, self.train_sigma]
        self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    @torch.no_grad()
    def subspace_features(self, x: Tensor, index: int) -> Tensor:
        """``phi_index(x)``: the frozen ViT's pooled feature through adapter ``index`` (eval mode), float32."""
        self.model.eval()
        set_active_adapter(self.sets, index)
        return penultimate_features(self.model, x).float()

    def features(self, x: Tensor) -> Tensor:
        """The concatenated feature over the subspaces with prototypes (N x K D)."""
        k = max(self.protos.shape[0], 1)
        return torch.cat([self.subspace_features(x, i) for i in range(k)], dim=1)

    # --- prediction ---------------------------------------------------------------------------------------------
    def logits(self, x: Tensor) -> Tensor:
        """The reweighted cosine ensemble over the subspaces with prototypes (zeros before the first session ends)."""
        k = self.protos.shape[0]
        if k == 0:
            return torch.zeros(x.shape[0], self.seen.num_classes, device=x.device)
        feats = [self.subspace_features(x, i) for i in range(k)]
        if not self.use_reweight:
            p = self.protos.transpose(0, 1).reshape(self.protos.shape[1], -1)
            return F.normalize(torch.cat(feats, dim=1), dim=1) @ F.normalize(p, dim=1).T
        cos = torch.stack([F.normalize(f, dim=1) @ F.normalize(self.protos[i], dim=1).T for i, f in enumerate(feats)])
        return reweighted_logits(cos, self.owner, self.alpha)

    # --- sessions -------------------------------------------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        super().segment_start(segment)
        self.session_classes.segment_start(segment)

    def begin_session(self, session: int) -> None:
        """A new adapter (the earlier ones frozen), a fresh proxy head and optimizer, the session's class mask."""
        super().begin_session(session)
        while self.num_subspaces <= session:
            self._add_adapter(self.num_subspaces)
        self._trainable_adapter(self.num_subspaces - 1)
        self._reset_proxy_head(session)
        self._build_optimizer()
        self.session_classes.begin(self.seen.num_classes, self.train_weight.device)

    def train_features(self, x: Tensor) -> Tensor:
        """The newest subspace's feature (the proxy head's input while training)."""
        set_active_adapter(self.sets, self.num_subspaces - 1)
        return penultimate_features(self.model, x)

    def _train_logits(self, x: Tensor) -> Tensor:
        """The proxy head over this session's classes only (PILOT's ``aux_targets`` over ``proxy_fc``)."""
        return mask_logits(super()._train_logits(x), self.session_classes.mask)

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """One SGD step of the newest adapter and the proxy head; returns the proxy logits before it."""
        if self.session_classes.mask is None:  # a resumed or hand-driven session without begin_session
            self.session_classes.mask = torch.zeros(self.seen.num_classes, dtype=torch.bool, device=y.device)
        self.session_classes.add(y)
        return self.adapt_step(x, y)

    def end_session(self, session: int) -> None:
        """Freeze the adapter; prototypes of the new classes in every subspace, then the complement."""
        self._trainable_adapter(None)
        x, y = self.store.items()
        self.store.clear()
        self.end_passes()
        self.session_classes = SessionClasses()
        k = self.num_subspaces
        c = self.seen.num_classes
        if self.protos.shape[0] < k:  # a new subspace: a zero block of prototypes
            grow = k - self.protos.shape[0]
            self.protos = torch.cat([self.protos, self.protos.new_zeros(grow, c, self.dim)])
            self.real = torch.cat([self.real, self.real.new_zeros(grow, c)])
        if y.numel() == 0:
            return
        new = torch.zeros(c, dtype=torch.bool, device=self.owner.device)
        new[y.to(new.device)] = True
        new &= self.owner < 0  # a class belongs to the first session that taught it
        self.owner[new] = session
        for i in range(k):
            mem = PrototypeMemory(c, self.dim).to(self.protos.device)
            step = self.feature_batch_size
            for b in range(0, x.shape[0], step):
                mem.update(self.subspace_features(x[b:b + step], i), y[b:b + step])
            self.protos[i, new] = mem.means()[new]
            self.real[i, new] = True
        self.protos = complement_prototypes(self.protos, self.real, self.owner, self.recalc_sim)
        log.info("ease: session %d, %d subspaces, %d classes", session, k, int((self.owner >= 0).sum()))

    # --- state --------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> List[nn.Parameter]:
        """The newest adapter and the proxy head (what a session trains)."""
        return self.adapter_parameters(self.num_subspaces - 1) + [self.train_weight, self.train_sigma]

    def extra(self) -> Any:
        return {**self.passes_state(), **self.session_classes.state()}

    def load_extra(self, state: Any) -> None:
        state = state or {}
        self.load_passes_state(state)
        self.session_classes.load_state(state, self.owner.device)

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Grow or shrink the adapters to the checkpoint's count first (the module keys must match)."""
        found = [int(m.group(1)) for key in state.get("module", {}) for m in [re.search(r"\.adapters\.(\d+)\.", key)]
                 if m]
        n = max(found) + 1 if found else 1
        for s in self.sets:
            s.set_count(n)
        self._build_optimizer()
        super().load_checkpoint_state(state)
        self._trainable_adapter(n - 1 if self.sessions.in_session or self.protos.shape[0] < n else None)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("protos", "real"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.owner.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["EASE", "complement_prototypes", "reweighted_logits"]
