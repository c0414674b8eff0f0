"""FSA: First Session Adaptation (Panos, Kobe, Reino, Aljundi, Turner; ICCV 2023; github.com/aresPanos/fsa).

Adapt the body only in the first session, then freeze it; the head is linear discriminant analysis with a shared
covariance, updated exactly and incrementally from running per-class sums, counts and the global second moment
(``strategies/common/lda.py``): no stored features and no replay after the first session.

First session (``mode``): ``full`` fine-tunes the whole body (FSA), ``film`` trains only per-channel scale and shift
after each norm layer with the body in eval mode (FSA-FiLM, the few-shot variant; ``ctta.backbones.peft.add_film``),
``frozen`` adapts nothing (LDA on the given features). A linear head over the seen classes is trained with it
(Adam, dropout before the head, as the official code); its data is kept until the session ends and then passed once
through the frozen body into the LDA statistics (the official code trains several epochs on it, so it is at hand).
The session ends at the first prediction step after it (see ``common/incremental.py``).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import penultimate_features
from ctta.backbones.peft import add_film, freeze, head_parameter_names
from ctta.hparams import Count, NonNegative, NonNegInt, Positive, Unit

from .base import register
from .common.incremental import IncrementalStrategy, num_outputs
from .common.lda import IncrementalLDA
from .common.replay import GrowingStore


@register
class FSA(IncrementalStrategy):
    """First-session body adaptation, then a frozen body with an incremental LDA head."""

    name = "fsa"

    def __init__(self, model: nn.Module, mode: Literal["full", "film", "frozen"] = "full", lr: Positive = 0.005,
                 weight_decay: NonNegative = 0.0, dropout: Unit = 0.5, ridge: NonNegative = 1.0,
                 shrinkage: Unit = 0.0, covariance: Literal["total", "within"] = "total", ddof: NonNegInt = 1,
                 priors: bool = False, feature_batch_size: Count = 256, seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        self.mode = mode
        self.dropout = float(dropout)
        self.feature_batch_size = int(feature_batch_size)
        self.lda = IncrementalLDA(getattr(model, "feature_dim", None), num_outputs(model), covariance=covariance,
                                  ridge=ridge, shrinkage=shrinkage, ddof=ddof, priors=priors)
        self.first = GrowingStore()  # the first session's data, until the body is frozen
        self.body_frozen = mode == "frozen"
        if mode == "film":
            add_film(self.model)
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
