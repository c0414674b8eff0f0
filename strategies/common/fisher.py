"""Diagonal Fisher information (EWC style) and what is built on it: a Fisher-weighted quadratic penalty and masks.

The empirical diagonal Fisher of a parameter is the squared gradient of the loss (Kirkpatrick et al., PNAS 2017).
:class:`DiagonalFisher` keeps it per parameter on the device, either per batch (``decay=0``) or as a running
average ``F <- decay * F + (1 - decay) * g**2``; :func:`source_fisher` estimates it once on source images (as the
released code of EATA and PSMT does); :func:`per_sample_fisher` sums it image by image, weighted by the likelihood
of the label (online EWC, Mammoth's ``EwcOn``). :func:`top_fraction_masks` / :func:`lowest_fraction_masks` mark the
elements above / below a global quantile of such values.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .source_data import as_float_images


class DiagonalFisher:
    """Running diagonal Fisher information of named parameters, from their squared gradients."""

    def __init__(self, named_params: Iterable[Tuple[str, nn.Parameter]], decay: float = 0.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"fisher decay must be in [0, 1), got {decay}")
        self.params: Dict[str, nn.Parameter] = dict(named_params)
        self.decay = float(decay)
        self.values: Dict[str, Tensor] = {n: torch.zeros_like(p, memory_format=torch.preserve_format).detach()
                                          for n, p in self.params.items()}
        self.initialised = False

    @torch.no_grad()
    def update_(self) -> None:
        """Fold in the squared current ``.grad`` of every parameter (missing gradients count as zero)."""
        names = [n for n, p in self.params.items() if p.grad is not None]
        if not names:
            return
        vals = [self.values[n] for n in names]
        sq = [self.params[n].grad.detach().square() for n in names]
        if self.decay == 0.0 or not self.initialised:
            torch._foreach_copy_(vals, sq)
        else:
            torch._foreach_lerp_(vals, sq, 1.0 - self.decay)
        self.initialised = True

    def to(self, device: torch.device) -> "DiagonalFisher":
        self.values = {n: v.to(device) for n, v in self.values.items()}
        return self

    def state_dict(self) -> Dict[str, object]:
        return {"values": {n: v.clone() for n, v in self.values.items()}, "initialised": self.initialised}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        values = state["values"]
        assert isinstance(values, Mapping)
        for n, v in values.items():
            self.values[n].copy_(v)
        self.initialised = bool(state["initialised"])


def fisher_penalty(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> Tensor:
    """EWC's quadratic penalty ``sum_i F_i (theta_i - theta*_i)**2`` over the names in ``fisher``.

    Its gradient with respect to theta is ``2 F (theta - theta*)``; zero at the anchor.
    """
    terms = [(fisher[n] * (params[n] - anchor[n].detach()).square()).sum() for n in fisher]
    if not terms:
        raise ValueError("fisher_penalty needs at least one parameter")
    return torch.stack(terms).sum()


@torch.no_grad()
def top_fraction_masks(values: Mapping[str, Tensor], fraction: float) -> Dict[str, Tensor]:
    """Boolean masks marking the elements whose value is in the global top ``fraction`` (strictly above the threshold).

    The threshold is the ``(1 - fraction)`` quantile over all elements of all tensors, found with ``kthvalue`` on
    the device (no host sync; works beyond ``torch.quantile``'s 16M-element limit). ``fraction=0`` marks nothing.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if not values:
        return {}
    if fraction <= 0.0:
        return {k: torch.zeros_like(v, dtype=torch.bool) for k, v in values.items()}
    if fraction >= 1.0:
        return {k: torch.ones_like(v, dtype=torch.bool) for k, v in values.items()}
    flat = torch.cat([v.detach().reshape(-1).float() for v in values.values()])
    k = max(1, flat.numel() - int(round(fraction * flat.numel())))  # elements above the k-th smallest: the top part
    threshold = flat.kthvalue(k).values
    return {name: v > threshold for name, v in values.items()}


def masks_for(model: nn.Module, masks: Mapping[str, Tensor], invert: bool = False) -> List[Optional[Tensor]]:
    """Masks aligned with ``model.parameters()`` (``None`` where no mask is given), optionally inverted."""
    out: List[Optional[Tensor]] = []
    for name, _ in model.named_parameters():
        m = masks.get(name)
        out.append(None if m is None else (~m if invert else m))
    return out


def source_fisher(model: nn.Module, images: Tensor, batch_size: int) -> Dict[str, Tensor]:
    """Diagonal Fisher of ``model`` on source ``images`` (N x C x H x W, uint8 or float in [0, 1]), in their order.

    As the EWC estimate of PSMT's released code (JiaxuTian/PSMT ``classification/methods/psmt.py``, after EATA's):
    per batch of ``batch_size``, the cross-entropy of the model against its own argmax prediction (batch mean); the
    squared gradients are summed over the batches and divided by their number. Every parameter that requires a
    gradient gets a value; ``.grad`` is not touched. The model runs as it is configured (e.g. BatchNorm on batch
    statistics).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("source_fisher: the model has no parameter that requires a gradient")
    device = named[0][1].device
    sums: Dict[str, Tensor] = {}
    batches = 0
    with torch.enable_grad():
        for i in range(0, images.shape[0], batch_size):
            logits = model(as_float_images(images[i:i + batch_size], device))
            loss = F.cross_entropy(logits, logits.argmax(dim=1))
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (name, _), g in zip(named, grads):
                if g is not None:
                    sq = g.detach().square()
                    sums[name] = sq if name not in sums else sums[name] + sq
            batches += 1
    if batches == 0:
        raise ValueError("source_fisher: no source images")
    return {n: v / batches for n, v in sums.items()}


def per_sample_fisher(model: nn.Module, batches: Iterable[Tuple[Tensor, Tensor]],
                      output: Optional[Callable[[Tensor], Tensor]] = None,
                      likelihood_weighted: bool = True) -> Tuple[Dict[str, Tensor], int, int]:
    """Sums over samples of ``w (d log p(y|x) / d theta)**2``, one image at a time (online EWC's estimate).

    As Mammoth's ``EwcOn.end_task`` (aimagelab/mammoth ``models/ewc_on.py``): each labelled image goes through
    ``model`` alone, in the mode the caller left it in (train mode: BatchNorm normalises it with its own statistics
    and updates its running statistics, as the reference), and ``w = p(y|x)`` with ``likelihood_weighted`` (1:
    the empirical Fisher). ``output`` maps the logits before the log-softmax (e.g. a seen-class mask). Returns
    the sums per parameter that requires a gradient, the number of samples and the number of batches; ``.grad``
    is not touched.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("per_sample_fisher: the model has no parameter that requires a gradient")
    sums = {n: torch.zeros_like(p).detach() for n, p in named}
    samples = batches_seen = 0
    with torch.enable_grad():
        for x, y in batches:
            batches_seen += 1
            for i in range(x.shape[0]):
                z = model(x[i:i + 1])
                log_p = F.log_softmax(z if output is None else output(z), dim=1)[0, y[i]]
                grads = torch.autograd.grad(log_p, [p for _, p in named], allow_unused=True)
                w = log_p.detach().exp() if likelihood_weighted else None
                for (name, _), g in zip(named, grads):
                    if g is not None:
                        sums[name] += g.square() if w is None else w * g.square()
                samples += 1
    return sums, samples, batches_seen


@torch.no_grad()
def lowest_fraction_masks(values: Mapping[str, Tensor], fraction: float) -> Dict[str, Tensor]:
    """Boolean masks marking the elements strictly below the global ``fraction`` quantile of all values.

    The quantile is the released PSMT code's ``find_quantile``: linear interpolation between the sorted values at
    ``floor(fraction * (n - 1))`` and the next one (found with ``kthvalue``, no full sort); ``fraction=0`` gives the
    minimum, so nothing is marked. Ties at the threshold are not marked.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if not values:
        return {}
    flat = torch.cat([v.detach().reshape(-1) for v in values.values()])
    pos = fraction * (flat.numel() - 1)
    low = int(pos)
    high = min(low + 1, flat.numel() - 1)
    lo_v = flat.kthvalue(low + 1).values
    hi_v = flat.kthvalue(high + 1).values if high != low else lo_v
    threshold = lo_v + (hi_v - lo_v) * (pos - low)
    return {name: v < threshold for name, v in values.items()}
