"""AdaContrast: contrastive test-time adaptation (Chen, Wang, Li, Schmid, "Contrastive Test-Time Adaptation", CVPR 2022,
arXiv 2204.10377; code github.com/DianCh/AdaContrast).

Followed as the reference benchmark has it: mariodoebler/test-time-adaptation@8b2ed63, ``classification/methods/
adacontrast.py`` (views: ``augmentations/transforms_adacontrast.py``, "twss" with "moco-v2-light"; defaults ``conf.py``
``_C.ADACONTRAST``, ``_C.CONTRAST``, ``_C.M_TEACHER`` and ``cfgs/*/adacontrast.yaml``). Per test batch x:
  1. views: weak w (flip), strong q and k (jitter, grey, blur, flip), drawn per image on the device (the reference
     makes them in its data loader);
  2. query encoder (the model, train mode) on w: features f_w, probabilities p_w; pseudo-labels y = argmax p_w for
     the first ``refine_after`` samples, afterwards the soft k-NN vote: the mean banked probabilities of the
     ``num_neighbors`` bank features nearest to f_w by cosine distance, argmax;
  3. query encoder on q: logits z_q, normalised features q; key encoder <- m key + (1 - m) query (all parameters),
     then normalised key features k of view k (key encoder, train mode, no gradient);
  4. InfoNCE logits [q.k, q.queue] / T; the keys and y enqueued (FIFO of ``queue_size``); negatives whose queued
     label equals y masked (class-aware; the mask reads the queue after the enqueue, as the code);
  5. loss = alpha CE(z_q, y) + beta InfoNCE + eta sum_c pbar_c log pbar_c (pbar: batch mean of softmax z_q);
     one SGD step (Nesterov) on all parameters;
  6. key encoder on w (train mode): features and probabilities appended to the bank (FIFO once ``queue_size`` full);
  7. the prediction: the updated query encoder in eval mode on x.
Defaults: CIFAR-10-C / CIFAR-100-C (SGD lr 2e-4, momentum 0.9, wd 1e-4, Nesterov; T 0.07; m 0.999; queue 16384;
10 neighbours; alpha = beta = eta = 1); ImageNet-C differs only in batch size (64) and in its strong view
(``moco-v2``, with a random resized crop), which is not implemented here.
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.classifier import features_and_logits, last_linear
from ctta.hparams import Count, Momentum, NonNegative, NonNegInt, Positive, Unit

from .base import Strategy, register
from .common.banks import knn_indices
from .common.incremental import num_outputs
from .common.ema import ensemble_with_source_, frozen_copy
from .common.moco_views import strong_view, weak_view


def soft_knn_vote(feats: Tensor, bank_feats: Tensor, bank_probs: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """AdaContrast's refined pseudo-labels: the mean banked probabilities of the k cosine-nearest bank rows, argmax."""
    idx, _ = knn_indices(F.normalize(feats, dim=1), F.normalize(bank_feats, dim=1), k)
    probs = bank_probs[idx].mean(1)
    return probs.argmax(1), probs


def diversity(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Negative entropy of the batch-mean prediction (minimised: predictions spread over the classes)."""
    mean = logits.softmax(1).mean(0)
    return (mean * torch.log(mean + eps)).sum()


def class_aware_infonce(logits_ins: Tensor, labels: Tensor, queue_labels: Tensor) -> Tensor:
    """InfoNCE with the positive in column 0; negatives whose queued label equals the sample's masked to -inf."""
    mask = torch.ones_like(logits_ins, dtype=torch.bool)
    mask[:, 1:] = labels.view(-1, 1) != queue_labels
    masked = torch.where(mask, logits_ins, torch.full_like(logits_ins, float("-inf")))
    return F.cross_entropy(masked, torch.zeros(len(labels), dtype=torch.long, device=labels.device))


@register
class AdaContrast(Strategy):
    """Momentum-encoder contrast with a key queue, pseudo-labels refined by a soft k-NN vote over a feature bank."""

    name = "adacontrast"

    def __init__(self, model: nn.Module, lr: Positive = 2e-4, momentum: Momentum = 0.9, weight_decay: NonNegative = 1e-4,
                 nesterov: bool = True, queue_size: Count = 16384, ema_momentum: Unit = 0.999,
                 temperature: Positive = 0.07, num_neighbors: Count = 10, refine_after: NonNegInt = 1024,
                 alpha: NonNegative = 1.0, beta: NonNegative = 1.0, eta: NonNegative = 1.0,
                 contrast_type: Literal["class_aware", "nearest"] = "class_aware", seed: int = 0) -> None:
        super().__init__(model, seed)
        self.queue_size, self.m, self.T = int(queue_size), float(ema_momentum), float(temperature)
        self.k, self.refine_after = int(num_neighbors), int(refine_after)
        self.alpha, self.beta, self.eta, self.contrast_type = float(alpha), float(beta), float(eta), contrast_type
        self.model.requires_grad_(True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.key_encoder = frozen_copy(self.model)
        dim = int(model.feature_dim) if hasattr(model, "feature_dim") else int(last_linear(model).in_features)
        classes = num_outputs(model)
        gen = torch.Generator().manual_seed(seed)  # the queue's random start (the code: torch.randn / randint)
        self.register_buffer("queue_feats", F.normalize(torch.randn(dim, self.queue_size, generator=gen), dim=0))
        self.register_buffer("queue_labels", torch.randint(0, classes, (self.queue_size,), generator=gen))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_feats", torch.zeros(0, dim))
        self.register_buffer("bank_probs", torch.zeros(0, classes))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # samples pseudo-labelled by plain argmax
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                         nesterov=bool(nesterov) and momentum > 0)
        self.remember_initial_state()

    # --- the views (the reference's data loader) ------------------------------------------------------------------
    def views(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(weak, strong query, strong key) views of x, each image drawn on its own from the strategy's generator."""
        g = self.generator(x.device)
        return weak_view(x, g), strong_view(x, g), strong_view(x, g)

    # --- queue and bank ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor) -> None:
        """FIFO: the keys and their pseudo-labels overwrite the oldest queue columns."""
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % self.queue_size
        self.queue_feats[:, idx] = keys.t()
        self.queue_labels[idx] = labels
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % self.queue_size)

    @torch.no_grad()
    def update_bank(self, feats: Tensor, probs: Tensor) -> None:
        """Append rows until the bank holds ``queue_size`` or more, then overwrite the oldest (the code's ring)."""
        n = self.bank_feats.shape[0]
        if n < self.queue_size:
            self.bank_feats = torch.cat([self.bank_feats, feats])
            self.bank_probs = torch.cat([self.bank_probs, probs])
        else:
            idx = (self.bank_ptr + torch.arange(len(feats), device=feats.device)) % n
            self.bank_feats[idx], self.bank_probs[idx] = feats, probs
        self.bank_ptr.copy_((self.bank_ptr + len(feats)) % self.bank_feats.shape[0])

    @torch.no_grad()
    def pseudo_labels(self, feats_w: Tensor, logits_w: Tensor) -> Tensor:
        """Argmax for the first ``refine_after`` samples, then the soft k-NN vote over the bank."""
        if int(self.seen) >= self.refine_after:
            return soft_knn_vote(feats_w, self.bank_feats, self.bank_probs, self.k)[0]
        self.seen += len(feats_w)
        return logits_w.argmax(1)

    # --- the step ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """The query encoder's logits in eval mode (running BatchNorm statistics), as the code's final output."""
        self.model.eval()
        return self.model(x)

    def adapt(self, x: Tensor) -> Tensor:
        """One AdaContrast update on x's views, then the updated model's eval-mode prediction on x."""
        weak, im_q, im_k = self.views(x)
        self.update(weak, im_q, im_k)
        return self.predict(x)

    def update(self, weak: Tensor, im_q: Tensor, im_k: Tensor) -> Tensor:
        """Steps 2-6 on given views; returns the loss."""
        self.model.train(), self.key_encoder.train()
        with torch.enable_grad():
            feats_w, logits_w = features_and_logits(self.model, weak)
            labels = self.pseudo_labels(feats_w.detach(), logits_w.detach())
            feats_q, logits_q = features_and_logits(self.model, im_q)
            q = F.normalize(feats_q, dim=1)
            with torch.no_grad():
                ensemble_with_source_(list(self.key_encoder.parameters()), [p.detach() for p in self.model.parameters()],
                                      self.m)
                k = F.normalize(features_and_logits(self.key_encoder, im_k)[0], dim=1)
            l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
            l_neg = torch.einsum("nc,ck->nk", [q, self.queue_feats.clone()])
            logits_ins = torch.cat([l_pos, l_neg], dim=1) / self.T
            self.enqueue(k, labels)
            if self.contrast_type == "class_aware":
                loss_ins = class_aware_infonce(logits_ins, labels, self.queue_labels)
            else:
                loss_ins = F.cross_entropy(logits_ins, torch.zeros(len(labels), dtype=torch.long, device=q.device))
            loss = self.alpha * F.cross_entropy(logits_q, labels) + self.beta * loss_ins
            if self.eta > 0:
                loss = loss + self.eta * diversity(logits_q)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        with torch.no_grad():
            feats, logits = features_and_logits(self.key_encoder, weak)
            self.update_bank(feats, logits.softmax(1))
        return loss.detach()

    # --- checkpoints: the bank has the size it had when saved ------------------------------------------------------
    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Resize the bank buffers to the saved ones, then load as usual."""
        module = state["module"]
        self.bank_feats = torch.zeros_like(module["bank_feats"], device=self.bank_feats.device)
        self.bank_probs = torch.zeros_like(module["bank_probs"], device=self.bank_probs.device)
        super().load_checkpoint_state(state)

