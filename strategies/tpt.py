"""TPT: test-time prompt tuning (Shu, Nie, Huang, Yu, Goldstein, Anandkumar, Xiao, "Test-Time Prompt Tuning for
Zero-Shot Generalization in Vision-Language Models", NeurIPS 2022, arXiv 2209.07987).

Single-sample and episodic, on a CLIP backbone (``--backbone clip`` with ``keep_text=true``). Per test image x:
  1. views: x itself plus ``n_views - 1`` random views of it, all drawn at once on the device
     (``strategies/common/confident_views.py``, ``augmix.py``): random crop (32 px: 4-pixel padding; else
     RandomResizedCrop) + flip, and AugMix on top when ``augmix`` (the reference's "generalization" sets:
     ImageNet-A/R/V2/Sketch and the like);
  2. image features of the views (frozen image tower, computed once), L2-normalised;
  3. logits = exp(logit_scale) * f @ t(ctx)^T with t(ctx) the class text features of the learnable prompt context
     ctx (``strategies/common/prompts.py``, initialised from "a photo of a");
  4. confidence selection: the ``selection_p`` share (int(n_views * p)) of views of lowest softmax entropy;
  5. loss = entropy of their averaged prediction (MEMO's marginal entropy: log-mean-exp of the log-probabilities);
     ``steps`` AdamW steps on ctx only (the views selected at the first step are kept);
  6. predict x (the first view) with the tuned prompt; then ctx and the optimiser state go back to the start.

Reference: mariodoebler/test-time-adaptation@8b2ed63 (``classification/methods/tpt.py``; ``models/custom_clip.py``
``ClipTestTimePromptTuning`` / ``PromptLearner`` / ``TextEncoder``, after azshue/TPT; ``conf.py`` ``_C.TPT``:
SELECTION_P 0.1, CTX_INIT a_photo_of_a, CLASS_TOKEN_POS end; ``cfgs/imagenet_*/tpt.yaml``: AdamW lr 5e-3, beta
0.9, wd 0.01, 1 step, batch 1, 64 views, episodic; ``datasets/data_loading.py``: the original view first, then
``n_views - 1`` AugMixAugmenter views). The engine's batches are handled image by image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.hparams import Count, Momentum, NonNegative, Unit

from .base import Strategy, register
from .common.confident_views import select_confident, views_with_original
from .common.prompts import PromptLearner, clip_text_tower
from .memo import marginal_entropy


@register
class TPT(Strategy):
    """Per image: tune CLIP's prompt context on its most confident views' average entropy, predict it, reset."""

    name = "tpt"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})
    plugin_refusal = "it needs the CLIP model itself (its text tower), not a wrapped one"

    def __init__(self, model: nn.Module, n_views: Count = 64, selection_p: Unit = 0.1, augmix: bool = False,
                 ctx_init: str = "a photo of a", lr: NonNegative = 5e-3, beta: Momentum = 0.9,
                 weight_decay: NonNegative = 0.01, steps: Count = 1, seed: int = 0) -> None:
        super().__init__(model, seed)
        net = clip_text_tower(model, "tpt")
        self.model.eval().requires_grad_(False)
        self.n_views, self.selection_p, self.augmix, self.steps = int(n_views), float(selection_p), bool(augmix), \
            int(steps)
        self.prompt = PromptLearner(net.text, net.tokenizer, net.class_names, ctx_init)
        self.optimizer = torch.optim.AdamW([self.prompt.ctx], lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
        self._net = [net]
        self.remember_initial_state()

    def image_features(self, x: Tensor) -> Tensor:
        """L2-normalised image embeddings of images in [0, 1] (the backbone's normalisation applied)."""
        return F.normalize(self.model.forward_features(x), dim=-1)

    def logits(self, f: Tensor, text: Tensor) -> Tensor:
        return self._net[0].logit_scale.exp() * f @ text.t()

    def _episode(self, x: Tensor) -> Tensor:
        """One image (1 x C x H x W): tune the prompt on its views, predict it, reset; returns its logits."""
        views = views_with_original(x, self.n_views, self.generator(x.device), self.augmix)
        with torch.no_grad():
            f = self.image_features(views)
        keep = None
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self.logits(f, self.prompt())
                if keep is None:
                    keep = select_confident(logits.detach(), self.selection_p)
                self.optimizer.zero_grad(set_to_none=True)
                marginal_entropy(logits[keep]).backward()
                self.optimizer.step()
        with torch.no_grad():
            out = self.logits(f[:1], self.prompt())
        self.prompt.reset()
        self.optimizer.state.clear()
        return out

    def adapt(self, x: Tensor) -> Tensor:
        return torch.cat([self._episode(x[i:i + 1]) for i in range(len(x))])

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Zero-shot CLIP with the initial prompt (TPT keeps no state between images)."""
        return self.logits(self.image_features(x), self.prompt())


__all__ = ["TPT"]
