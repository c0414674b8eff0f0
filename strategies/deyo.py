"""DeYO: destroy your object (Lee, Jung, Lee, Park, Shin, Hwang, Yoon, "Entropy is not Enough for Test-Time
Adaptation: From the Perspective of Disentangled Factors", ICLR 2024, arXiv 2403.07366; code
github.com/Jhyun17/DeYO).

Adapted: the affine scale and shift of the normalisation layers (BatchNorm on test-batch statistics), except the
top layers SAR leaves frozen (``freeze_top``: a ResNet's ``layer4``, a ViT-B's ``blocks.9``-``blocks.11`` and its
final ``norm``; ``strategies/common/norm.py`` ``sar_parameters``). Per test batch x (``steps`` times), with E(x) the
softmax entropy, p = softmax f(x) and C classes:
  1. entropy filter: S1 = {x : E(x) < ``margin`` ln C};
  2. x' = the object-destroying transform of each x in S1 (``aug``): ``patch`` cuts the image into a
     ``patch_len`` x ``patch_len`` grid and shuffles the tiles, each image with its own random permutation (the
     paper's default; an image whose side is not a multiple of ``patch_len`` is resized to the nearest multiple
     below and back, bilinear with antialias as torchvision's ``Resize``); ``pixel`` shuffles the pixels with one
     permutation shared by the batch; ``occ`` replaces an ``occlusion_size`` square at (``occlusion_row``,
     ``occlusion_column``) by the image's per-channel mean;
  3. PLPD, the pseudo-label probability difference, without gradient: y^ = argmax p(x),
     PLPD(x) = p_y^(x) - p_y^(x'), x' forwarded on its own batch statistics;
     S2 = {x in S1 : PLPD(x) > ``plpd_threshold``};
  4. sample reweighting, without gradient: alpha(x) = 1 / exp(E(x) - E0) (``reweight_ent``, E0 =
     ``e_margin`` ln C) + 1 / exp(-PLPD(x)) (``reweight_plpd``); loss = mean over S2 of alpha E (no weights: the
     mean of E over S2); one optimiser step. An empty S1 or S2 makes no step (the optimiser's state is left).
  The prediction returned is f(x) of step 1, before the update.
As the reference benchmark's ``DeYO`` (mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/deyo.py``,
last changed in 4e918f2, after Jhyun17/DeYO ``methods/deyo.py``): model in ``eval()`` mode with BatchNorm on batch
statistics, the means over the kept samples (a host synchronisation per filter, as the reference's
``torch.where``), the tile permutation the argsort of a uniform ``(|S1|, patch_len^2)`` draw on the host (ours: the
strategy's seeded CPU generator; the reference: torch's global one, so with the same seed the draws are the same).
The reference resizes a non-square image to a square of its width; ours keeps each side. Mixed precision (the
reference's CUDA ``autocast``) is not reproduced.
Hyperparameters (``conf.py`` ``_C.DEYO``, ``_C.EATA.MARGIN_E0``, ``_C.OPTIM`` + ``cfgs/cifar10_c/deyo.yaml``): PLPD
threshold 0.2, margin 0.5, E0 0.4, ``patch`` with patch_len 4 (16 tiles; occlusion 112 at (56, 56) for ``occ``),
both reweightings on, Adam lr 1e-3, betas (0.9, 0.999), wd 0, 1 step, batch 200; CIFAR-100-C the same; ImageNet-C
SGD lr 2.5e-4, momentum 0.9, Nesterov, batch 64 (configs/strategies/deyo.yaml).
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, Momentum, NonNegative, NonNegInt, Positive, Range

from .base import Strategy, register
from .common import sar_parameters, softmax_entropy, use_batch_statistics
from .common.incremental import num_outputs
from .common.optim import adam_or_sgd


def _resize(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize with antialias (torchvision's ``Resize`` on a float tensor); identity at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def patch_shuffle(x: Tensor, patch_len: int, uniforms: Tensor) -> Tensor:
    """Each image of x (N x C x H x W) cut into a ``patch_len`` x ``patch_len`` grid of tiles (row-major), the tiles
    reordered: output tile k of image i is input tile ``argsort(uniforms[i])[k]``. ``uniforms``: N x patch_len^2."""
    n, c, h, w = x.shape
    grid = patch_len
    hh, ww = (h // grid) * grid, (w // grid) * grid
    if hh == 0 or ww == 0:
        raise ConfigError(f"deyo: images of {h} x {w} cannot be cut into {grid} x {grid} tiles")
    y = _resize(x, (hh, ww))
    th, tw = hh // grid, ww // grid
    tiles = y.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, th, tw)
    order = uniforms.argsort(dim=-1).to(x.device)
    tiles = tiles[torch.arange(n, device=x.device).unsqueeze(-1), order]
    y = tiles.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hh, ww)
    return _resize(y, (h, w))


def pixel_shuffle(x: Tensor, perm: Tensor) -> Tensor:
    """The pixels of every image of x reordered by one permutation ``perm`` of the H*W positions."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w)[:, :, perm.to(x.device)].reshape(n, c, h, w)


def occlude(x: Tensor, size: int, row: int, column: int) -> Tensor:
    """x with the ``size`` square at (row, column) (clipped to the image) set to each image's per-channel mean."""
    out = x.clone()
    mean = x.flatten(2).mean(dim=2)[:, :, None, None]
    window = out[:, :, row:row + size, column:column + size]
    window.copy_(mean.expand_as(window))
    return out


def plpd(probs: Tensor, probs_destroyed: Tensor) -> Tensor:
    """Pseudo-label probability difference per sample: p_y^ - p'_y^ with y^ = argmax p (p, p': softmax outputs)."""
    label = probs.argmax(dim=1).reshape(-1, 1)
    return (probs.gather(1, label) - probs_destroyed.gather(1, label)).reshape(-1)


def deyo_weights(entropy: Tensor, plpd_values: Tensor, e0: float, reweight_ent: bool,
                 reweight_plpd: bool) -> Optional[Tensor]:
    """DeYO's sample weights: 1 / exp(E - E0) and / or 1 / exp(-PLPD), summed; None when both are off."""
    weights = None
    if reweight_ent:
        weights = 1.0 / torch.exp(entropy - e0)
    if reweight_plpd:
        term = 1.0 / torch.exp(-1.0 * plpd_values)
        weights = term if weights is None else weights + term
    return weights


@register
class DeYO(Strategy):
    """Entropy minimisation of the norm affines on the samples that are confident (entropy filter) and whose
    prediction rests on the object's shape (PLPD filter), weighted by both."""

    name = "deyo"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})

    def __init__(self, model: nn.Module, plpd_threshold: Annotated[float, Range(ge=-1, le=1)] = 0.2,
                 margin: Positive = 0.5, e_margin: Positive = 0.4, reweight_ent: bool = True,
                 reweight_plpd: bool = True, aug: Literal["patch", "pixel", "occ"] = "patch", patch_len: Count = 4,
                 occlusion_size: Count = 112, occlusion_row: NonNegInt = 56, occlusion_column: NonNegInt = 56,
                 freeze_top: bool = True, optimizer: Literal["adam", "sgd"] = "adam", lr: Positive = 1e-3,
                 beta: Momentum = 0.9, momentum: Momentum = 0.9, nesterov: bool = True,
                 weight_decay: NonNegative = 0.0, steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        num_classes = num_outputs(model)
        self.plpd_threshold = float(plpd_threshold)
        self.margin = float(margin) * math.log(num_classes)  # entropy filter
        self.e0 = float(e_margin) * math.log(num_classes)  # entropy reweighting
        self.reweight_ent, self.reweight_plpd = bool(reweight_ent), bool(reweight_plpd)
        self.aug, self.patch_len = aug, int(patch_len)
        self.occlusion = (int(occlusion_size), int(occlusion_row), int(occlusion_column))
        self.steps = int(steps)
        self.model.eval().requires_grad_(False)  # eval: no dropout / stochastic depth (as the reference)
        use_batch_statistics(self.model)
        named = sar_parameters(self.model, freeze_top)
        if not named:
            raise ConfigError("deyo needs normalisation layers with affine parameters (outside the top layers)")
        self.params = [p for _, p in named]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = adam_or_sgd(self.params, optimizer, lr, beta, momentum, nesterov, weight_decay)
        self.last_kept: Optional[Tuple[int, int]] = None  # (|S1|, |S2|) of the last step
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def destroy(self, x: Tensor) -> Tensor:
        """The object-destroying view x' of the kept images (step 2); random draws from the strategy's generator."""
        if self.aug == "patch":
            uniforms = torch.rand(x.shape[0], self.patch_len ** 2, generator=self.generator(torch.device("cpu")))
            return patch_shuffle(x, self.patch_len, uniforms)
        if self.aug == "pixel":
            perm = torch.randperm(x.shape[-2] * x.shape[-1], generator=self.generator(torch.device("cpu")))
            return pixel_shuffle(x, perm)
        return occlude(x, *self.occlusion)

    def adapt(self, x: Tensor) -> Tensor:
        return self.stepped(x, self._step, self.steps)

    def _step(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        entropy = softmax_entropy(logits)
        keep1 = entropy.detach() < self.margin  # step 1
        entropy = entropy[keep1]
        kept1 = int(keep1.sum())
        kept2 = 0
        if kept1:
            with torch.no_grad():
                destroyed = self.model(self.destroy(x[keep1].detach()))  # step 2
                diff = plpd(logits.detach()[keep1].softmax(1), destroyed.softmax(1))  # step 3
                keep2 = diff > self.plpd_threshold
            entropy, diff = entropy[keep2], diff[keep2]
            kept2 = int(keep2.sum())
        if kept2:
            weights = deyo_weights(entropy.detach(), diff, self.e0, self.reweight_ent, self.reweight_plpd)  # step 4
            loss = (entropy if weights is None else entropy * weights).mean(0)
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_kept = (kept1, kept2)
        return logits.detach()


__all__ = ["DeYO", "deyo_weights", "occlude", "patch_shuffle", "pixel_shuffle", "plpd"]
