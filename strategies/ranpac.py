"""RanPAC: a frozen pretrained backbone, a fixed random ReLU projection, and a ridge-regression head.

McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel; "RanPAC: Random Projections and Pre-trained Models for
Continual Learning" (NeurIPS 2023, arXiv 2307.02251). Reference for the numbers: LAMDA-PILOT
(sun-hailong/LAMDA-PILOT@2647455, ``models/ranpac.py`` ``Learner``: ``replace_fc``, ``setup_RP``,
``optimise_ridge_parameter``; ``utils/inc_net.py`` ``SimpleVitNet`` with ``backbone/linears.py`` ``CosineLinear``;
``exps/ranpac.json``); official code RanPAC/RanPAC@012927f (``RanPAC.py``, ``inc_net.py``), run side by side by
``benchmarks/ranpac_reference.py``.

Algorithm (per session t):

1. session 0 only, ``first_session: adapter``: train AdaptFormer-style adapters (bottleneck 64, ReLU, dropout 0.1,
   output scale 0.1, up-projection 0) beside each block's MLP, with a cosine head (sigma learnable) over the
   session's classes, SGD (momentum 0.9, weight decay 5e-4), cosine-annealed per epoch; then freeze the backbone
   (``common/first_session.py``, shared with APER).
   ``none``: the backbone is frozen from the start (PILOT with ``_init_train`` skipped; the official ``ncm`` rows).
2. session 0 end: draw ``W_rand`` (D x M, N(0, 1), seeded) once; ``M = 0``: no projection (``H = F``).
3. ``H = relu(F W_rand)`` of the session's training features (one pass, the stream's order);
   ``G += H^T H``, ``Q += H^T Y`` (one-hot Y) -- the statistics of ``common/lda.py``'s :class:`IncrementalLDA`,
   accumulated in the reference's matmul form (``update_dense``: bit-identical heads side by side).
4. lambda: among ``ridges`` (10^-8 .. 10^8), the one whose ridge fit on the first 80 % of the session's H has the
   least MSE on the last 20 % (:func:`select_ridge`); ``W = ((G + lambda I)^-1 Q)^T``.
5. logits: ``sigma cos(H, W_c)`` (``head: cosine``, PILOT's CosineLinear; sigma 1, or the first session's learned
   sigma after an adaptation, which PILOT's ``update_fc`` carries over) or ``H W^T`` (``linear``, the official
   RanPAC's ``use_RP`` head, whose sigma ``setup_RP`` resets to 1).

Memory: G is M x M (4 M^2 bytes in float32: 400 MB at M = 10000, 800 MB in float64), Q is M x C, W_rand D x M.
The session's features (N x D) are kept until the session ends (lambda is chosen on them). ``learn`` returns the
logits of the head solved at the previous session's end (zeros in a frozen session 0: no head exists yet).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import penultimate_features
from ctta.backbones.peft import freeze, peft_parameters
from ctta.hparams import Count, Momentum, NonNegative, NonNegInt, Positive, Unit
from ctta.seeding import stable_seed

from .base import register
from .common.first_session import FirstSessionTuning, add_ffn_adapters, penultimate_dim
from .common.incremental import IncrementalStrategy, num_outputs
from .common.lda import IncrementalLDA, select_ridge

log = logging.getLogger(__name__)

RIDGES = tuple(10.0 ** k for k in range(-8, 9))
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def projection_seed(seed: int) -> int:
    """The seed of ``W_rand``'s draw (``torch.randn(D, M)`` on the CPU from a generator seeded with it)."""
    return stable_seed(seed, "ranpac-projection")


@register
class RanPAC(FirstSessionTuning, IncrementalStrategy):
    """Random-projection ridge head on a (first-session adapted, then) frozen backbone. See the module docstring."""

    name = "ranpac"

    def __init__(self, model: nn.Module, M: NonNegInt = 10000, head: Literal["cosine", "linear"] = "cosine",
                 ridges: Optional[Sequence[Positive]] = None, fit_fraction: Unit = 0.8,
                 dtype: Literal["float32", "float64"] = "float32",
                 first_session: Literal["none", "adapter"] = "adapter", lr: Positive = 0.01,
                 momentum: Momentum = 0.9, weight_decay: NonNegative = 0.0005, min_lr: NonNegative = 0.0,
                 bottleneck: Count = 64, adapter_scale: Positive = 0.1, adapter_dropout: Unit = 0.1,
                 feature_batch_size: Count = 256, seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        self.M, self.head = int(M), head
        self.ridges = tuple(float(r) for r in (ridges if ridges is not None else RIDGES))
        self.fit_fraction = float(fit_fraction)
        self.first_session = first_session
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.feature_batch_size = int(feature_batch_size)
        n_cls = num_outputs(model)
        self.stats = IncrementalLDA(None, n_cls, dtype=DTYPES[dtype])  # G = second_moment, Q^T = class_sums
        self.register_buffer("W_rand", torch.zeros(0))
        self.register_buffer("weight", torch.zeros(0))  # C x M ridge head
        self.chosen: List[float] = []  # lambda per session
        self.setup_passes()
        self.adapting = first_session == "adapter"
        self.optimizer = None
        if self.adapting:
            params = add_ffn_adapters(self.model, int(bottleneck), float(adapter_scale), float(adapter_dropout))
            freeze(self.model, peft=True)
            dim = int(getattr(model, "feature_dim", 0) or penultimate_dim(self.model))
            self.setup_first_session(params, n_cls, dim, lr, momentum, weight_decay, min_lr)
        else:
            freeze(self.model)
        self.model.eval()
        self.remember_initial_state()

    # --- features and heads ------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Frozen backbone features (eval mode), float32."""
        self.model.eval()
        return penultimate_features(self.model, x).float()

    def project(self, f: Tensor) -> Tensor:
        """``H = relu(F W_rand)`` (``F`` itself when M = 0)."""
        return F.relu(f @ self.W_rand) if self.M > 0 else f

    def head_logits(self, f: Tensor) -> Tensor:
        """Cosine (PILOT) or linear (official) logits of the ridge head; zeros before the first session ends."""
        if self.weight.numel() == 0:
            return torch.zeros(f.shape[0], self.seen.num_classes, device=f.device)
        h = self.project(f)
        if self.head == "cosine":  # PILOT keeps the first session's learned sigma on the later heads
            sigma = self.train_sigma.detach() if self.first_session == "adapter" else 1.0
            return sigma * F.normalize(h, dim=1) @ F.normalize(self.weight, dim=1).T
        return h @ self.weight.T

    # --- sessions (logits / learn_batch: FirstSessionTuning's; first-pass features go to the store) -------------------
    def end_session(self, session: int) -> None:
        if self.adapting:
            self.freeze_backbone()
        f, y = self.store.items()
        self.store.clear()
        self.end_passes()
        if f.shape[0] == 0:
            return
        if self.M > 0 and self.W_rand.numel() == 0:
            g = torch.Generator().manual_seed(projection_seed(self.seed))
            self.W_rand = torch.randn(f.shape[1], self.M, generator=g).to(f.device)
        h = self.project(f).to(self.stats.dtype)
        targets = F.one_hot(y, self.seen.num_classes).to(h.dtype)
        self.stats.update_dense(h, targets)
        ridge, _ = select_ridge(h, targets, self.ridges, self.fit_fraction)
        self.chosen.append(ridge)
        log.info("ranpac: session %d, lambda = %g", session, ridge)
        self.weight = self.stats.ridge_weights(ridge).float()

    def freeze_backbone(self) -> None:
        """End of the first-session adaptation: freeze everything, and turn the kept images into features."""
        freeze(self.model)
        self.model.eval()
        self.adapting = False
        self.stored_images_to_features(self.feature_batch_size)

    # --- state --------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> List[nn.Parameter]:
        if not self.adapting:
            return []
        return peft_parameters(self.model) + [self.train_weight, self.train_sigma]

    def extra(self) -> Any:
        return {"adapting": self.adapting, "chosen": list(self.chosen), **self.passes_state()}

    def load_extra(self, state: Any) -> None:
        if not state:
            return
        self.chosen = list(state.get("chosen", []))
        self.load_passes_state(state)
        if self.first_session == "adapter":
            self.adapting = bool(state.get("adapting", False))
            freeze(self.model, peft=self.adapting)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("W_rand", "weight"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.stats.class_counts.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

