"""VTE: Vision-Text-Space Ensemble (Döbler, Marsden, Raichle, Yang, "A Lost Opportunity for Vision-Language Models: A
Comparative Study of Online Test-Time Adaptation for Vision-Language Models", arXiv 2405.14977).

Single-sample, nothing is learned, on a CLIP backbone (its zero-shot head: the prompt ensemble of its templates).
Per test image x:
  1. views: x itself plus ``n_views - 1`` random views (``strategies/common/confident_views.py``: crop + flip, AugMix
     on top when ``augmix``), drawn at once on the device;
  2. zero-shot logits of every view; keep the ``selection_p`` share of lowest softmax entropy (as TPT);
  3. average the kept views' L2-normalised image features (not re-normalised) and predict
     exp(logit_scale) * mean @ text^T.

Reference: mariodoebler/test-time-adaptation@8b2ed63 (``classification/methods/vte.py``; ``models/model.py``
``ZeroShotCLIP`` with ``CLIP.PROMPT_MODE ensemble``: the data set's CLIP templates, e.g. ``datasets/prompts.py``
``cifar10_templates``, ``imagenet_templates``; ``cfgs/imagenet_c/vte.yaml``: batch 1, 64 views; ``conf.py``
``TPT.SELECTION_P`` 0.1). Templates are the backbone's ``templates`` option here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import UnsupportedError
from ctta.hparams import Count, Unit

from .base import Strategy, register
from .common.confident_views import select_confident, views_with_original


@register
class VTE(Strategy):
    """Per image: average the image features of its most confident views, predict with CLIP's zero-shot head."""

    name = "vte"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})
    plugin_refusal = "it needs the CLIP model itself (its zero-shot head), not a wrapped one"

    def __init__(self, model: nn.Module, n_views: Count = 64, selection_p: Unit = 0.1, augmix: bool = False,
                 seed: int = 0) -> None:
        super().__init__(model, seed)
        from ctta.backbones.clip import CLIPZeroShot

        net = getattr(model, "net", model)
        if not isinstance(net, CLIPZeroShot):
            raise UnsupportedError(f"vte needs a CLIP backbone (--backbone clip), got "
                                   f"{getattr(model, 'name', type(net).__name__)!r}")
        self.model.eval().requires_grad_(False)
        self.n_views, self.selection_p, self.augmix = int(n_views), float(selection_p), bool(augmix)
        self._net = [net]
        self.remember_initial_state()

    def _episode(self, x: Tensor) -> Tensor:
        """One image (1 x C x H x W): its views' confident feature mean through the zero-shot head."""
        net = self._net[0]
        views = views_with_original(x, self.n_views, self.generator(x.device), self.augmix)
        f = F.normalize(self.model.forward_features(views), dim=-1)
        logits = net.logit_scale.exp() * f @ net.text_features.to(f.dtype).t()
        mean = f[select_confident(logits, self.selection_p)].mean(dim=0, keepdim=True)
        return net.logit_scale.exp() * mean @ net.text_features.to(f.dtype).t()

    @torch.no_grad()
    def adapt(self, x: Tensor) -> Tensor:
        return torch.cat([self._episode(x[i:i + 1]) for i in range(len(x))])


__all__ = ["VTE"]
