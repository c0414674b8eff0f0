"""Online Elastic Weight Consolidation (online EWC / EWC-on).

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017 (arXiv 1612.00796); the
online form of Schwarz, Luketina, Czarnecki, Grabska-Barwinska, Teh, Pascanu, Hadsell, "Progress & Compress: A
scalable framework for continual learning", ICML 2018 (arXiv 1805.06370). Reference code:
github.com/aimagelab/mammoth@e75a491 (``models/ewc_on.py`` ``EwcOn``); hyperparameters from its
``models/config/ewc_on.yaml`` (seq-cifar10), see ``configs/strategies/ewc.yaml``.

The algorithm, per session ``t``:

1. train on the session's batches with ``CE(f(x), y) + lambda / 2 * sum_i F_i (theta_i - theta*_i)**2``
   (no penalty before the first session ends);
2. at the end of the session: the diagonal Fisher of the session's data ``F_t = mean_x p(y|x) (d log p(y|x) /
   d theta)**2`` (one image at a time, ``strategies/common/fisher.py`` ``per_sample_fisher``), accumulated
   online ``F <- gamma * F + F_t``, and the anchor ``theta* <- theta``.

As the reference: the Fisher is computed over one pass of the session's images (the first epoch of the segment),
each image alone through the network in train mode (``fisher_mode: train``: BatchNorm normalises the image with
its own statistics and its running statistics are updated by each image, which the next evaluation then uses;
``eval`` keeps them), weighted by the label's likelihood (``likelihood_weighted``; false: the empirical Fisher),
and divided by the number of batches times the batch size (the number of images when the batches are full); a
fresh SGD per session. Mammoth writes its penalty ``e_lambda * sum F (theta - theta*)**2`` (its gradient
``2 e_lambda F (theta - theta*)``), so ``lambda = 2 e_lambda``. As the reference, the training cross-entropy and
the Fisher's log-likelihood cover every output: no seen-class mask enters them (``mask_unseen`` masks the
predictions only, as for ER-ACE and DER). The penalty is ``common/fisher.py``'s ``fisher_penalty``; its
``DiagonalFisher`` (a (1 - decay) running average of batch squared gradients) and ``source_fisher`` (squared batch
gradients of the cross-entropy against the argmax) are other estimates, not this per-image, likelihood-weighted
sum folded in with ``F <- gamma F + F_t``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, Literal, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.hparams import Momentum, NonNegative, Positive, Unit

from .base import register
from .common.fisher import fisher_penalty, per_sample_fisher
from .finetune import Finetune

log = logging.getLogger(__name__)


@register
class EWC(Finetune):
    """Fine-tuning with online EWC's quadratic penalty towards the weights at the end of the last session."""

    name = "ewc"
    settings = frozenset({"class_incremental", "few_shot_class_incremental", "online_class_incremental",
                          "domain_incremental"})

    def __init__(self, model: nn.Module, lr: Positive = 0.1, momentum: Momentum = 0.0,
                 weight_decay: NonNegative = 0.0, ewc_lambda: NonNegative = 20.0, gamma: Unit = 1.0,
                 fisher_mode: Literal["train", "eval"] = "train", likelihood_weighted: bool = True,
                 mask_unseen: bool = True, seed: int = 0) -> None:
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, mask_unseen=mask_unseen,
                         seed=seed)
        self.ewc_lambda = float(ewc_lambda)
        self.gamma = float(gamma)
        self.fisher_mode = fisher_mode
        self.likelihood_weighted = bool(likelihood_weighted)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        for i, (n, p) in enumerate((n, p) for n, p in self.model.named_parameters() if p.requires_grad):
            self.register_buffer(f"fisher_{i}", torch.zeros_like(p).detach())
            self.register_buffer(f"anchor_{i}", p.detach().clone())
        self.register_buffer("consolidated", torch.zeros((), dtype=torch.bool))
        self._consolidated = False  # host copy of ``consolidated`` (no sync per step)
        self._fisher_session = -1  # the session the last Fisher came from (for the warning in end_session)
        self.remember_initial_state()

    # --- state ----------------------------------------------------------------------------------------------
    def fisher(self) -> Dict[str, Tensor]:
        """The accumulated diagonal Fisher per parameter name."""
        return {n: getattr(self, f"fisher_{i}") for i, n in enumerate(self.names)}

    def anchor(self) -> Dict[str, Tensor]:
        """theta*: the weights at the end of the last consolidated session."""
        return {n: getattr(self, f"anchor_{i}") for i, n in enumerate(self.names)}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        self._consolidated = bool(self.consolidated)
        self._fisher_session = self.sessions.session if self._consolidated else -1

    # --- training -------------------------------------------------------------------------------------------
    def penalty(self) -> Tensor:
        """``lambda / 2 * sum_i F_i (theta_i - theta*_i)**2`` (zero at the anchor)."""
        params = dict(self.model.named_parameters())
        return self.ewc_lambda / 2 * fisher_penalty(params, self.anchor(), self.fisher())

    def begin_session(self, session: int) -> None:
        self.optimizer.state.clear()  # a fresh SGD per session, as Mammoth's meta_begin_task

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """One SGD step on the cross-entropy over every output plus, once a session was consolidated, the penalty;
        returns the step's logits (masked as predictions are)."""
        self.model.train()
        with torch.enable_grad():
            z = self.model(x)
            loss = F.cross_entropy(z, y)
            if self._consolidated:
                loss = loss + self.penalty()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return self.mask(z.detach())

    # --- consolidation at the session's end -----------------------------------------------------------------
    def segment_end(self, segment: Any) -> None:
        """At the end of a ``train`` segment: the Fisher of its first epoch, folded in, and the new anchor."""
        if getattr(segment, "kind", None) == "train" and self.sessions.in_session:
            self.consolidate(segment)
        super().segment_end(segment)

    def consolidate(self, segment: Any) -> None:
        """Online EWC's end of session on ``segment``'s images (one epoch): F <- gamma F + F_t, theta* <- theta."""
        epochs = max(int((getattr(segment, "meta", None) or {}).get("epochs", 1)), 1)
        per_epoch = max(int(segment.num_samples) // epochs, 1)
        device = next(self.model.parameters()).device

        def first_epoch() -> Iterator[Tuple[Tensor, Tensor]]:
            left = per_epoch
            for x, y in segment.batches(device):
                if left <= 0:
                    return
                yield x[:left], y[:left]
                left -= x.shape[0]

        self.model.train(self.fisher_mode == "train")
        sums, _, batches = per_sample_fisher(self.model, first_epoch(), likelihood_weighted=self.likelihood_weighted)
        self.model.eval()
        divisor = batches * int(segment.batch_size)  # Mammoth: len(train_loader) * batch_size
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for i, n in enumerate(self.names):
                fisher, new = getattr(self, f"fisher_{i}"), sums[n] / divisor
                if self._consolidated:
                    fisher.mul_(self.gamma).add_(new)
                else:
                    fisher.copy_(new)
                getattr(self, f"anchor_{i}").copy_(params[n])
        self.consolidated.fill_(True)
        self._consolidated = True
        self._fisher_session = self.sessions.session

    def end_session(self, session: int) -> None:
        if self._fisher_session != session:
            log.warning("ewc: session %d ended without its segment (learn called outside the engine?): no Fisher "
                        "from it; call consolidate(segment) before the session ends", session)
