"""iCaRL: Incremental Classifier and Representation Learning.

Rebuffi, Kolesnikov, Sperl, Lampert, "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017
(arXiv 1611.07725). Reference code: github.com/aimagelab/mammoth@e75a491 (``models/icarl.py`` ``ICarl``,
``utils/buffer.py`` ``fill_buffer`` (herding) and ``icarl_replay``); hyperparameters from its ``utils/best_args.py``
(seq-cifar10, buffer 200 / 500) and ``ICarl.get_parser``, see ``configs/strategies/icarl.yaml``.

The algorithm (the paper's Alg. 2-5), per session with new classes ``s..t`` and exemplar sets ``P`` of the old ones:

1. training (Alg. 3): on the session's data together with the exemplars, SGD on the sigmoid binary cross-entropy
   over every output, targets one-hot ``y`` except on the old classes, where they are the previous model's sigmoid
   outputs ``sigma(f_prev(x))`` (distillation); plus ``l2 * sum_w w^2`` (Mammoth's own weight decay);
2. ``m = buffer_size // seen classes``; each old class keeps its first ``m`` exemplars (Alg. 5);
3. each new class gets ``m`` exemplars chosen by herding on its L2-normalised features (Alg. 4), eval mode;
4. prediction (Alg. 1): nearest mean of exemplars, ``argmin_c || phi(x) - mu_c ||`` with ``phi`` normalised and
   ``mu_c`` the normalised mean of the class's normalised exemplar features, averaged with those of the horizontally
   flipped exemplars (as Mammoth's ``compute_class_means``).

The previous model is LwF's frozen copy (``strategies/lwf.py``: the weights as the last session left them, eval
mode). How the exemplars join training: Mammoth merges them into the task's dataset and shuffles the union; this
engine streams the session's batches, so each incoming batch is extended with the next slice of a shuffled
permutation of the exemplars, slices sized so that every exemplar is seen once per epoch (the batch at samples
``[p, p + b)`` of the epoch takes ``floor((p + b) M / n) - floor(p M / n)`` of the ``M`` exemplars, ``n`` the
epoch's samples, from ``segment_start``; without a segment, ``min(M, b)`` per batch). Same images and passes,
larger batches and fewer steps than the reference's merged loader; the effect is measured in benchmarks/RESULTS.md
("iCaRL against Mammoth"). The herding runs over the session's incoming images of the first epoch, kept until the
session ends. No augmentation (the reference crops and flips); before the first session ends the head predicts.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import UnsupportedError
from ctta.hparams import Count, Momentum, NonNegative, Positive

from .base import register
from .common.exemplars import ExemplarSet, herding_order
from .common.incremental import mask_logits
from .common.prototypes import feature_dim, nearest_mean_logits
from .common.replay import GrowingStore
from .lwf import LwF


@register
class ICaRL(LwF):
    """Exemplars by herding, sigmoid BCE with distillation towards the previous model, nearest-mean-of-exemplars."""

    name = "icarl"

    def __init__(self, model: nn.Module, lr: Positive = 0.1, momentum: Momentum = 0.0, l2: NonNegative = 1e-5,
                 buffer_size: Count = 200, flip_means: bool = True, mask_unseen: bool = True, seed: int = 0) -> None:
        if not hasattr(model, "forward_features"):
            raise UnsupportedError(f"icarl: the nearest-mean classifier needs forward_features; "
                                   f"{type(model).__name__} has not")
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=0.0, alpha=0.0, temperature=1.0,
                         warmup=False, mask_unseen=mask_unseen, seed=seed)
        self.l2 = float(l2)
        self.buffer_size = int(buffer_size)
        self.flip_means = bool(flip_means)
        self.exemplars = ExemplarSet()
        self.session_data = GrowingStore()  # the session's incoming images (first epoch), for herding
        self.register_buffer("means", torch.zeros(self.seen.num_classes, feature_dim(model)))
        self.register_buffer("has_mean", torch.zeros(self.seen.num_classes, dtype=torch.bool))
        self.epoch_samples = 0  # incoming samples per epoch of the session (0: unknown)
        self.position = 0  # incoming samples seen this session
        self.batch_size = 0
        self._queue: Optional[Tensor] = None  # exemplar indices still to replay this epoch
        self.remember_initial_state()

    # --- session boundaries ---------------------------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        """A ``train`` segment says how many incoming samples an epoch has (to spread the exemplars over it)."""
        if getattr(segment, "kind", None) == "train":
            epochs = int((getattr(segment, "meta", None) or {}).get("epochs", 1) or 1)
            self.epoch_samples = int(segment.num_samples) // epochs

    def begin_session(self, session: int) -> None:
        """LwF's: a fresh SGD and, after the first session, the frozen previous model; then an empty session store."""
        super().begin_session(session)
        self.session_data.clear()
        self.position, self._queue = 0, None

    def end_session(self, session: int) -> None:
        """Cut the old classes to ``m`` exemplars, herd ``m`` of each new class, recompute the class means."""
        x, y = self.session_data.items()
        if len(x) == 0:
            return
        per_class = self.buffer_size // max(self.seen.count(), 1)
        feats = self.features(x)
        self.exemplars.reduce(per_class)
        for c in torch.unique(y):
            idx = (y == c).nonzero().squeeze(1)
            pick = idx[herding_order(feats[idx], per_class)]
            self.exemplars.add(x[pick], y[pick])
        self.session_data.clear()
        self.epoch_samples = 0
        self.compute_means()

    # --- exemplars and class means --------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """L2-normalised features of ``x`` in eval mode, in batches of the session's batch size."""
        self.model.eval()
        bs = self.batch_size or len(x)
        f = torch.cat([self.model.forward_features(x[i:i + bs]).flatten(1) for i in range(0, len(x), bs)])
        return f / f.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def compute_means(self) -> None:
        """Per class: the normalised mean of its exemplars' normalised features (and of their flips, averaged)."""
        ex, ey = self.exemplars.items()
        self.means.zero_()
        self.has_mean.zero_()
        for c in torch.unique(ey):
            xc = ex[ey == c]
            mu = self.features(xc).mean(0)
            if self.flip_means:
                mu = (mu + self.features(xc.flip(-1)).mean(0)) / 2
            self.means[c] = mu / mu.norm()
            self.has_mean[c] = True

    def logits(self, x: Tensor) -> Tensor:
        """Nearest-mean-of-exemplars scores (classes without exemplars at -inf); the head before any exemplars."""
        self.model.eval()
        if not bool(self.has_mean.any()):
            return self.model(x)
        return mask_logits(nearest_mean_logits(self.model.forward_features(x), self.means), self.has_mean)

    # --- training -------------------------------------------------------------------------------------------
    def exemplar_slice(self, b: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        """The exemplars that join an incoming batch of ``b`` samples (the next slice of a shuffled permutation)."""
        ex, ey = self.exemplars.items()
        m = len(ey)
        if m == 0:
            return ex, ey
        if self.epoch_samples > 0:
            p, n = self.position, self.epoch_samples
            count = (p + b) * m // n - p * m // n
        else:
            count = min(m, b)
        gen = self.generator(device)
        queue = self._queue if self._queue is not None else ey.new_empty(0)
        while len(queue) < count:
            queue = torch.cat([queue, torch.randperm(m, device=ey.device, generator=gen)])
        take, self._queue = queue[:count], queue[count:]
        return ex[take], ey[take]

    def training_batch(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """The incoming batch extended with its exemplar slice; the incoming images of the first epoch are kept."""
        b = int(x.shape[0])
        self.batch_size = max(self.batch_size, b)
        room = (self.epoch_samples - self.position) if self.epoch_samples > 0 else b
        if room > 0:
            self.session_data.add(x[:room], y[:room])
        ex, ey = self.exemplar_slice(b, x.device)
        self.position += b
        return torch.cat([x, ex.to(x.dtype)]), torch.cat([y, ey.to(y.device)])

    def l2_penalty(self) -> Tensor:
        """``sum_w w^2`` over every weight (Mammoth's ``ICarl.wd``)."""
        loss = 0
        for p in self.model.parameters():
            loss += p.pow(2).sum()
        return loss

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """One SGD step on the BCE with distillation over the extended batch; returns the incoming rows' logits."""
        xb, yb = self.training_batch(x, y)
        idx = self.old_index()
        target = F.one_hot(yb, self.seen.num_classes).float()
        if idx is not None:
            self.teacher.eval()
            with torch.no_grad():
                target[:, idx] = torch.sigmoid(self.teacher(xb))[:, idx]
        self.model.train()
        with torch.enable_grad():
            z = self.model(xb)
            loss = F.binary_cross_entropy_with_logits(z, target.to(z.dtype))
            if self.l2:
                loss = loss + self.l2_penalty() * self.l2
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return self.mask(z[:len(x)].detach())

    # --- state ----------------------------------------------------------------------------------------------
    def extra(self) -> Any:
        if not hasattr(self, "exemplars"):  # LwF's __init__ records its state before ours exists
            return None
        return {"exemplars": self.exemplars.state(), "session_data": self.session_data.state(),
                "epoch_samples": self.epoch_samples, "position": self.position, "batch_size": self.batch_size,
                "queue": None if self._queue is None else self._queue.clone()}

    def load_extra(self, state: Any) -> None:
        if state:
            self.exemplars.load_state(state.get("exemplars"))
            self.session_data.load_state(state.get("session_data"))
            self.epoch_samples = int(state.get("epoch_samples", 0))
            self.position = int(state.get("position", 0))
            self.batch_size = int(state.get("batch_size", 0))
            self._queue = state.get("queue")
