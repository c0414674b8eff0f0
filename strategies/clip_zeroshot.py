"""CLIP zero-shot: predict with a CLIP backbone's zero-shot head (class-name prompts), change nothing.

The reference row for ViL-assisted methods (ViLAaD): what the vision-and-language model alone gets on the target;
and the zero-shot row of CLIP continual-learning tables (MoRA): on class-incremental streams the labelled batches
only mark their classes as seen (nothing is learned) and predictions are restricted to the classes seen so far, as
for every incremental learner here.
The backbone must be a CLIP classifier (``--backbone clip`` with ``model``/``pretrained_tag``/``class_names``
options, or ``clip_tiny`` in tests); the head is built once from the class names and prompt templates.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ctta.errors import UnsupportedError

from .base import Strategy, register
from .common.incremental import SeenClasses, num_outputs


@register
class ClipZeroShot(Strategy):
    """Zero-shot CLIP in eval mode: logits = logit_scale * cos(image, class text); no parameter or buffer changes."""

    name = "clip_zeroshot"
    step_kinds = frozenset({"adapt", "train", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda", "class_incremental", "few_shot_class_incremental",
                          "online_class_incremental"})
    plugin_refusal = "it needs the CLIP model itself (its text head), not a wrapped one"

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__(model, seed)
        from ctta.backbones.clip import CLIPZeroShot

        net = getattr(model, "net", model)
        if not isinstance(net, CLIPZeroShot):
            raise UnsupportedError(f"clip_zeroshot needs a CLIP backbone (--backbone clip or clip_tiny), got "
                                   f"{getattr(model, 'name', type(net).__name__)!r}")
        self.model.eval().requires_grad_(False)
        self.seen = SeenClasses(num_outputs(model))
        self.remember_initial_state()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Zero-shot logits, unseen classes masked once a labelled batch has named some (unchanged otherwise)."""
        return self.seen.mask(self.model(x))

    @torch.no_grad()
    def learn(self, x: Tensor, y: Tensor) -> Tensor:
        """Learns nothing: the batch's classes join the label space, and the prediction is returned."""
        self.seen.update(y)
        return self.predict(x)

    def train(self, mode: bool = True) -> "ClipZeroShot":  # the CLIP model stays in eval mode
        super().train(mode)
        self.model.eval()
        return self
