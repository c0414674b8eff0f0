"""Learnable prompt context for CLIP (CoOp, Zhou et al. IJCV 2022; TPT, Shu et al. NeurIPS 2022).

The class prompts are ``[SOS] ctx_1 .. ctx_n <class name> . [EOS]`` where the n context vectors are free token
embeddings shared by all classes (initialised from the embeddings of ``ctx_init``'s words, e.g. "a photo of a",
so that at initialisation the prompts are exactly the tokens of "a photo of a <name>.") and the rest are the fixed
token embeddings of the tokenised prompt. They go through CLIP's text transformer
(:class:`ctta.backbones.clip.TextTower`), whose weights are never touched here. Only the class token at the end
(CoOp's ``class_token_position="end"``) and shared (not class-specific) context are implemented.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PromptLearner(nn.Module):
    """Context vectors ``ctx`` (n x D, the only parameter) + fixed prefix / suffix embeddings -> class text features."""

    def __init__(self, text: nn.Module, tokenizer: Any, class_names: Sequence[str],
                 ctx_init: str = "a photo of a") -> None:
        super().__init__()
        object.__setattr__(self, "_text_box", [text])  # the frozen text tower is the backbone's, not ours
        words = ctx_init.replace("_", " ").strip()
        init_tokens = tokenizer([words])
        n_ctx = int((init_tokens[0] > 0).sum()) - 2  # without SOS / EOS
        names = [n.replace("_", " ") for n in class_names]
        tokens = tokenizer([f"{words} {n}." for n in names])
        with torch.no_grad():
            ctx = text.embed(init_tokens)[0, 1:1 + n_ctx].detach().clone()
            emb = text.embed(tokens).detach()
        self.n_ctx, self.class_names = n_ctx, names
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("ctx_init_state", ctx.clone())
        self.register_buffer("tokens", tokens)
        self.register_buffer("token_prefix", emb[:, :1].clone())  # SOS
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx:].clone())  # class name, ".", EOS, padding

    @property
    def text(self) -> nn.Module:
        return self._text_box[0]

    def prompts(self) -> Tensor:
        """C x L x D prompt embeddings with the current context."""
        ctx = self.ctx.unsqueeze(0).expand(len(self.tokens), -1, -1)
        return torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)

    def forward(self) -> Tensor:
        """C x E L2-normalised text features of the class prompts (differentiable in ``ctx``)."""
        return F.normalize(self.text(self.prompts(), self.tokens), dim=-1)

    @torch.no_grad()
    def reset(self) -> None:
        """Context back to its initialisation (episodic prompt tuning)."""
        self.ctx.copy_(self.ctx_init_state)


def clip_text_tower(model: nn.Module, method: str) -> nn.Module:
    """The CLIP network inside ``model`` (a Classifier or the bare net), checked to keep its text tower."""
    from ctta.backbones.clip import CLIPZeroShot
    from ctta.errors import ConfigError, UnsupportedError

    net = getattr(model, "net", model)
    if not isinstance(net, CLIPZeroShot):
        raise UnsupportedError(f"{method} tunes CLIP's text prompts: it needs a CLIP backbone (--backbone clip), got "
                               f"{getattr(model, 'name', type(net).__name__)!r}")
    if net.text is None:
        raise ConfigError(f"{method} needs the CLIP text tower: build the backbone with keep_text=true "
                          f"(--set backbone.keep_text=true)")
    return net


__all__ = ["PromptLearner", "clip_text_tower"]
