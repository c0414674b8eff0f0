"""LSA: the label-shift adapter, a plug-in for test-time strategies (Park, Yang, Choo, Yun; ICCV 2023, arXiv 2308.08810).

Algorithm. (b) Before deployment, with the source model frozen, a small network g (the adapter) is trained on
source data to map a label distribution pi to parameters for part of the model: an affine modulation of the
penultimate features, h' = gamma * h + beta, and an offset delta of the logits, z = head(h') + delta. Each step
draws label distributions pi_t and minimises the generalised logit-adjusted loss
CE(z(x; g(pi_t)) + log pi_s - log pi_t, y) on source samples (distributed as pi_s): its minimiser is the
Bayes classifier for a target whose labels are distributed as pi_t. (c) At test time the target label
distribution is estimated online, p_t = m p_{t-1} + (1 - m) mean_batch softmax(z), and fed to g; the host strategy
(TENT by default) adapts the model with the adapter in place, so ``lsa+tent`` minimises the entropy of the
label-shift-corrected predictions.

No public code exists; open choices made here (hyperparameters in ``configs/strategies/lsa.yaml``):
* the adapter sees r = log max(pi, eps) - log max(pi_s, eps) and outputs g(r) - g(0), so the source distribution
  gives exactly the identity (gamma = 1, beta = 0, delta = 0: the source model unchanged);
* the logit offset is r + (learned residual): the Bayes prior correction under pure label shift (Saerens et al.
  2002) is built in and the network learns what it misses (miscalibration, feature modulation);
* pi_t during training: half Dirichlet(alpha) with alpha log-uniform in [0.3, 10], half long-tailed profiles
  (imbalance ratio log-uniform in [1, max_imbalance], random class order); several pi_t per step;
* the penultimate features of the source subset are computed once (the source model is frozen), so training
  costs one forward over the data plus adapter steps; no data augmentation;
* the estimate starts at pi_s, uses the prediction the host returns (made with the previous estimate), and is
  updated after each adapt step (``estimate_from: adapted``, the paper's choice; ``source`` uses the logits
  without the adapter's offset, i.e. the un-corrected prediction, as an alternative less prone to feedback).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Any, Dict, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import CheckpointError, ConfigError, UnsupportedError
from ctta.hparams import Count, Momentum, Positive, Range
from ctta.seeding import stable_seed

from .base import Strategy
from .common.source_data import SourceData, load_source_data
from .compose import Composite, Plugin, register_plugin

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "ctta-lsa-adapter/1"


def _features(model: nn.Module, x: Tensor) -> Tensor:
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise UnsupportedError(f"lsa needs penultimate features: model {type(model).__name__} has no "
                               f"forward_features(x) / forward_head(features); wrap it in ctta.backbones.Classifier")
    return model.forward_features(x)


class LabelShiftAdapter(nn.Module):
    """Label distribution -> (gamma, beta, delta): feature scale and shift (D each) and logit offset (K)."""

    def __init__(self, num_classes: int, feature_dim: int, hidden: int = 128, eps: float = 1e-3,
                 source_prior: Optional[Tensor] = None) -> None:
        super().__init__()
        self.num_classes, self.feature_dim, self.hidden, self.eps = int(num_classes), int(feature_dim), int(hidden), float(eps)
        prior = torch.full((num_classes,), 1.0 / num_classes) if source_prior is None else source_prior.float()
        if prior.shape != (num_classes,):
            raise ConfigError(f"source prior must have {num_classes} entries, got shape {tuple(prior.shape)}")
        self.register_buffer("source_prior", prior / prior.sum())
        self.net = nn.Sequential(nn.Linear(num_classes, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 2 * feature_dim + num_classes))
        nn.init.zeros_(self.net[-1].weight)  # start at the pure prior correction
        nn.init.zeros_(self.net[-1].bias)

    def log_ratio(self, prior: Tensor) -> Tensor:
        return prior.clamp_min(self.eps).log() - self.source_prior.clamp_min(self.eps).log()

    def forward(self, prior: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``prior`` (K,) or (P, K) -> gamma, beta (.., D) and delta (.., K); identity for the source prior."""
        r = self.log_ratio(prior)
        out = self.net(r) - self.net(torch.zeros_like(r))
        d = self.feature_dim
        return 1.0 + out[..., :d], out[..., d:2 * d], r + out[..., 2 * d:]


class LabelShiftModel(nn.Module):
    """The source model with the adapter in place, conditioned on the buffer ``estimate`` (the target prior)."""

    def __init__(self, model: nn.Module, adapter: LabelShiftAdapter) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.num_classes = adapter.num_classes
        self.register_buffer("estimate", adapter.source_prior.detach().clone())

    def forward_features(self, x: Tensor) -> Tensor:
        gamma, beta, _ = self.adapter(self.estimate)
        return _features(self.model, x) * gamma + beta

    def forward_head(self, features: Tensor) -> Tensor:
        return self.model.forward_head(features) + self.adapter(self.estimate)[2]

    def features_and_logits(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        gamma, beta, delta = self.adapter(self.estimate)
        f = _features(self.model, x) * gamma + beta
        return f, self.model.forward_head(f) + delta

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]

    @torch.no_grad()
    def update_estimate(self, logits: Tensor, momentum: float, remove_offset: bool = False) -> None:
        """EMA of the batch-mean softmax; ``remove_offset`` first subtracts the adapter's logit offset."""
        z = logits.detach().float()
        if remove_offset:
            z = z - self.adapter(self.estimate)[2]
        self.estimate.mul_(momentum).add_(z.softmax(dim=1).mean(dim=0), alpha=1.0 - momentum)


# --- training (before deployment) ---------------------------------------------------------------------------
def sample_priors(n: int, num_classes: int, max_imbalance: float, generator: torch.Generator) -> Tensor:
    """``n`` label distributions: half Dirichlet, half long-tailed with a random imbalance ratio and class order."""
    k = num_classes
    u = torch.rand(n, generator=generator)
    alpha = torch.exp(math.log(0.3) + u * (math.log(10.0) - math.log(0.3)))
    gamma = torch._standard_gamma(alpha[:, None].expand(n, k).contiguous())
    dirichlet = gamma / gamma.sum(dim=1, keepdim=True).clamp_min(1e-12)
    rho = torch.exp(torch.rand(n, generator=generator) * math.log(max(max_imbalance, 1.0)))
    profile = rho[:, None] ** (-torch.arange(k, dtype=torch.float32)[None, :] / max(k - 1, 1))
    order = torch.argsort(torch.rand(n, k, generator=generator), dim=1)
    longtail = torch.gather(profile, 1, order)
    longtail = longtail / longtail.sum(dim=1, keepdim=True)
    use_dir = (torch.rand(n, generator=generator) < 0.5)[:, None]
    return torch.where(use_dir, dirichlet, longtail)


@torch.no_grad()
def source_features(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Penultimate features of ``images`` (uint8 or float in [0, 1]) with the source model in eval mode."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    batches = math.ceil(images.shape[0] / batch_size)
    for b, i in enumerate(range(0, images.shape[0], batch_size)):
        xb = images[i:i + batch_size].to(dev)
        xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
        out.append(_features(model, xb).float())
        if batches > 2 and b < 2:  # batch 2 timed (batch 1 is warm-up): two host syncs, then none
            t = _synced_time(dev)
            if b == 1:
                log.info("lsa adapter: features of %d source images with the frozen model, about %s (measured on "
                         "batch 2 of %d)", images.shape[0], _duration(batches * (t - t_mark)), batches)
            t_mark = t
    model.train(was_training)
    return torch.cat(out)


def _synced_time(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _duration(seconds: float) -> str:
    from ctta.evaluation.cost import duration_text  # one formatting of durations, as the engine's run estimate

    return duration_text(seconds)


def train_adapter(model: nn.Module, images: Tensor, labels: Tensor, num_classes: Optional[int] = None,
                  steps: int = 1000, batch_size: int = 256, priors_per_step: int = 8, lr: float = 1e-3,
                  hidden: int = 128, eps: float = 1e-3, max_imbalance: float = 100.0, seed: int = 0,
                  source_prior: Optional[Tensor] = None) -> LabelShiftAdapter:
    """Train a :class:`LabelShiftAdapter` for the frozen ``model`` on source ``images`` (N x C x H x W) and ``labels``.

    Loss: the generalised logit-adjusted cross-entropy averaged over ``priors_per_step`` sampled label
    distributions per step, each with ``batch_size / priors_per_step`` source samples drawn uniformly.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ConfigError(f"lsa source data: {images.shape[0]} images and {labels.shape[0]} labels")
    # the global RNG is left as it was (the adapter's init and the prior draws reseed it inside): a run that loads
    # the cached adapter instead of training it continues with the same random numbers
    with torch.random.fork_rng(devices=[]):
        return _train_adapter(model, images, labels, num_classes, steps, batch_size, priors_per_step, lr, hidden, eps,
                              max_imbalance, seed, source_prior)


def _train_adapter(model: nn.Module, images: Tensor, labels: Tensor, num_classes: Optional[int], steps: int,
                   batch_size: int, priors_per_step: int, lr: float, hidden: int, eps: float, max_imbalance: float,
                   seed: int, source_prior: Optional[Tensor]) -> LabelShiftAdapter:
    k = int(num_classes or getattr(model, "num_classes", 0) or int(labels.max()) + 1)
    feats = source_features(model, images)
    labels = labels.to(feats.device).long()
    if source_prior is None:
        source_prior = torch.bincount(labels, minlength=k).float()
        source_prior = source_prior / source_prior.sum()
    g = torch.Generator().manual_seed(stable_seed(seed, "lsa-adapter"))
    torch.manual_seed(stable_seed(seed, "lsa-adapter-init"))
    adapter = LabelShiftAdapter(k, feats.shape[1], hidden=hidden, eps=eps, source_prior=source_prior.cpu())
    adapter.to(feats.device)
    head_params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in head_params]
    for p in head_params:
        p.requires_grad_(False)
    opt = torch.optim.Adam(adapter.parameters(), lr=lr)
    per = max(1, batch_size // priors_per_step)
    log_ps = adapter.source_prior.clamp_min(eps).log()
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            priors = sample_priors(priors_per_step, k, max_imbalance, g).to(feats.device)
            idx = torch.randint(0, feats.shape[0], (priors_per_step, per), generator=g).to(feats.device)
            f, y = feats[idx], labels[idx]                                  # P x B x D, P x B
            gamma, beta, delta = adapter(priors)                            # P x D, P x D, P x K
            z = model.forward_head(f * gamma[:, None] + beta[:, None]) + delta[:, None]
            z = z + (log_ps - priors.clamp_min(eps).log())[:, None]         # logit adjustment back to the source
            loss = F.cross_entropy(z.reshape(-1, k), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 0 or step == min(10, steps - 1):  # steps 2..11 timed (step 1 is warm-up), two host syncs
                t = _synced_time(feats.device)
                if step:
                    sec = (t - t_mark) / step
                    log.info("lsa adapter: about %s for %d steps (%.1f ms per step, measured on steps 2-%d)",
                             _duration(sec * steps), steps, 1000 * sec, step + 1)
                t_mark = t
            if step % max(1, steps // 5) == 0 or step == steps - 1:
                log.info("lsa adapter step %d/%d: logit-adjusted loss %.4f", step + 1, steps, loss.item())
    finally:
        model.train(was_training)
        for p, fl in zip(head_params, flags):
            p.requires_grad_(fl)
    return adapter.requires_grad_(False).cpu()


def save_adapter(adapter: LabelShiftAdapter, path: Union[str, Path]) -> Path:
    import os

    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.tmp{os.getpid()}")  # written whole, then renamed: a reader never sees half a file
    torch.save({"format": ADAPTER_FORMAT, "num_classes": adapter.num_classes, "feature_dim": adapter.feature_dim,
                "hidden": adapter.hidden, "eps": adapter.eps, "state_dict": adapter.state_dict()}, tmp)
    os.replace(tmp, p)
    return p


def load_adapter(path: Union[str, Path]) -> LabelShiftAdapter:
    p = Path(path).expanduser()
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise CheckpointError(f"cannot read lsa adapter {str(p)!r}: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{str(p)!r} is not an lsa adapter checkpoint (no format {ADAPTER_FORMAT!r})")
    with torch.random.fork_rng(devices=[]):  # the init is overwritten: it must not move the global random numbers
        a = LabelShiftAdapter(ck["num_classes"], ck["feature_dim"], hidden=ck["hidden"], eps=ck["eps"])
    a.load_state_dict(ck["state_dict"])
    return a.requires_grad_(False)


# --- the adapter cache: a trained adapter is kept under the user cache folder, keyed by everything it depends on ---
ADAPTER_CACHE_VERSION = 1  # bump when train_adapter changes what it computes


def _hash_tensor(h: Any, name: str, t: Any) -> None:
    t = torch.as_tensor(t).detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _source_identity(h: Any, source_data: Any) -> None:
    """A path: its resolved name and the size and modification time of the files in it (and one folder down, a
    torchvision layout); a pair of tensors: their contents."""
    if isinstance(source_data, (str, Path)):
        root = Path(source_data).expanduser().resolve()
        h.update(f"path|{root}|".encode())
        files = [root] if root.is_file() else []
        if root.is_dir():
            for entry in sorted(root.iterdir()):
                files += [entry] if entry.is_file() else sorted(f for f in entry.iterdir() if f.is_file()) \
                    if entry.is_dir() else []
        for f in files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|".encode())
    else:
        images, labels = source_data
        _hash_tensor(h, "images", images)
        _hash_tensor(h, "labels", labels)


def adapter_cache_path(model: nn.Module, source_data: Any, hp: Dict[str, Any]) -> Optional[Path]:
    """``<cache>/lsa/adapter-<key>.pt`` (the cache folder of :func:`ctta.streams.datasets.cache_dir`, where the
    decoded train sets and the demo model are); the key hashes the source data (path + file sizes and mtimes, or
    the tensors), the backbone (class, state_dict: weights and buffers, device type) and the adapter's training
    hyperparameters and seed. None (no caching) when the inputs cannot be hashed."""
    import hashlib
    import json

    from ctta.streams.datasets import cache_dir  # lazy: the one cache folder lives with the data loading

    h = hashlib.sha256(f"{ADAPTER_FORMAT}|v{ADAPTER_CACHE_VERSION}|".encode())
    h.update(json.dumps(hp, sort_keys=True, default=str).encode())
    try:
        _source_identity(h, source_data)
        first = next(model.parameters(), None)
        h.update(f"{type(model).__module__}.{type(model).__qualname__}|"
                 f"{first.device.type if first is not None else 'cpu'}|".encode())
        for name, t in model.state_dict().items():
            _hash_tensor(h, name, t)
    except (TypeError, ValueError, RuntimeError, OSError):  # an unusual input: train without caching
        return None
    return cache_dir() / "lsa" / f"adapter-{h.hexdigest()[:24]}.pt"


def _load_cached(path: Optional[Path]) -> Optional[LabelShiftAdapter]:
    if path is None or not path.is_file():
        return None
    try:
        a = load_adapter(path)
    except CheckpointError as e:
        log.warning("ignoring the unreadable cached lsa adapter (%s); training again", e)
        return None
    log.info("lsa: loaded the adapter trained earlier on the same source data, backbone weights and "
             "hyperparameters from the cache: %s", path)
    return a


@register_plugin
class LSA(Plugin):
    """Label-shift adapter: online EMA estimate of the target label distribution -> adapter -> corrected model."""

    name = "lsa"
    default_host = "tent"

    def __init__(self, model: nn.Module, ema: Momentum = 0.9, estimate_from: Literal["adapted", "source"] = "adapted",
                 adapter: Union[None, str, Path] = None, source_data: SourceData = None,
                 source_samples: Optional[Count] = 10000, train_steps: Count = 1000, train_batch: Count = 256,
                 priors_per_step: Count = 8, train_lr: Positive = 1e-3, hidden: Count = 128, eps: Positive = 1e-3,
                 max_imbalance: Annotated[float, Range(ge=1)] = 100.0, seed: int = 0) -> None:
        self.ema, self.estimate_from = float(ema), estimate_from
        k = int(getattr(model, "num_classes", 0))
        self.adapter_module = self.prepare(model, adapter, source_data, source_samples, train_steps, train_batch,
                                           priors_per_step, train_lr, hidden, eps, max_imbalance, seed)
        if k and self.adapter_module.num_classes != k:
            raise CheckpointError(f"lsa adapter has {self.adapter_module.num_classes} classes, the model {k}")
        self.wrapper: Optional[LabelShiftModel] = None

    @staticmethod
    def prepare(model: nn.Module, adapter: Optional[str], source_data: Any, source_samples: Optional[int],
                train_steps: int, train_batch: int, priors_per_step: int, train_lr: float, hidden: int,
                eps: float, max_imbalance: float, seed: int) -> LabelShiftAdapter:
        """Load the adapter from ``adapter`` when that file exists; else from the cache when one was trained on
        the same inputs (:func:`adapter_cache_path`); otherwise train it on ``source_data`` and cache it (and save
        it to ``adapter`` when a path was given)."""
        if adapter is not None and Path(adapter).expanduser().is_file():
            a = load_adapter(adapter)
            dim = getattr(model, "feature_dim", None)
            if dim is not None and int(dim) != a.feature_dim:
                raise CheckpointError(f"lsa adapter {adapter!r} is for {a.feature_dim}-d features, the model has {dim}")
            return a
        if source_data is None:
            raise ConfigError("lsa needs a trained adapter: give adapter=PATH (an existing file, from "
                              "train_adapter) or source_data=PATH of the source train set to train one"
                              + (f" (no file at {adapter!r})" if adapter else ""))
        k = int(getattr(model, "num_classes", 0)) or None
        hp = dict(num_classes=k, source_samples=source_samples, steps=train_steps, batch_size=train_batch,
                  priors_per_step=priors_per_step, lr=train_lr, hidden=hidden, eps=eps, max_imbalance=max_imbalance,
                  seed=seed)
        cached = adapter_cache_path(model, source_data, hp)
        a = _load_cached(cached)
        if a is None:
            what = (f"the source train set at {str(source_data)!r} (a JPEG .npz is decoded on first read)"
                    if isinstance(source_data, (str, Path)) else "the given source images")
            log.info("lsa: training the label-shift adapter before the run (none cached for this source data, "
                     "backbone and these hyperparameters): %s images of %s, their features with the frozen model, "
                     "then %d adapter steps; estimates follow the first batches; cached%s for the next run",
                     f"up to {source_samples}" if source_samples else "all", what, train_steps,
                     f" at {cached}" if cached else "")
            x, y = load_source_data(source_data, k, source_samples, seed, who="lsa")
            a = train_adapter(model, x, y, num_classes=k, steps=train_steps, batch_size=train_batch,
                              priors_per_step=priors_per_step, lr=train_lr, hidden=hidden, eps=eps,
                              max_imbalance=max_imbalance, seed=seed)
            if cached is not None:
                try:
                    save_adapter(a, cached)
                except OSError as e:  # a read-only cache is not fatal: train again next time
                    log.warning("could not cache the lsa adapter at %s (%s)", cached, e)
        if adapter is not None:
            log.info("lsa adapter saved to %s", save_adapter(a, adapter))
        return a

    def wrap(self, model: nn.Module) -> nn.Module:
        dev = next(model.parameters()).device
        self.wrapper = LabelShiftModel(model, self.adapter_module.to(dev))
        return self.wrapper

    def observe(self, logits: Tensor) -> None:
        assert self.wrapper is not None
        self.wrapper.update_estimate(logits, self.ema, remove_offset=self.estimate_from == "source")

    def refuse_host(self, host: Strategy) -> Optional[str]:
        assert self.wrapper is not None
        if any(isinstance(m, LabelShiftModel) and m is not self.wrapper for m in host.modules()):
            return (f"{host.name!r} keeps its own copies of the model (e.g. a teacher), whose adapter would not "
                    f"follow the online label-distribution estimate")
        mine = {id(p) for p in self.wrapper.adapter.parameters()}
        if any(id(p) in mine for p in host.trainable_parameters()):
            return f"{host.name!r} trains every weight of the model, the adapter's included; the adapter must stay fixed"
        if getattr(host, "model", None) is not self.wrapper:
            return f"{host.name!r} does not predict with the model it was given"
        return None


__all__ = ["LSA", "LabelShiftAdapter", "LabelShiftModel", "adapter_cache_path", "load_adapter", "sample_priors",
           "save_adapter", "train_adapter", "Composite"]
