"""FSA: First Session Adaptation (Panos, Kobe, Reino, Aljundi, Turner; ICCV 2023; github.com/aresPanos/fsa).

Adapt the body only in the first session, then freeze it; the head is linear discriminant analysis with a shared
covariance, updated exactly and incrementally from running per-class sums, counts and the global second moment
(``strategies/common/lda.py``): no stored features and no replay after the first session.

First session (``mode``): ``full`` fine-tunes the whole body (FSA), ``film`` trains only per-channel scale and shift
(FiLM, init 1 / 0) with the body in eval mode (FSA-FiLM, the few-shot variant; ``ctta.backbones.peft.add_film``),
``frozen`` adapts nothing (LDA on the given features).

FiLM placement (``film_layers``): ``auto`` puts it where the official EfficientNet code does
(aresPanos/fsa ``src/cnn/efficientnet.py`` ``FilmEfficientNet``: after the stem BN, each block's depthwise-conv BN
and the head BN, before their swish; :func:`ctta.backbones.peft.efficientnet_film_layers` names those layers of a
timm EfficientNet) and, on any other backbone, after every norm layer (the official placement is defined for
EfficientNet only; a log line says so); ``all`` is after every norm layer on any backbone. A norm layer with a fused
activation (timm's ``BatchNormAct2d``) is modulated before the activation.

A linear head over the seen classes is trained with the body (Adam, dropout before the head, as the official code);
the first session's data is kept until the session ends and then passed once through the frozen body into the LDA
statistics (the official code trains several epochs on it, so it is at hand).
The session ends at the first prediction step after it (see ``common/incremental.py``).
"""
from __future__ import annotations

import logging
from typing import Any, List, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import penultimate_features
from ctta.backbones.peft import add_film, efficientnet_film_layers, freeze, head_parameter_names
from ctta.hparams import Count, NonNegative, NonNegInt, Positive, Unit

from .base import register
from .common.incremental import IncrementalStrategy, num_outputs
from .common.lda import IncrementalLDA
from .common.replay import GrowingStore

log = logging.getLogger(__name__)


@register
class FSA(IncrementalStrategy):
    """First-session body adaptation, then a frozen body with an incremental LDA head."""

    name = "fsa"

    def __init__(self, model: nn.Module, mode: Literal["full", "film", "frozen"] = "full", lr: Positive = 0.005,
                 weight_decay: NonNegative = 0.0, dropout: Unit = 0.5, ridge: NonNegative = 1.0,
                 shrinkage: Unit = 0.0, covariance: Literal["total", "within"] = "total", ddof: NonNegInt = 1,
                 priors: bool = False, feature_batch_size: Count = 256,
                 film_layers: Literal["auto", "all"] = "auto", seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        self.mode = mode
        self.dropout = float(dropout)
        self.feature_batch_size = int(feature_batch_size)
        self.lda = IncrementalLDA(getattr(model, "feature_dim", None), num_outputs(model), covariance=covariance,
                                  ridge=ridge, shrinkage=shrinkage, ddof=ddof, priors=priors)
        self.first = GrowingStore()  # the first session's data, until the body is frozen
        self.body_frozen = mode == "frozen"
        self.film_layers = film_layers
        self.film_names: List[str] = []
        if mode == "film":
            self.film_names = self._add_film(film_layers)
            trainable = freeze(self.model, except_=head_parameter_names(self.model), peft=True)
        elif mode == "full":
            trainable = [n for n, _ in self.model.named_parameters()]
            self.model.requires_grad_(True)
        else:
            trainable = []
            freeze(self.model)
        params = [p for n, p in self.model.named_parameters() if n in set(trainable)]
        self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if params else None
        self.model.eval()
        self.remember_initial_state()

    def _add_film(self, placement: str) -> List[str]:
        """FiLM on the official EfficientNet layers (``auto`` on a timm EfficientNet) or on every norm layer; returns
        the names of the modulated layers."""
        names = efficientnet_film_layers(self.model) if placement == "auto" else None
        if names is None:
            if placement == "auto":
                log.info("fsa: the official FiLM placement is defined for EfficientNet only; %s holds no timm "
                         "EfficientNet, so FiLM goes after every norm layer", type(self.model).__name__)
            films = {id(f) for f in add_film(self.model)}
            return [n for n, m in self.model.named_modules() if id(m) in films]
        wanted = set(names)
        films = add_film(self.model, select=lambda n, m: n in wanted)
        if len(films) != len(names):
            raise RuntimeError(f"fsa: FiLM placed on {len(films)} of the {len(names)} EfficientNet norm layers")
        log.info("fsa: FiLM after the EfficientNet stem BN, %d depthwise-conv BNs and the head BN (official placement)",
                 len(names) - 2)
        return names

    # --- features and heads -------------------------------------------------------------------------------------
    @torch.no_grad()
    def frozen_features(self, x: Tensor) -> Tensor:
        self.model.eval()
        return penultimate_features(self.model, x)

    def logits(self, x: Tensor) -> Tensor:
        if self.body_frozen:
            return self.lda(self.frozen_features(x))
        self.model.eval()
        return self.model(x)

    # --- learning -------------------------------------------------------------------------------------------------
    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        if self.body_frozen:
            f = self.frozen_features(x)
            out = self.mask(self.lda(f))
            self.lda.update(f, y)
            return out
        self.model.train(self.mode == "full")  # FSA-FiLM keeps the body (its norm statistics) in eval mode
        with torch.enable_grad():
            f = penultimate_features(self.model, x)
            logits = self.mask(self.model.forward_head(F.dropout(f, self.dropout, training=True)))
            F.cross_entropy(logits, y).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.first.add(x, y)
        return logits.detach()

    def end_session(self, session: int) -> None:
        if not self.body_frozen:
            self.freeze_body()

    def freeze_body(self) -> None:
        """Freeze the body (and its norm statistics), and pass the first session's data once into the LDA."""
        freeze(self.model)
        self.model.eval()
        self.body_frozen = True
        x, y = self.first.items()
        for i in range(0, x.shape[0], self.feature_batch_size):
            self.lda.update(self.frozen_features(x[i:i + self.feature_batch_size]), y[i:i + self.feature_batch_size])
        self.first.clear()

    def extra(self) -> Any:
        return {"body_frozen": self.body_frozen, "first": self.first.state()}

    def load_extra(self, state: Any) -> None:
        if not state:
            return
        self.first.load_state(state.get("first"))
        self.body_frozen = bool(state.get("body_frozen"))
        if self.body_frozen:
            freeze(self.model)
        elif self.mode == "full":
            self.model.requires_grad_(True)
