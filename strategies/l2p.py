"""L2P: Learning to Prompt, a prompt pool with learnable keys on a frozen pretrained ViT (class-incremental).

Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy, Pfister; "Learning to Prompt for Continual Learning" (CVPR 2022,
arXiv 2112.08654). Reference for the numbers: LAMDA-PILOT@2647455 ``models/l2p.py``, ``backbone/vit_l2p.py``,
``backbone/prompt.py`` (``Prompt``), ``exps/l2p.json`` -- a port of JH-LEE-KR/l2p-pytorch, itself of the official
JAX google-research/l2p; run side by side by ``benchmarks/l2p_reference.py``.

For each batch (the algorithm box of the paper, as the reference code does it):

1. query ``q(x)``: the frozen pretrained ViT's [CLS] feature, a second forward without prompts
   (:func:`~strategies.common.prompt_pool.frozen_query`);
2. match ``q(x)`` with the ``pool_size`` learnable keys by cosine similarity and take the ``top_k`` best
   (``batchwise_prompt``: the batch's most frequent ``top_k`` for every sample, the reference's default);
3. prepend the ``top_k`` selected prompts (``length`` tokens each) to the patch tokens after [CLS] (prompt tuning;
   each prompt token carries the [CLS] positional embedding, as the reference's resized ``pos_embed``), run the
   frozen ViT and classify the mean of the prompt tokens' outputs (``head_type: prompt``; ``token``: [CLS];
   ``token+prompt``: mean of both);
4. loss = cross-entropy over the current session's classes (previous and unseen classes masked: the reference's
   train mask) - ``pull_constraint_coeff`` x the summed cosine of the selected keys with the query (the surrogate
   loss of Eq. 5); Adam on prompts, keys and head only, re-initialised every session (``reinit_optimizer``).

Prediction: steps 1-3 and the argmax over every class seen so far. The backbone never changes. The head is a fresh
one (timm's ViT init, as the reference's new 10-class head; ``head_init: keep`` keeps the backbone's own).
``use_prompt_mask`` (off in the reference config) fixes training to slots ``[t k, (t + 1) k)`` of task t.

Where the official JAX code (google-research/l2p@dd8836e ``models/vit.py``, ``configs/cifar100_l2p.py``) differs
from PILOT: it prepends the prompts after the positional embedding, with none of their own (``prompt_pos: none``;
with Adam the same as PILOT's but for initial prompts shifted by the [CLS] positional embedding), and its CIFAR-100
config has length 10, top_k 4, pull_constraint_coeff 1.0, lr 0.03 with per_device_batch_size 16 and gradient clipping at
norm 1 (not implemented here). The defaults are PILOT's (= JH-LEE-KR's), whose figures the side-by-side run checks.
"""
from __future__ import annotations

from typing import Literal, Tuple

import torch
from torch import Tensor, nn

from ctta.errors import ConfigError
from ctta.hparams import Count, NonNegative, Positive
from ctta.seeding import stable_seed

from .base import register
from .common.prompt_pool import (PromptPool, PromptStrategy, insert_prompt_tokens, task_prompt_ids, vit_blocks,
                                 vit_classify, vit_embed)

HEAD_TYPES = ("prompt", "token", "token+prompt")


@register
class L2P(PromptStrategy):
    """Prompt pool + key matching on the frozen ViT's [CLS] query; prompts prepended to the tokens. See the module
    docstring."""

    name = "l2p"

    def __init__(self, model: nn.Module, pool_size: Count = 10, length: Count = 5, top_k: Count = 5,
                 batchwise_prompt: bool = True, pull_constraint_coeff: NonNegative = 0.1, lr: Positive = 0.001875,
                 weight_decay: NonNegative = 0.0, head_type: Literal["prompt", "token", "token+prompt"] = "prompt",
                 use_prompt_mask: bool = False, prompt_pos: Literal["cls", "none"] = "cls",
                 head_init: Literal["reset", "keep"] = "reset", seed: int = 0) -> None:
        super().__init__(model, lr, weight_decay, pull_constraint_coeff, head_init, seed)
        if head_type not in HEAD_TYPES:
            raise ConfigError(f"l2p: head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        if prompt_pos not in ("cls", "none"):
            raise ConfigError(f"l2p: prompt_pos must be 'cls' or 'none', got {prompt_pos!r}")
        self.head_type, self.use_prompt_mask, self.prompt_pos = str(head_type), bool(use_prompt_mask), str(prompt_pos)
        dim = int(self.model.feature_dim)
        g = torch.Generator().manual_seed(stable_seed(seed, "l2p-pool"))
        dev = self.head[0].device
        self.pool = PromptPool(pool_size, (length, dim), dim, top_k, batchwise_prompt, generator=g).to(dev)
        self.setup([self.pool.prompts, self.pool.keys])
        self.remember_initial_state()

    def prompted(self, x: Tensor, query: Tensor, train: bool) -> Tuple[Tensor, Tensor]:
        """Logits from the prompted tokens and the pull term of the selected keys."""
        b = x.shape[0]
        fixed = (task_prompt_ids(self.sessions.session, self.pool.top_k, self.pool.pool_size, b, x.device)
                 if train and self.use_prompt_mask else None)
        prompts, _, pull = self.pool(query, fixed)  # B x top_k x length x D
        p = prompts.reshape(b, -1, prompts.shape[-1])
        out = vit_blocks(self.model, insert_prompt_tokens(self.model, vit_embed(self.model, x), p, self.prompt_pos))
        n = int(getattr(getattr(self.model, "net", self.model), "num_prefix_tokens", 1))
        if self.head_type == "prompt":
            feature = out[:, n:n + p.shape[1]].mean(dim=1)
        elif self.head_type == "token":
            feature = out[:, 0]
        else:
            feature = out[:, :n + p.shape[1]].mean(dim=1)
        return vit_classify(self.model, feature), pull
