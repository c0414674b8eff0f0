"""SLCA (Slow Learner with Classifier Alignment): a slowly fine-tuned pretrained backbone, a fast head, an aligned head.

Zhang, Wang, Kang, Chen, Wei; "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained
Model" (ICCV 2023, arXiv 2303.05118). Official code GengDavid/SLCA@169d4e6 (``models/slca.py``, ``models/base.py``
``_compute_class_mean``, ``convs/linears.py`` ``SimpleContinualLinear``, ``exps/slca/slca_cifar.json``), the code of
the paper's numbers; LAMDA-PILOT sun-hailong/LAMDA-PILOT@2647455 (``models/slca.py``, ``utils/inc_net.py``
``SLCANet``, ``exps/slca.json``) is the same algorithm, run side by side by ``benchmarks/slca_reference.py``.
Where they differ the official values are the defaults: batch 128 (PILOT 64: a stream setting here) and 5 alignment
epochs (PILOT 3).

Algorithm (per session t, classes C_t):

1. Slow learner: SGD (momentum 0.9, weight decay 5e-4) on every weight, the backbone at ``lr * backbone_lr_scale``
   (0.01 * 1/100) and the head at ``lr`` (0.01), cross-entropy over the session's classes only (the reference's
   ``logits[:, known:]`` of a new per-task head); the rows of other classes are held (its old heads are frozen, its
   later ones do not exist yet); MultiStepLR(``milestones``, ``lr_decay``) over the session's epochs; a fresh
   optimiser state per session. ``backbone_lr_scale`` 0 freezes the backbone (its ``fix_bcb``).
2. Class statistics: after training, the features of the session's training images (eval mode, each image once)
   give each class of C_t a mean and a covariance + 1e-4 I (:class:`~strategies.common.gaussians.ClassGaussians`);
   older classes keep the statistics of their own session (never recomputed). The mean is taken in float64 (the
   references' ``np.mean`` of float32 features sums in float32: <= 5e-7 of the mean apart side by side).
3. Classifier alignment (t >= 1, ``ca_epochs`` > 0): starting from the trained head (rows of all seen classes),
   ``ca_epochs`` epochs of SGD (lr ``ca_lr``, momentum 0.9, weight decay 5e-4, cosine-annealed per epoch): each epoch
   draws ``ca_samples`` (256) features per seen class from N(s_c * mu_c, Sigma_c), with s_c = 1 - d + d (k_c + 1) /
   (t + 1) (d = ``mean_decay`` 0.1, k_c the class's session), shuffles them and takes one step per batch of
   ``ca_samples``; the loss is the cross-entropy of logits divided by (``logit_norm`` x the mean over sessions of
   the L2 norm of each session's logits) (``ca_with_logit_norm`` 0.1; 0: plain logits).
4. Prediction: the aligned head (the trained one before the first alignment). The next session trains from the
   unaligned head, as the reference restores it (``fc.recall()`` in ``after_task``).

The session's classes: the engine's train segment lists them (``meta["classes"]``); outside the engine, the labels
of the session's batches as they appear. Logits in training and alignment are computed per session head (its rows,
in learned order), as the reference's ``SimpleContinualLinear`` computes them (bit-identical side by side).

Head: one head of all classes, unseen ones masked (``strategies/common/incremental.py``); ``head_init: reset``
re-initialises it as the reference's new heads (trunc-normal std 0.02, bias 0; seeded), ``keep`` keeps the
backbone's. Random draws: each alignment uses its own generator seeded from (seed, session), sampling classes in the
order they were learned then ``randperm``, as the reference draws from its global generator.
Memory: the session's images until its end; C x D x D float32 covariances (236 MB at 100 classes of 768-d features).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import penultimate_features
from ctta.backbones.peft import freeze, head_parameter_names
from ctta.hparams import Count, Momentum, NonNegative, NonNegInt, Positive, Unit
from ctta.seeding import stable_seed

from .base import register
from .common.first_session import SessionPasses
from .common.gaussians import ClassGaussians
from .common.incremental import IncrementalStrategy, num_outputs
from .common.prototypes import feature_dim

log = logging.getLogger(__name__)


def alignment_seed(seed: int, session: int) -> int:
    """The seed of session ``session``'s alignment draws (features from the Gaussians, then the shuffle)."""
    return stable_seed(seed, "slca-ca", session)


@torch.no_grad()
def reset_head(weight: Tensor, bias: Optional[Tensor], seed: int) -> None:
    """The reference's new-head init (``trunc_normal_(std=.02)``, bias 0), from a seeded generator."""
    g = torch.Generator().manual_seed(stable_seed(seed, "slca-head"))
    w = torch.empty(weight.shape, dtype=weight.dtype)
    nn.init.trunc_normal_(w, std=0.02, generator=g)
    weight.copy_(w)
    if bias is not None:
        bias.zero_()


def session_logits(f: Tensor, weight: Tensor, bias: Optional[Tensor], sessions: Tensor) -> Tensor:
    """Logits of the rows ``weight`` (columns grouped by session, ``sessions`` the session of each row), one linear
    map per session as the reference's per-session heads (``SimpleContinualLinear``) compute them."""
    out = []
    for k in torch.unique_consecutive(sessions).tolist():
        rows = (sessions == k).nonzero().flatten()
        out.append(F.linear(f, weight[rows], bias[rows] if bias is not None else None))
    return torch.cat(out, dim=1)


def session_norm_logits(logits: Tensor, sessions: Tensor, temperature: float) -> Tensor:
    """SLCA's logit normalisation: ``logits / (mean_k ||logits[:, session k]|| + 1e-7) / temperature``, the norm
    taken per session over its classes' columns (``sessions``: the session of each column, columns grouped)."""
    norms = [torch.norm(logits[:, sessions == k], p=2, dim=-1, keepdim=True) + 1e-7
             for k in torch.unique_consecutive(sessions).tolist()]
    return torch.div(logits, torch.cat(norms, dim=-1).mean(dim=-1, keepdim=True)) / temperature


@register
class SLCA(SessionPasses, IncrementalStrategy):
    """Slow backbone / fast head fine-tuning per session, class Gaussians, classifier alignment on sampled features.
    See the module docstring."""

    name = "slca"

    def __init__(self, model: nn.Module, lr: Positive = 0.01, backbone_lr_scale: NonNegative = 0.01,
                 momentum: Momentum = 0.9, weight_decay: NonNegative = 5e-4,
                 milestones: Sequence[NonNegInt] = (18,), lr_decay: Positive = 0.1, ca_epochs: NonNegInt = 5,
                 ca_samples: Count = 256, ca_lr: Optional[Positive] = None, logit_norm: NonNegative = 0.1,
                 mean_decay: Unit = 0.1, cov_shrink: NonNegative = 1e-4,
                 head_init: Literal["reset", "keep"] = "reset", feature_batch_size: Count = 128,
                 seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        self.lr, self.scale = float(lr), float(backbone_lr_scale)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.milestones, self.lr_decay = sorted(int(m) for m in milestones), float(lr_decay)
        self.ca_epochs, self.ca_samples = int(ca_epochs), int(ca_samples)
        self.ca_lr = float(ca_lr) if ca_lr is not None else self.lr
        self.logit_norm, self.mean_decay = float(logit_norm), float(mean_decay)
        self.feature_batch_size = int(feature_batch_size)
        n_cls, dim = num_outputs(model), feature_dim(model)
        self.head_names = head_parameter_names(self.model)
        params = dict(self.model.named_parameters())
        self.head_weight = next(params[n] for n in self.head_names if params[n].dim() == 2)
        self.head_bias = next((params[n] for n in self.head_names if params[n].dim() == 1), None)
        if head_init == "reset":
            reset_head(self.head_weight, self.head_bias, seed)
        head = [p for p in (self.head_weight, self.head_bias) if p is not None]
        ids = {id(p) for p in head}
        groups = [{"params": head, "lr": self.lr}]
        if self.scale > 0:  # the slow learner; 0 = the reference's fix_bcb (frozen backbone)
            self.model.requires_grad_(True)
            groups.insert(0, {"params": [p for p in self.model.parameters() if id(p) not in ids],
                              "lr": self.lr * self.scale})
        else:
            freeze(self.model, except_=self.head_names)
        self.optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.stats = ClassGaussians(n_cls, dim, shrink=float(cov_shrink))
        self.register_buffer("class_session", torch.full((n_cls,), -1, dtype=torch.long))
        self.register_buffer("aligned_weight", torch.zeros(0))  # the head after the last alignment (C x D)
        self.register_buffer("aligned_bias", torch.zeros(0))
        self.class_order: List[int] = []  # classes in the order they were learned (the reference's head columns)
        self.setup_passes()  # ``store``: the session's images, one pass (for the statistics at its end)
        self._session_classes: List[int] = []
        self._segment_classes: Optional[List[int]] = None
        self.model.eval()
        self.remember_initial_state()

    # --- heads ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Penultimate features in eval mode."""
        self.model.eval()
        return penultimate_features(self.model, x)

    def head_logits(self, f: Tensor) -> Tensor:
        """Logits of the aligned head (after the first alignment), else of the trained one."""
        if self.aligned_weight.numel():
            return F.linear(f, self.aligned_weight, self.aligned_bias if self.aligned_bias.numel() else None)
        return F.linear(f, self.head_weight, self.head_bias)

    def logits(self, x: Tensor) -> Tensor:
        return self.head_logits(self.features(x))

    # --- sessions ------------------------------------------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        super().segment_start(segment)  # the session's passes
        if getattr(segment, "kind", None) == "train":
            classes = (getattr(segment, "meta", None) or {}).get("classes")
            self._segment_classes = [int(c) for c in classes] if classes is not None else None

    def begin_session(self, session: int) -> None:
        self.optimizer.state.clear()  # a new optimiser per session, as the reference
        super().begin_session(session)
        self._session_classes = [c for c in (self._segment_classes or []) if c not in self.class_order]

    def epoch_lr(self, epoch: int) -> None:
        """MultiStepLR: every group at its base lr times ``lr_decay`` per milestone reached by ``epoch``."""
        factor = self.lr_decay ** sum(1 for m in self.milestones if m <= epoch)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        epoch = self._done // self._pass if self._pass else 0
        first = self._first_pass(int(x.shape[0]))
        self.store.add(x[first], y[first])
        for c in torch.unique(y).tolist():  # classes met outside the engine's segment list join the session
            if c not in self._session_classes and c not in self.class_order:
                self._session_classes.append(c)
        idx = torch.tensor(self._session_classes, device=y.device)
        pos = torch.full((self.seen.num_classes,), -100, dtype=torch.long, device=y.device)
        pos[idx] = torch.arange(len(idx), device=y.device)
        self.epoch_lr(epoch)
        self.model.train()
        held = [(p, p.detach().clone()) for p in (self.head_weight, self.head_bias) if p is not None]
        with torch.enable_grad():
            f = penultimate_features(self.model, x)
            with torch.no_grad():
                full = F.linear(f, self.head_weight, self.head_bias)
            bias = self.head_bias[idx] if self.head_bias is not None else None
            # the session's classes only: the reference's new head, logits[:, known:] (its rows, in class order)
            F.cross_entropy(F.linear(f, self.head_weight[idx], bias), pos[y]).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self._hold_rows(held, idx)
        return self.mask(full.detach())

    @torch.no_grad()
    def _hold_rows(self, held: List[Any], idx: Tensor) -> None:
        """Put back the head rows of classes outside the session (weight decay moved them) and zero their momentum."""
        other = torch.ones(self.seen.num_classes, dtype=torch.bool, device=idx.device)
        other[idx] = False
        for p, before in held:
            p[other] = before[other]
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf[other] = 0

    def end_session(self, session: int) -> None:
        x, y = self.store.items()
        self.store.clear()
        self.end_passes()
        self._segment_classes = None
        new = list(self._session_classes)
        self._session_classes = []
        if not new:
            return
        self.class_order += new
        self.class_session[torch.tensor(new, device=self.class_session.device)] = session
        feats = [self.features(x[i:i + self.feature_batch_size]) for i in range(0, x.shape[0], self.feature_batch_size)]
        self.stats.fit(torch.cat(feats), y)
        if session > 0 and self.ca_epochs > 0:
            self.align(session)

    # --- classifier alignment ----------------------------------------------------------------------------------------
    def align(self, session: int) -> None:
        """Train a copy of the head's seen rows on features sampled from the class Gaussians (module docstring, 3)."""
        dev = self.head_weight.device
        idx = torch.tensor(self.class_order, device=dev)
        sessions = self.class_session[idx]
        w = nn.Parameter(self.head_weight.detach()[idx].clone())
        b = nn.Parameter(self.head_bias.detach()[idx].clone()) if self.head_bias is not None else None
        opt = torch.optim.SGD([{"params": [p for p in (w, b) if p is not None], "lr": self.ca_lr,
                                "weight_decay": self.weight_decay}], lr=self.ca_lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.ca_epochs)
        g = torch.Generator(device=self.stats.covs.device).manual_seed(alignment_seed(self.seed, session))
        n, k = self.ca_samples, len(self.class_order)
        scales = [(1.0 - self.mean_decay) + (int(s) + 1) / (session + 1) * self.mean_decay for s in sessions.tolist()]
        labels = torch.arange(k, device=dev).repeat_interleave(n)
        with torch.enable_grad():
            for _ in range(self.ca_epochs):
                data = torch.cat([self.stats.sample(c, n, g, s) for c, s in zip(self.class_order, scales)]).to(dev)
                perm = torch.randperm(data.shape[0], generator=g, device=g.device).to(dev)
                data, targets = data[perm], labels[perm]
                for i in range(k):
                    logits = session_logits(data[i * n:(i + 1) * n], w, b, sessions)
                    if self.logit_norm > 0:
                        logits = session_norm_logits(logits, sessions, self.logit_norm)
                    loss = F.cross_entropy(logits, targets[i * n:(i + 1) * n])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                sched.step()
        with torch.no_grad():
            self.aligned_weight = self.head_weight.detach().clone()
            self.aligned_weight[idx] = w.detach()
            if b is not None:
                self.aligned_bias = self.head_bias.detach().clone()
                self.aligned_bias[idx] = b.detach()
        log.info("slca: session %d aligned on %d classes, last loss %.4f", session, k, float(loss.detach()))

    # --- state ------------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def extra(self) -> Any:
        return {"class_order": list(self.class_order), **self.passes_state(),
                "session_classes": list(self._session_classes), "segment_classes": self._segment_classes}

    def load_extra(self, state: Any) -> None:
        state = state or {}
        self.class_order = [int(c) for c in state.get("class_order", [])]
        self.load_passes_state(state)
        self._session_classes = [int(c) for c in state.get("session_classes", [])]
        self._segment_classes = state.get("segment_classes")

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("aligned_weight", "aligned_bias"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.class_session.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["SLCA", "alignment_seed", "session_logits", "session_norm_logits"]
