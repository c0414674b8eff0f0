"""Mamba-FSCIL: a dual selective state-space projector between a backbone and a fixed simplex-ETF classifier.

Li, Yang, Wu, Tao, Lin, Chen; "Mamba-FSCIL: Dynamic Adaptation with Selective State Space Model for Few-Shot
Class-Incremental Learning" (arXiv 2407.06136; code: github.com/xiaojieli0903/Mamba-FSCIL, ``MambaNeck`` and
``ImageClassifierCIL``). Features -> ``residual + base branch + novel branch`` -> L2 norm -> fixed simplex ETF.

* Base session: backbone, base branch and residual projection trained with the dot-regression (DR) loss towards the
  ETF vectors; the novel branch does not exist yet (its SSM gate rows are zero, so it outputs exactly zero).
* Base prototypes (``base_protos``): ``final`` (official ``get_training_memory``) recomputes each base class's mean
  feature with the final backbone once the base session ends, from the session's inputs kept until then (views of
  the batches the stream gave, its first epoch only when the stream says how many epochs it repeats; nothing is kept
  when the backbone is not trained, since the running means are then already the final backbone's); ``running``
  keeps the running means (EMA ``proto_ema`` while the backbone trains), with no inputs kept.
* Incremental sessions: backbone and base branch frozen; the few-shot samples' backbone features are kept once each
  (a stream repeating the session over several epochs adds each sample once: the official code extracts the session's
  features once, ``get_inc_memory``, and then trains ``step_list`` steps on them), and at the end of the session (the
  first prediction after it) the novel branch alone is trained for ``inc_steps`` steps on them plus one mean feature
  per base class and per earlier novel class (the official ``mean_neck_feat`` memory), reshuffled after each pass
  with the incomplete last batch dropped (the official loader: shuffle, ``drop_last``), at the official schedule
  (warm-up, cosine, ``inc_cooldown`` last steps at 0.001 lr; :meth:`MambaFSCIL._lr_at`), with the DR loss
  (class-balanced target lengths, feature mixup) and the class-sensitive selective-scan losses: suppression (the
  novel branch's gate ``z`` pushed to zero on base classes, slightly away from zero on novel ones) and separation
  (the batch-mean input-dependent scan parameters delta, B, C of base and novel samples decorrelated).
* Per-GPU scale (``loss_chunk``): the official code computes the class-sensitive losses on each GPU's 8 samples
  (``samples_per_gpu=8`` x 8 GPUs = 64) and DDP averages the gradients; here each batch is cut into chunks of
  ``loss_chunk`` samples, each loss computed per chunk and averaged over the chunks, and a loss is skipped for the
  whole batch when a chunk lacks the samples it needs (the official ``all_reduce(MIN)`` of the base / novel counts).
  ``||z|| / numel(z)`` on one batch of 64 is ``sqrt(8 / 64)`` ~ 0.35x the per-GPU value (tested).

Tokens (``tokens``): ``map`` (as the official ``MambaNeck``) takes the backbone's last feature map
(:func:`ctta.backbones.classifier.feature_map`), average-pools it to ``grid`` x ``grid`` (the official CIFAR /
miniImageNet ResNet-12 gives 2x2 natively; ResNet-20 gives 8x8, pooled here to 2x2), projects every position with
1x1 conv - LayerNorm over (channels, grid) - LeakyReLU - 1x1 conv, adds a positional embedding and scans the
``grid**2`` tokens in the official four directions (rows forwards and backwards, columns forwards and backwards, one
shared SSM per branch), sums the four outputs and averages them over positions; the residual is the mean of the
pooled map. ``pooled`` (fallback for backbones without a map) has each branch's MLP map the pooled feature to
``num_tokens`` tokens, scanned forwards and backwards. ``auto``: ``map`` when the backbone gives one.

Gate sum (``gate_flip``): the suppression loss's ``z`` is the sum of the four scans' gates; ``channels`` (default)
does as the official code, whose ``C_hf.flip([1])`` on a (batch, channels, tokens) gate reverses the backward gates'
channels (likely unintended, but it decides how strong the suppression is: with ``tokens``, the gates realigned
along their tokens, the suppression silences the novel branch on digits_fscil, benchmarks/RESULTS.md "Mamba-FSCIL
against the official code"). Remaining deviations: the scan parameters for the separation loss come from the first (row-forward) direction, as in the official
code; the stored few-shot features and class means are the ``grid`` x ``grid`` pooled maps, not the full maps.
Feature mixup (the mix partner and the coin flip) is drawn over the whole batch (official: per GPU). The final
base prototypes are means over the base inputs as the stream gave them (official: the train set through the
test pipeline, i.e. without augmentation; here the stream's load-time transform, if any, is in them).
``inc_grad_clip`` is the official (unused, None) ``grad_clip`` hook. Scale note: the suppression term is
``||z|| / numel(z)`` per chunk, so its pull grows as widths (and the samples per chunk) shrink; at ResNet-20 width
(64) the official weight 100 at lr 0.25 diverges (NaN) and, clipped, silences the novel branch (benchmarks/RESULTS.md,
"Mamba-FSCIL", measured with the former whole-batch term, ~0.35x the per-chunk one).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import feature_map, has_feature_map, penultimate_features
from ctta.errors import ConfigError, UnsupportedError
from ctta.hparams import Count, Momentum, NonNegative, NonNegInt, Positive, Unit
from ctta.seeding import stable_seed

from .base import register
from .common.etf import ETFClassifier, balance_scales, dot_regression_loss
from .common.incremental import IncrementalStrategy, num_outputs
from .common.prototypes import feature_dim
from .common.selective_scan import SelectiveSSM

log = logging.getLogger(__name__)

class SSMBranch(nn.Module):
    """One branch: MLP (Linear-LayerNorm-LeakyReLU-Linear) from the pooled feature to ``num_tokens`` tokens plus a
    positional embedding, a selective SSM scanned forwards and backwards, mean over tokens."""

    def __init__(self, in_dim: int, out_dim: int, mid_dim: int, num_tokens: int, gate_flip: str = "channels",
                 **ssm: Any) -> None:
        super().__init__()
        self.num_tokens, self.out_dim, self.gate_axis = int(num_tokens), int(out_dim), _gate_axis(gate_flip)
        self.mlp = nn.Sequential(nn.Linear(in_dim, mid_dim), nn.LayerNorm(mid_dim), nn.LeakyReLU(0.1),
                                 nn.Linear(mid_dim, self.num_tokens * self.out_dim, bias=False))
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, self.num_tokens, self.out_dim), std=0.02))
        self.ssm = SelectiveSSM(self.out_dim, **ssm)

    def forward(self, f: Tensor):
        tokens = self.mlp(f).view(f.shape[0], self.num_tokens, self.out_dim) + self.pos_embed
        y_fwd, z_fwd, params = self.ssm(tokens)
        y_bwd, z_bwd, _ = self.ssm(tokens.flip(1))
        y = y_fwd + y_bwd.flip(1)
        z = z_fwd + z_bwd.flip(self.gate_axis)
        return y.mean(dim=1), z, params


def _gate_axis(gate_flip: str) -> int:
    """The axis along which a backward scan's gate (batch, channels, tokens) is flipped before the sum: ``channels``
    reverses its channels (what the official code's ``flip([1])`` does), ``tokens`` realigns its tokens."""
    return -1 if gate_flip == "tokens" else 1


def _transpose_tokens(t: Tensor, grid: int, dim: int) -> Tensor:
    """Row-major <-> column-major order of ``grid x grid`` tokens along ``dim`` (its own inverse on a square)."""
    shape = t.shape
    t = t.unflatten(dim, (grid, grid)).transpose(dim, dim + 1)
    return t.reshape(shape)


class MapSSMBranch(nn.Module):
    """One branch of the official ``MambaNeck`` on a ``grid x grid`` feature map: per-position projection (1x1 conv -
    LayerNorm over (channels, grid, grid) - LeakyReLU(0.1) - 1x1 conv) + positional embedding, one selective SSM
    scanned over rows forwards/backwards and columns forwards/backwards, the four outputs summed, mean over tokens."""

    def __init__(self, in_dim: int, out_dim: int, mid_dim: int, grid: int, gate_flip: str = "channels",
                 **ssm: Any) -> None:
        super().__init__()
        self.grid, self.out_dim, self.gate_axis = int(grid), int(out_dim), _gate_axis(gate_flip)
        self.proj = nn.Sequential(nn.Conv2d(in_dim, mid_dim, 1, bias=True), nn.LayerNorm([mid_dim, grid, grid]),
                                  nn.LeakyReLU(0.1), nn.Conv2d(mid_dim, self.out_dim, 1, bias=False))
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, grid * grid, self.out_dim), std=0.02))
        self.ssm = SelectiveSSM(self.out_dim, **ssm)

    def forward(self, m: Tensor):
        g = self.grid
        tokens = self.proj(m).flatten(2).transpose(1, 2) + self.pos_embed          # (b, g*g, out), row-major
        cols = _transpose_tokens(tokens, g, 1)                                     # column-major
        y_h, z_h, params = self.ssm(tokens)
        y_hf, z_hf, _ = self.ssm(tokens.flip(1))
        y_v, z_v, _ = self.ssm(cols)
        y_vf, z_vf, _ = self.ssm(cols.flip(1))
        y = y_h + y_hf.flip(1) + _transpose_tokens(y_v + y_vf.flip(1), g, 1)
        z = z_h + z_hf.flip(self.gate_axis) + _transpose_tokens(z_v + z_vf.flip(self.gate_axis), g, 2)
        return y.mean(dim=1), z, params


class DualSelectiveProjector(nn.Module):
    """``out = residual(f) + base(f) + novel(f)``; the novel branch's gate is zero-initialised (exact zero output).
    With ``grid`` set the input is a ``grid x grid`` feature map (branches :class:`MapSSMBranch`, residual of its
    mean), otherwise a pooled feature vector (branches :class:`SSMBranch`)."""

    def __init__(self, in_dim: int, out_dim: int, mid_dim: int, num_tokens: int, grid: Optional[int] = None,
                 gate_flip: str = "channels", **ssm: Any) -> None:
        super().__init__()
        self.grid = grid
        self.residual_proj = nn.Linear(in_dim, out_dim, bias=False) if out_dim != in_dim else nn.Identity()
        if grid:
            self.base: nn.Module = MapSSMBranch(in_dim, out_dim, mid_dim, grid, gate_flip, **ssm)
            self.novel: nn.Module = MapSSMBranch(in_dim, out_dim, mid_dim, grid, gate_flip, **ssm)
        else:
            self.base = SSMBranch(in_dim, out_dim, mid_dim, num_tokens, gate_flip, **ssm)
            self.novel = SSMBranch(in_dim, out_dim, mid_dim, num_tokens, gate_flip, **ssm)
        self.novel.ssm.zero_gate()

    def forward(self, f: Tensor, use_novel: bool = True) -> Dict[str, Any]:
        base, _, params = self.base(f)
        out = self.residual_proj(f.mean(dim=(2, 3)) if self.grid else f) + base
        parts: Dict[str, Any] = {"base": base, "params_base": params}
        if use_novel:
            novel, z, params_novel = self.novel(f)
            out = out + novel
            parts.update(novel=novel, z_novel=z, params_novel=params_novel)
        parts["out"] = out
        return parts


def _chunked(t: Tensor, rows: Tensor, chunk: int):
    """``t`` (batch, ...) times the 0/1 row weights ``rows``, zero-padded to a multiple of ``chunk`` and viewed as
    (chunks, chunk, ...); also the weights as (chunks, chunk)."""
    n = t.shape[0]
    pad = -n % chunk
    w = rows.to(t.dtype)
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        w = torch.cat([w, w.new_zeros(pad)])
    w = w.view(-1, chunk)
    return t.view(w.shape[0], chunk, *t.shape[1:]) * w.view(*w.shape, *([1] * (t.dim() - 1))), w


def suppression_term(z: Tensor, rows: Tensor, chunk: int) -> Tensor:
    """The official ``||z[rows]||_F / numel(z[rows])`` computed on each chunk of ``chunk`` samples (each GPU's batch)
    and averaged over the chunks (DDP's gradient mean); 0 unless every chunk holds a selected row (the official
    ``all_reduce(MIN)`` of the counts). No boolean indexing, no host sync. ``chunk`` >= the batch: one whole-batch
    term."""
    zc, w = _chunked(z, rows, chunk)
    per_row = z.shape[1:].numel()
    count = w.sum(dim=1)
    term = torch.linalg.vector_norm(zc.flatten(1), dim=1) / (count * per_row).clamp_min(1)
    return term.mean() * (count > 0).all().to(z.dtype)


def separation_loss(param: Tensor, is_base: Tensor, chunk: Optional[int] = None) -> Tensor:
    """Mean of ``|I - S|`` for the cosine-similarity matrix S of the base-sample and novel-sample means of a scan
    parameter (batch, k, L) averaged over batch and sequence (the official ``param_avg_dim='0-1-3'``), computed on
    each chunk of ``chunk`` samples (default: the whole batch) and averaged over the chunks; 0 unless every chunk
    holds both base and novel samples (the official gate)."""
    chunk = chunk or param.shape[0]
    pb, wb = _chunked(param, is_base, chunk)
    pn, wn = _chunked(param, ~is_base, chunk)
    length = param.shape[-1]
    base = pb.sum(dim=(1, 3)) / (wb.sum(dim=1, keepdim=True) * length).clamp_min(1)
    novel = pn.sum(dim=(1, 3)) / (wn.sum(dim=1, keepdim=True) * length).clamp_min(1)
    v = F.normalize(torch.stack([base, novel], dim=1), dim=-1)                      # (chunks, 2, k)
    per_chunk = torch.abs(torch.eye(2, device=param.device) - v @ v.transpose(1, 2)).mean(dim=(1, 2))
    both = ((wb.sum(dim=1) > 0) & (wn.sum(dim=1) > 0)).all().to(param.dtype)
    return per_chunk.mean() * both


@register
class MambaFSCIL(IncrementalStrategy):
    """Dual selective SSM projector + fixed ETF classifier; see the module docstring for the session schedule."""

    name = "mamba_fscil"
    settings = frozenset({"few_shot_class_incremental", "class_incremental"})

    def __init__(self, model: nn.Module, lr: Positive = 0.015625, momentum: Momentum = 0.9,
                 weight_decay: NonNegative = 5e-4, dr_weight: NonNegative = 10.0, train_backbone: bool = True,
                 num_tokens: Count = 4, out_dim: Optional[Count] = None, mid_dim: Optional[Count] = None,
                 d_state: Count = 256, dt_rank: Optional[Count] = None, d_conv: Count = 4, expand: Positive = 1.0,
                 inc_lr: Positive = 0.25, inc_steps: Count = 200, inc_batch_size: Count = 64, inc_warmup: NonNegInt = 5,
                 inc_cooldown: NonNegInt = 5, gate_flip: Literal["channels", "tokens"] = "channels",
                 feature_mixup: Unit = 0.5, mixup_prob: Unit = 0.75, balanced_targets: bool = True,
                 supp_weight: NonNegative = 100.0, supp_novel_weight: NonNegative = 1e-5,
                 sep_weight: NonNegative = 1e-3, loss_chunk: Count = 8, proto_ema: Unit = 0.01,
                 base_protos: Literal["final", "running"] = "final",
                 backend: Literal["auto", "torch", "mamba"] = "auto",
                 tokens: Literal["auto", "map", "pooled"] = "auto", grid: Count = 2,
                 inc_grad_clip: Optional[Positive] = None, seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        if tokens == "map" and not has_feature_map(model):
            raise UnsupportedError(f"tokens='map' needs a backbone with a feature map (forward_feature_map); "
                                   f"{type(model).__name__} has none: use tokens='pooled'")
        self.tokens = "map" if tokens == "map" or (tokens == "auto" and has_feature_map(model)) else "pooled"
        k, d = num_outputs(model), feature_dim(model)
        out_dim = int(out_dim) if out_dim else max(d, k)
        if out_dim < k:
            raise ConfigError(f"out_dim must be >= the {k} classes (the ETF needs one direction per class), "
                              f"got {out_dim}")
        self.num_classes, self.feat_dim = k, d
        self.train_backbone = bool(train_backbone)
        self.lr, self.momentum, self.weight_decay, self.dr_weight = lr, momentum, weight_decay, dr_weight
        self.inc_lr, self.inc_steps, self.inc_batch_size, self.inc_warmup = inc_lr, int(inc_steps), inc_batch_size, \
            int(inc_warmup)
        self.inc_cooldown = int(inc_cooldown)
        self.feature_mixup, self.mixup_prob, self.balanced_targets = feature_mixup, mixup_prob, bool(balanced_targets)
        self.supp_weight, self.supp_novel_weight, self.sep_weight = supp_weight, supp_novel_weight, sep_weight
        self.loss_chunk = int(loss_chunk)
        self.proto_ema, self.base_protos = float(proto_ema), base_protos
        self.inc_grad_clip = inc_grad_clip
        self.grid = int(grid) if self.tokens == "map" else None
        with torch.random.fork_rng(devices=[]):  # the projector and ETF depend on the seed only
            torch.manual_seed(stable_seed(seed, "mamba_fscil"))
            self.projector = DualSelectiveProjector(d, out_dim, int(mid_dim) if mid_dim else 2 * d, num_tokens,
                                                    grid=self.grid, gate_flip=gate_flip, d_state=d_state, dt_rank=dt_rank or d_state,
                                                    d_conv=d_conv, expand=expand, backend=backend)
            self.head = ETFClassifier(out_dim, k, torch.Generator().manual_seed(stable_seed(seed, "etf")))
        feat_shape = (d, self.grid, self.grid) if self.grid else (d,)  # what _features gives per sample
        self.register_buffer("class_means", torch.zeros(k, *feat_shape))
        self.register_buffer("class_counts", torch.zeros(k))
        self.register_buffer("base_mask", torch.zeros(k, dtype=torch.bool))
        self._pending: List[tuple] = []
        self._base_inputs: List[tuple] = []  # base_protos='final': the base session's (x, y), until it ends
        self._epoch_samples: Optional[int] = None  # samples per epoch of the current train segment (when known)
        self._done = 0  # samples learned in the current session
        base_params = list(self.projector.residual_proj.parameters()) + list(self.projector.base.parameters())
        if self.train_backbone:
            base_params = list(self.model.parameters()) + base_params
        self.optimizer = torch.optim.SGD(base_params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self._apply_phase()
        self.remember_initial_state()

    # --- phases ---------------------------------------------------------------------------------------------------
    @property
    def in_base_session(self) -> bool:
        return self.sessions.session <= 0 and (self.sessions.session < 0 or self.sessions.in_session)

    def _apply_phase(self) -> None:
        """Base session: backbone (if trained) and base branch trainable; afterwards everything frozen except the
        novel branch, which is switched on only inside :meth:`train_novel`."""
        base = self.in_base_session
        self.model.requires_grad_(base and self.train_backbone)
        self.projector.residual_proj.requires_grad_(base)
        self.projector.base.requires_grad_(base)
        self.projector.novel.requires_grad_(False)
        self.model.eval()

    def _use_novel(self) -> bool:
        return self.sessions.session >= 1

    # --- forward --------------------------------------------------------------------------------------------------
    def _backbone(self, x: Tensor) -> Tensor:
        """The projector's input: the ``grid x grid`` pooled feature map (map tokens) or the pooled features."""
        if self.grid:
            return F.adaptive_avg_pool2d(feature_map(self.model, x), self.grid).float()
        return penultimate_features(self.model, x).float()

    def _features(self, x: Tensor) -> Tensor:
        self.model.eval()
        with torch.no_grad():
            return self._backbone(x)

    def logits(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.head(self.projector(self._features(x), use_novel=self._use_novel())["out"])

    @torch.no_grad()
    def _update_means(self, f: Tensor, y: Tensor, ema: bool) -> None:
        """Per-class feature means: exact running means, or (``ema``, backbone still training) at least
        ``proto_ema`` weight on the newest batch so the means follow the moving backbone."""
        k = self.num_classes
        counts = torch.bincount(y, minlength=k).float()
        expand = (k,) + (1,) * (f.dim() - 1)
        sums = torch.zeros(k, *f.shape[1:], device=f.device).index_add_(0, y, f)
        batch_mean = sums / counts.clamp_min(1).view(expand)
        self.class_counts += counts
        alpha = counts / self.class_counts.clamp_min(1)
        if ema:
            alpha = torch.where(counts > 0, alpha.clamp_min(self.proto_ema), alpha)
        self.class_means += alpha.view(expand) * (batch_mean - self.class_means)

    def _first_epoch(self, n: int) -> int:
        """How many leading samples of this batch of ``n`` belong to the session's first epoch (all of them when the
        stream did not say how many samples an epoch has)."""
        done, self._done = self._done, self._done + n
        if self._epoch_samples is None:
            return n
        return max(0, min(n, self._epoch_samples - done))

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        k = self._first_epoch(x.shape[0])
        if self.sessions.session == 0:
            if k and self.base_protos == "final" and self.train_backbone:
                self._base_inputs.append((x[:k], y[:k]))
            return self._base_step(x, y)
        f = self._features(x)
        with torch.no_grad():
            logits = self.mask(self.head(self.projector(f, use_novel=True)["out"]))
        if k:  # each few-shot sample once, however many epochs the stream repeats the session
            self._update_means(f[:k], y[:k], ema=False)
            self._pending.append((f[:k], y[:k]))
        return logits

    def _base_step(self, x: Tensor, y: Tensor) -> Tensor:
        f = self._features(x)  # eval-mode features: the prototypes and the logits before the update
        self._update_means(f, y, ema=self.train_backbone)
        with torch.enable_grad():
            if self.train_backbone:
                with torch.no_grad():
                    logits = self.head(self.projector(f, use_novel=False)["out"])
                self.model.train()
                f = self._backbone(x)
            out = self.projector(f, use_novel=False)["out"]
            if not self.train_backbone:
                logits = self.head(out.detach())
            loss = self.dr_weight * dot_regression_loss(F.normalize(out, dim=1), self.head.targets(y))
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return self.mask(logits)

    # --- sessions -------------------------------------------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        """A train segment says how many epochs it repeats its samples (``meta["epochs"]``): only the first is kept."""
        if getattr(segment, "kind", None) == "train":
            epochs = max(int((getattr(segment, "meta", None) or {}).get("epochs", 1)), 1)
            self._epoch_samples = int(segment.num_samples) // epochs

    def begin_session(self, session: int) -> None:
        self._done = 0
        self._apply_phase()

    def end_session(self, session: int) -> None:
        if session == 0:
            self.base_mask.copy_(self.seen.seen)
            if self._base_inputs:
                self.recompute_base_means()
        elif self._pending:
            self.train_novel(session)
        self._pending, self._base_inputs = [], []
        self._epoch_samples, self._done = None, 0
        self._apply_phase()

    @torch.no_grad()
    def recompute_base_means(self, batch_size: int = 256) -> None:
        """Each base class's mean feature from the final backbone (eval mode) over the kept base-session inputs, as
        the official ``get_training_memory`` (the train set through the trained backbone, mean per class)."""
        sums = torch.zeros_like(self.class_means)
        counts = torch.zeros_like(self.class_counts)
        total = 0
        for x, y in self._base_inputs:  # batch by batch: no concatenated copy of the inputs
            for i in range(0, x.shape[0], batch_size):
                yi = y[i:i + batch_size].to(sums.device)
                sums.index_add_(0, yi, self._features(x[i:i + batch_size]).to(sums.device))
                counts += torch.bincount(yi, minlength=self.num_classes).to(counts.dtype)
            total += x.shape[0]
        present = counts > 0
        expand = (-1,) + (1,) * (sums.dim() - 1)
        means = sums / counts.clamp_min(1).view(expand)
        self.class_means.copy_(torch.where(present.view(expand), means, self.class_means))
        self.class_counts.copy_(torch.where(present, counts, self.class_counts))
        log.debug("mamba_fscil: base prototypes recomputed with the final backbone from %d inputs", total)

    def _lr_at(self, step: int) -> float:
        """The official incremental schedule (mmcls ``CosineAnnealingCooldownLrUpdaterHook`` under mmcv's linear
        warm-up, the runner's iteration counted from 1 as ``fscil.py`` steps it before the hook): cosine from lr to
        0.01 lr over ``inc_steps - inc_cooldown`` iterations, the first ``inc_warmup - 1`` scaled by
        ``0.1 + 0.9 * it / inc_warmup``, the last ``inc_cooldown`` at 0.001 lr."""
        it, span = step + 1, self.inc_steps - self.inc_cooldown
        low = 0.01 * self.inc_lr
        if it > span:
            return 0.1 * low
        lr = low + 0.5 * (self.inc_lr - low) * (1 + math.cos(math.pi * it / max(span, 1)))
        if it < self.inc_warmup:
            lr *= 0.1 + 0.9 * it / self.inc_warmup
        return lr

    def train_novel(self, session: int) -> None:
        """Train the novel branch on this session's features + one mean feature per earlier class."""
        feats = torch.cat([f for f, _ in self._pending])
        labels = torch.cat([y for _, y in self._pending])
        current = torch.zeros_like(self.base_mask).index_fill_(0, labels, True)
        known = self.class_counts > 0
        memory = known & ~current  # base classes and earlier novel classes, one mean each
        mem_cls = torch.nonzero(memory).flatten()  # once per session: a host sync is fine here
        x_all = torch.cat([feats, self.class_means[mem_cls]])
        y_all = torch.cat([labels, mem_cls])
        is_base = self.base_mask[y_all]
        n = x_all.shape[0]
        bs = min(self.inc_batch_size, n)
        gen = torch.Generator().manual_seed(stable_seed(self.seed, "mamba_fscil_inc", session))
        params = list(self.projector.novel.parameters())
        self.projector.novel.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=self.inc_lr, momentum=self.momentum, weight_decay=self.weight_decay)
        queue: List[Tensor] = []
        with torch.enable_grad():
            for step in range(self.inc_steps):
                if not queue:
                    perm = torch.randperm(n, generator=gen).to(x_all.device)
                    queue = list(perm[: (n // bs) * bs].split(bs))
                idx = queue.pop(0)
                for g in opt.param_groups:
                    g["lr"] = self._lr_at(step)
                loss = self._novel_loss(x_all[idx], y_all[idx], is_base[idx], gen)
                loss.backward()
                if self.inc_grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, self.inc_grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        self.projector.novel.requires_grad_(False)
        log.debug("mamba_fscil: session %d novel branch trained on %d features for %d steps", session, n,
                  self.inc_steps)

    def _novel_loss(self, f: Tensor, y: Tensor, is_base: Tensor, gen: torch.Generator) -> Tensor:
        parts = self.projector(f, use_novel=True)
        out = parts["out"]
        targets = self.head.targets(y)
        scale = balance_scales(y, self.num_classes) if self.balanced_targets else torch.ones_like(y, dtype=out.dtype)
        targets = targets * scale.unsqueeze(1)
        if self.mixup_prob > 0 and float(torch.rand((), generator=gen)) < self.mixup_prob:
            lam = self.feature_mixup
            perm = torch.randperm(y.numel(), generator=gen).to(y.device)
            mixed = F.normalize(lam * out + (1 - lam) * out[perm], dim=1)
            loss = lam * dot_regression_loss(mixed, targets, scale) + \
                (1 - lam) * dot_regression_loss(mixed, targets[perm], scale[perm])
        else:
            loss = dot_regression_loss(F.normalize(out, dim=1), targets, scale)
        loss = self.dr_weight * loss
        z, chunk = parts["z_novel"], self.loss_chunk
        if self.supp_weight:
            loss = loss + self.supp_weight * suppression_term(z, is_base, chunk)
        if self.supp_novel_weight:
            loss = loss - self.supp_novel_weight * suppression_term(z, ~is_base, chunk)
        if self.sep_weight:
            for p in parts["params_novel"].values():
                loss = loss + self.sep_weight * separation_loss(p, is_base, chunk)
        return loss

    # --- resume ---------------------------------------------------------------------------------------------------
    def extra(self) -> Any:
        if not self._pending and not self._base_inputs:
            return None
        out: Dict[str, Any] = {}
        for key, items in (("", self._pending), ("base_", self._base_inputs)):
            if items:
                out[key + "x"] = torch.cat([a for a, _ in items]).cpu()
                out[key + "y"] = torch.cat([b for _, b in items]).cpu()
        return out

    def load_extra(self, state: Any) -> None:
        dev = self.class_means.device
        state = state or {}
        self._pending = [(state["x"].to(dev), state["y"].to(dev))] if "x" in state else []
        self._base_inputs = [(state["base_x"].to(dev), state["base_y"].to(dev))] if "base_x" in state else []
        self._apply_phase()
