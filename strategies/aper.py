"""APER (formerly ADAM): adapt the pretrained model in the first session, then classify with prototypes of the
concatenated [pretrained, adapted] features.

Zhou, Cai, Ye, Zhan; "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need" (IJCV 2024, arXiv 2303.07338). Reference code: the official zhoudw-zdw/RevisitingCIL
@ a2e6b71 (``models/aper_adapter.py``, ``aper_ssf.py``, ``aper_vpt.py``, ``aper_finetune.py``; ``utils/inc_net.py``
``SimpleVitNet`` / ``MultiBranchCosineIncrementalNet``; ``convs/vision_transformer_adapter.py``,
``vision_transformer_ssf.py``, ``vpt.py``; ``exps/aper_*/cifar224_5_5_*.json``) and its port in LAMDA-PILOT
@ 2647455 (``models/aper_*.py``, ``backbone/vit_adapter.py``, ``vit_ssf.py``, ``vpt.py``, ``exps/aper_*.json``). The
two learners and backbones are the same code (diffed); they differ only in the ``exps`` hyperparameters, and we
follow the official ones (they produced the paper's numbers; ``configs/strategies/aper.yaml`` lists both).

Algorithm (per session t):

1. session 0 only: tune the PEFT parameters of ``variant`` on the session's classes with a cosine head
   (sigma learnable), cross-entropy, SGD (momentum 0.9), learning rate cosine-annealed per epoch to ``min_lr``
   (``common/first_session.py``, shared with RanPAC). Variants: ``adapter`` (AdaptFormer beside each MLP:
   bottleneck 64, ReLU, dropout 0.1, scale 0.1), ``ssf`` (scale & shift after the patch projection, every block's
   norms, qkv, proj, fc1, fc2 and the final norm), ``vpt_shallow`` / ``vpt_deep`` (``prompt_tokens`` zero-initialised
   tokens through all blocks / per block), ``finetune`` (every backbone weight but the classifier head). Then the
   adapted backbone is frozen for good.
2. the merged feature of an image is ``[phi_pretrained(x), phi_adapted(x)]`` (the pretrained model is a frozen
   copy taken before any PEFT was added): ``MultiBranchCosineIncrementalNet``.
3. prototypes: each new class's weight is the mean of the merged features of its training images (``replace_fc``;
   the first pass of the session, features of the frozen adapted model); earlier prototypes never change.
4. logits: ``scale * cos(merged feature, prototype_c)`` over the classes seen (the reference's ``CosineLinear`` of
   the dual-branch network starts at sigma 1 and is never trained).

``learn`` returns the training logits in session 0 and the prototype head's logits (before the batch's update)
afterwards. Memory: two backbones (the pretrained copy and the adapted one) and C x 2D prototype sums; session 0's
first-pass images are kept until it ends.
"""
from __future__ import annotations

from typing import Any, List, Literal

import torch
from torch import Tensor, nn

from ctta.backbones.classifier import penultimate_features
from ctta.backbones.peft import add_ssf, add_vpt, freeze, head_parameter_names, peft_parameters
from ctta.hparams import Count, Momentum, NonNegative, Positive, Unit

from .base import register
from .common.ema import frozen_copy
from .common.first_session import FirstSessionTuning, add_ffn_adapters, penultimate_dim
from .common.incremental import IncrementalStrategy, num_outputs
from .common.prototypes import PrototypeMemory, cosine_logits

VARIANTS = ("adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune")


@register
class APER(FirstSessionTuning, IncrementalStrategy):
    """First-session PEFT, then a frozen dual-branch prototype classifier. See the module docstring."""

    name = "aper"

    def __init__(self, model: nn.Module,
                 variant: Literal["adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"] = "adapter",
                 lr: Positive = 0.01, momentum: Momentum = 0.9, weight_decay: NonNegative = 0.0005,
                 min_lr: NonNegative = 0.0, bottleneck: Count = 64, adapter_scale: Positive = 0.1,
                 adapter_dropout: Unit = 0.1, prompt_tokens: Count = 5, scale: Positive = 1.0,
                 feature_batch_size: Count = 256, seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        self.variant, self.scale = variant, float(scale)
        self.feature_batch_size = int(feature_batch_size)
        n_cls = num_outputs(model)
        dim = int(getattr(model, "feature_dim", 0) or penultimate_dim(self.model))
        self.pretrained = frozen_copy(self.model).eval()  # branch 1: the pretrained model, never tuned
        self.setup_passes()
        params = self.add_peft(int(bottleneck), float(adapter_scale), float(adapter_dropout), int(prompt_tokens))
        self.set_tuning(True)
        self.setup_first_session(params, n_cls, dim, lr, momentum, weight_decay, min_lr)
        self.prototypes = PrototypeMemory(n_cls, 2 * dim)  # class sums of [pretrained, adapted] features
        self.adapting = True
        self.model.eval()
        self.remember_initial_state()

    # --- the variant's parameters ---------------------------------------------------------------------------------
    def add_peft(self, bottleneck: int, adapter_scale: float, adapter_dropout: float, tokens: int) -> List[nn.Parameter]:
        """Add the variant's modules to ``self.model``; returns the parameters session 0 trains."""
        if self.variant == "adapter":
            return add_ffn_adapters(self.model, bottleneck, adapter_scale, adapter_dropout)
        if self.variant == "ssf":
            add_ssf(self.model)
        elif self.variant in ("vpt_shallow", "vpt_deep"):
            add_vpt(self.model, tokens, deep=self.variant == "vpt_deep")
        else:
            return self.backbone_parameters()
        return peft_parameters(self.model)

    def backbone_parameters(self) -> List[nn.Parameter]:
        """Every weight of the model but its classifier head (which the features never reach): ``finetune``."""
        head = set(head_parameter_names(self.model))
        return [p for n, p in self.model.named_parameters() if n not in head]

    def set_tuning(self, on: bool) -> None:
        """Gradients on for the variant's parameters (session 0), or off everywhere (the frozen backbone)."""
        freeze(self.model, peft=on and self.variant != "finetune")
        if on and self.variant == "finetune":
            for p in self.backbone_parameters():
                p.requires_grad_(True)

    # --- features and heads ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """The merged feature ``[phi_pretrained(x), phi_adapted(x)]`` (eval mode, float32)."""
        self.model.eval()
        self.pretrained.eval()
        return torch.cat([penultimate_features(self.pretrained, x), penultimate_features(self.model, x)], 1).float()

    def head_logits(self, f: Tensor) -> Tensor:
        """``scale * cos(f, prototype_c)``; zero for classes without a prototype (masked anyway)."""
        return cosine_logits(f, self.prototypes.means(), self.scale)

    # --- sessions (logits / learn_batch: FirstSessionTuning's) --------------------------------------------------------
    def accumulate(self, f: Tensor, y: Tensor) -> None:
        """First-pass features of a frozen-backbone batch update the class prototypes."""
        self.prototypes.update(f, y)

    def end_session(self, session: int) -> None:
        if self.adapting:  # freeze the adapted backbone; session 0's prototypes from its final features
            self.set_tuning(False)
            self.model.eval()
            self.adapting = False
            self.stored_images_to_features(self.feature_batch_size)
            f, y = self.store.items()
            self.prototypes.update(f, y)
            self.store.clear()
        self.end_passes()

    # --- state ----------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> List[nn.Parameter]:
        if not self.adapting:
            return []
        return [p for p in self.model.parameters() if p.requires_grad] + [self.train_weight, self.train_sigma]

    def extra(self) -> Any:
        return {"adapting": self.adapting, **self.passes_state()}

    def load_extra(self, state: Any) -> None:
        if not state:
            return
        self.load_passes_state(state)
        self.adapting = bool(state.get("adapting", False))
        self.set_tuning(self.adapting)

