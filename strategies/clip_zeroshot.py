"""CLIP zero-shot: predict with a CLIP backbone's zero-shot head (class-name prompts), change nothing.

The reference row for ViL-assisted methods (ViLAaD): what the vision-and-language model alone gets on the target.
The backbone must be a CLIP classifier (``--backbone clip`` with ``model``/``pretrained_tag``/``class_names``
options, or ``clip_tiny`` in tests); the head is built once from the class names and prompt templates.
"""
from __future__ import annotations

from torch import nn

from ctta.errors import UnsupportedError

from .base import Strategy, register


@register
class ClipZeroShot(Strategy):
    """Zero-shot CLIP in eval mode: logits = logit_scale * cos(image, class text); no parameter or buffer changes."""

    name = "clip_zeroshot"
    step_kinds = frozenset({"adapt", "eval"})
    settings = frozenset({"tta", "domain_incremental", "sfda"})
    plugin_refusal = "it needs the CLIP model itself (its text head), not a wrapped one"

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__(model, seed)
        from ctta.backbones.clip import CLIPZeroShot

        net = getattr(model, "net", model)
        if not isinstance(net, CLIPZeroShot):
            raise UnsupportedError(f"clip_zeroshot needs a CLIP backbone (--backbone clip or clip_tiny), got "
                                   f"{getattr(model, 'name', type(net).__name__)!r}")
        self.model.eval().requires_grad_(False)
        self.remember_initial_state()

    def train(self, mode: bool = True) -> "ClipZeroShot":  # the CLIP model stays in eval mode
        super().train(mode)
        self.model.eval()
        return self
