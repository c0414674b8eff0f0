"""AaD: Attracting and Dispersing for source-free domain adaptation (Yang, Wang, van de Weijer, Herranz, Jui;
NeurIPS 2022).

Algorithm (official code, Albert0147/AaD_SFDA ``tar_adaptation.py``), per target batch of the adaptation epochs:
  1. forward the whole model in train mode: features f, softmax predictions p;
  2. write the L2-normalised features and p into the feature and score banks at the batch's slots;
  3. for each sample, its K nearest neighbours by cosine similarity in the feature bank (itself excluded);
  4. loss = -mean_i sum_{k in C_i} <p_i, s_k>           (attract: agree with the neighbours' banked predictions)
           + lambda * mean_i sum_{j in batch, j != i} <p_i, p_j>   (disperse: disagree with the rest of the batch),
     lambda = alpha * (1 + 10 * iter / max_iter) ** (-beta);
  5. one SGD step (momentum 0.9, Nesterov, weight decay 1e-3), lr = lr0 * (1 + 10 * iter / max_iter) ** (-0.75),
     backbone at 0.1 x lr, the classifier at 1 x lr.
Defaults are the code's VisDA-C ones: K = 5, alpha = 1, beta = 5, lr 1e-3, batch 64.

Choices where the engine differs from the official loop, and why:
- Sample identity: the banks are indexed by slots recovered from the images (:class:`common.banks.SampleBank`),
  which on the ``sfda`` stream equal data-set indices from the second epoch on; the official code indexes by
  data-set index. Bank start (``bank_init``): ``source`` (the default, as the official code) fills the whole bank
  before the first adapt segment with the source model in eval mode over that segment's images (one extra pass
  over the target, at the engine's ``segment_start``); ``lazy`` (the former behaviour) fills a sample's slot when it
  is first seen, and neighbours come from the filled slots only (in the first epoch, from the samples seen so
  far). Against the official code on the same images, order and model (benchmarks/aad_reference.py, 10000 images x
  3 epochs): ``source`` 100 % identical argmaxes after epochs 1 and 2, 99.99 % after 3 (errors equal to 0.01
  points); ``lazy`` 99.5 % (0.03 points).
- Schedule length: the official ``max_iter = max_epoch * len(loader)``. When ``max_iter`` is null (the default) it is
  read from the stream as LAE and CoSO read theirs, at the engine's ``segment_start`` of the first ``adapt`` segment:
  its batches of at least two samples (the ones that update; the code skips batches of one and still makes
  ``max_iter`` updates) times the ``num_epochs`` of its meta (the ``sfda`` stream's E; 1 if absent). So lambda and
  lr reach their final values at the last update of the last epoch (lr at ``iter = max_iter``; lambda, computed
  before the code's increment, at ``max_iter - 1``). Only ``adapt`` called outside the engine without ``max_iter``
  keeps lr and lambda constant (a warning is logged once).
- Parameter groups: our backbones have no bottleneck (the code's source models are SHOT's ResNet + bottleneck +
  weight-normed classifier); the final linear layer gets 1 x lr, every other parameter ``backbone_lr_mult`` x lr.
- BatchNorm runs in train mode during adaptation (batch statistics, running statistics updated), as in the code;
  ``predict`` (the eval segment) uses eval mode, as the code's evaluation does. Batches of one sample are only
  predicted (the code skips them).
- The attraction is written as a dot product; the code's ``F.kl_div`` form differs by a constant only.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import features_and_logits, last_linear
from ctta.errors import UnsupportedError
from ctta.hparams import Count, Momentum, NonNegative, Positive

from .base import Strategy, register
from .common.banks import SampleBank, batch_dispersion, decay, neighbour_attraction

log = logging.getLogger(__name__)


def head_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The final classifier's parameters: timm's ``get_classifier()``, else the last ``nn.Linear`` of the model."""
    net = getattr(model, "net", model)
    if hasattr(net, "get_classifier"):
        head = net.get_classifier()
        if isinstance(head, nn.Module):
            return list(head.parameters())
    last = last_linear(model)
    return list(last.parameters()) if last is not None else []


def sgd_groups(model: nn.Module, lr: float, backbone_lr_mult: float) -> List[Dict[str, Any]]:
    """AaD's two learning rates: the classifier at ``lr``, everything else at ``backbone_lr_mult * lr``."""
    head = {id(p) for p in head_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in head], "lr": lr * backbone_lr_mult},
              {"params": [p for p in params if id(p) in head], "lr": lr}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr0"] = g["lr"]
    return groups


@register
class AaD(Strategy):
    """Attract each sample's prediction to its K bank neighbours', disperse it from the rest of the batch."""

    name = "aad"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"sfda"})

    def __init__(self, model: nn.Module, lr: Positive = 1e-3, backbone_lr_mult: NonNegative = 0.1,
                 momentum: Momentum = 0.9, weight_decay: NonNegative = 1e-3, nesterov: bool = True, k: Count = 5,
                 alpha: NonNegative = 1.0, beta: NonNegative = 5.0, lr_gamma: NonNegative = 10.0,
                 lr_power: NonNegative = 0.75, max_iter: Optional[Count] = None, key_tol: NonNegative = 1e-3,
                 bank_init: Literal["source", "lazy"] = "source", seed: int = 0) -> None:
        super().__init__(model, seed)
        if not (hasattr(model, "features_and_logits")
                or (hasattr(model, "forward_features") and hasattr(model, "forward_head"))):
            raise UnsupportedError(f"{self.name} needs the backbone's penultimate features; {type(model).__name__} "
                                   f"has no features_and_logits / forward_features+forward_head")
        self.k, self.alpha, self.beta = int(k), float(alpha), float(beta)
        self.lr_gamma, self.lr_power = float(lr_gamma), float(lr_power)
        self.max_iter_given = int(max_iter) if max_iter is not None else None
        self.max_iter = self.max_iter_given  # inferred from the stream at the first adapt segment when None
        self.iteration = 0
        self.bank_init = str(bank_init)
        self._warned = False
        self.model.requires_grad_(True)
        self.optimizer = torch.optim.SGD(sgd_groups(self.model, lr, backbone_lr_mult), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay, nesterov=bool(nesterov) and momentum > 0)
        self.bank = SampleBank(tol=key_tol, seed=seed)
        self.remember_initial_state()

    # --- schedule length ------------------------------------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        """At the first ``adapt`` segment, ``max_iter`` = its updating batches x ``meta["num_epochs"]`` (if not given);
        with ``bank_init: source``, the bank filled by the source model over that segment (once, while empty)."""
        if getattr(segment, "kind", None) != "adapt":
            return
        if self.bank_init == "source" and int(self.bank.count) == 0:
            self.fill_bank(segment)
        if self.max_iter is not None:
            return
        meta = getattr(segment, "meta", None) or {}
        epochs = int(meta.get("num_epochs", 1))
        n, bs = int(segment.num_samples), max(int(segment.batch_size), 1)
        updates = n // bs + (1 if n % bs >= 2 else 0)  # a last batch of one sample is only predicted
        self.max_iter = max(epochs * updates, 1)
        log.info("%s: schedule length max_iter = %d (%d epoch(s) x %d batches)", self.name, self.max_iter, epochs,
                 updates)

    @torch.no_grad()
    def fill_bank(self, segment: Any) -> None:
        """The official bank start: every sample of ``segment`` with the current (source) model in eval mode."""
        device = next(self.model.parameters()).device
        self.model.eval()
        for x, _ in segment.batches(device):
            feats, logits = features_and_logits(self.model, x)
            slot = self.bank.slots(x)
            self.bank.write("features", slot, F.normalize(feats.float().flatten(1), dim=1))
            self.bank.write("scores", slot, logits.float().softmax(dim=1))
        log.info("%s: bank filled by the source model with %d samples", self.name, int(self.bank.count))

    # --- steps --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.model(x)

    def dispersion_weight(self) -> float:
        """lambda = alpha * (1 + 10 * iter / max_iter) ** (-beta)."""
        return self.alpha * decay(self.iteration, self.max_iter, self.beta)

    def attraction_targets(self, x: Tensor, slot: Tensor, index: Tensor, mask: Tensor) -> tuple:
        """Neighbour predictions to attract to (B x K x C) and their mask: AaD uses the score bank."""
        return self.bank.table("scores")[index], mask

    def adapt(self, x: Tensor) -> Tensor:
        if x.shape[0] < 2:  # a batch of one: BatchNorm cannot train on it and there is nothing to disperse from
            return self.predict(x)
        if self.max_iter is None and not self._warned:
            log.warning("%s: schedule length unknown (adapt called outside the engine, no max_iter), so lr and the "
                        "dispersion weight are not decayed; set max_iter = epochs x batches per epoch", self.name)
            self._warned = True
        weight = self.dispersion_weight()
        scale = decay(self.iteration + 1, self.max_iter, self.lr_power, self.lr_gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr0"] * scale
        self.model.train()
        with torch.enable_grad():
            feats, logits = features_and_logits(self.model, x)
            probs = logits.float().softmax(dim=1)
            with torch.no_grad():
                f_norm = F.normalize(feats.detach().float().flatten(1), dim=1)
                slot = self.bank.slots(x)
                self.bank.write("features", slot, f_norm)
                self.bank.write("scores", slot, probs.detach())
                index, mask = self.bank.neighbours(f_norm, slot, self.k)
                targets, mask = self.attraction_targets(x, slot, index, mask)
            loss = neighbour_attraction(probs, targets, mask) + weight * batch_dispersion(probs)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.iteration += 1
        return logits.detach()

    # --- state --------------------------------------------------------------------------------------------------
    def extra_state(self) -> Any:
        return {"iteration": self.iteration, "max_iter": self.max_iter}

    def load_extra_state(self, state: Any) -> None:
        state = state or {}
        self.iteration = int(state.get("iteration", 0))
        self.max_iter = state.get("max_iter", self.max_iter_given)
