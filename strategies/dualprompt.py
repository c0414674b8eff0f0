"""DualPrompt: a shared G-prompt and task-specific E-prompts, by prefix tuning of a frozen pretrained ViT.

Wang, Zhang, Ebrahimi, Sun, Zhang, Lee, Ren, Su, Perot, Dy, Pfister; "DualPrompt: Complementary Prompting for
Rehearsal-free Continual Learning" (ECCV 2022, arXiv 2204.04799). Reference for the numbers: LAMDA-PILOT@2647455
``models/dualprompt.py``, ``backbone/vit_dualprompt.py``, ``backbone/prompt.py`` (``EPrompt``),
``exps/dualprompt.json`` -- a port of JH-LEE-KR/dualprompt-pytorch, itself of the official JAX
google-research/l2p; run side by side by ``benchmarks/l2p_reference.py --method dualprompt``.

For each batch:

1. query ``q(x)``: the frozen pretrained ViT's [CLS] feature without prompts (as L2P,
   :func:`~strategies.common.prompt_pool.frozen_query`);
2. E-prompt: one learnable key per task in a pool of ``pool_size``; in training task t uses its own slot(s)
   ``[t top_k, (t + 1) top_k)`` (the true task, the reference's ``use_prompt_mask``) and the pull term pulls its key to
   the queries; at test the best-matching key by cosine similarity (task-agnostic; ``batchwise_prompt``, the
   reference's default, gives every sample of a test batch the batch's most frequent choice);
3. prefix tuning: in the blocks ``g_layers`` the shared G-prompt (``g_prompt_length`` key and ``g_prompt_length`` value
   tokens per layer), in the blocks ``e_layers`` the selected E-prompt (``length`` key and value tokens per layer)
   join the keys and values of the attention (:func:`~strategies.common.prompt_pool.prefix_attention`); the
   classifier reads the [CLS] token (``head_type: token``);
4. loss = cross-entropy over the session's classes - ``pull_constraint_coeff`` x pull; Adam on G-prompt, E-prompts,
   keys and head, re-initialised every session; with ``shared_prompt_pool`` a new task's E-prompt starts as a copy of
   the previous task's (the reference's ``_init_prompt``).

Where PILOT differs from the paper's prefix tuning: its ``EPrompt.forward`` turns the selected prefixes
(layers, 2, B, ...) into (layers, B, 2, ...) with a ``reshape`` instead of a permute, which mixes the key and value
halves across the samples of a batch (JH-LEE-KR/dualprompt-pytorch issue 8); ours gives every sample its key half as
keys and value half as values, as the paper, the official JAX code (google-research/l2p@dd8836e
``models/prompt.py``: the same reshape with its axes named the other way round, so it only merges top_k and
length) and PILOT's own G-prompt do; measured: 0.02 / 0.1 points (benchmarks/RESULTS.md). The official CIFAR-100
config (``configs/cifar100_dualprompt.py``) has pull_constraint_coeff 1.0 and lr 0.03 with per_device_batch_size 24 and
gradient clipping at norm 1; the defaults are PILOT's (= JH-LEE-KR's), whose figures the side-by-side run checks.
Layer indices at or beyond the ViT's depth are dropped (the reference's [2, 3, 4] on a 4-block ViT: [2, 3]).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Literal, Sequence, Tuple

import torch
from torch import Tensor, nn

from ctta.backbones.peft import vit_block_names
from ctta.errors import ConfigError
from ctta.hparams import Count, NonNegative, NonNegInt, Positive
from ctta.seeding import stable_seed

from .base import register
from .common.prompt_pool import (PromptPool, PromptStrategy, frozen_query, task_prompt_ids, vit_blocks, vit_classify,
                                 vit_embed)

log = logging.getLogger(__name__)


def _layers(name: str, layers: Sequence[int], depth: int) -> List[int]:
    """``layers`` checked (distinct block indices) and cut to the ViT's ``depth`` (dropped ones logged)."""
    out = [int(i) for i in layers]
    if any(i < 0 for i in out) or len(set(out)) != len(out):
        raise ConfigError(f"dualprompt: {name} must be distinct non-negative block indices, got {list(layers)!r}")
    kept = [i for i in out if i < depth]
    if kept != out:
        log.info("dualprompt: %s %s cut to %s (the ViT has %d blocks)", name, out, kept, depth)
    return kept


@register
class DualPrompt(PromptStrategy):
    """G-prompt (shared) + E-prompts (one key per task) by prefix tuning; true task's E-prompt in training, the
    best-matching key at test. See the module docstring."""

    name = "dualprompt"

    def __init__(self, model: nn.Module, g_prompt_length: Count = 5, g_layers: Sequence[NonNegInt] = (0, 1),
                 e_layers: Sequence[NonNegInt] = (2, 3, 4), pool_size: Count = 10, length: Count = 5,
                 top_k: Count = 1, batchwise_prompt: bool = True, shared_prompt_pool: bool = True,
                 pull_constraint_coeff: NonNegative = 0.1, lr: Positive = 0.001, weight_decay: NonNegative = 0.0,
                 head_init: Literal["reset", "keep"] = "reset", seed: int = 0) -> None:
        super().__init__(model, lr, weight_decay, pull_constraint_coeff, head_init, seed)
        depth = len(vit_block_names(self.model))
        self.g_layers = _layers("g_layers", g_layers, depth)
        self.e_layers = _layers("e_layers", e_layers, depth)
        if set(self.g_layers) & set(self.e_layers):
            raise ConfigError(f"dualprompt: g_layers {self.g_layers} and e_layers {self.e_layers} overlap")
        if not self.e_layers:
            raise ConfigError(f"dualprompt: no e_layers inside the ViT's {depth} blocks (got {list(e_layers)!r})")
        self.shared_prompt_pool = bool(shared_prompt_pool)
        dim = int(self.model.feature_dim)
        g = torch.Generator().manual_seed(stable_seed(seed, "dualprompt-prompts"))
        dev = self.head[0].device
        self.e_pool = PromptPool(pool_size, (len(self.e_layers), 2, length, dim), dim, top_k, batchwise_prompt,
                                 generator=g).to(dev)
        gp = torch.rand(len(self.g_layers), 2, g_prompt_length, dim, generator=g) * 2 - 1
        self.g_prompt = nn.Parameter(gp.to(dev))
        self.setup(([self.g_prompt] if self.g_layers else []) + [self.e_pool.prompts, self.e_pool.keys])
        self.remember_initial_state()

    def begin_session(self, session: int) -> None:
        """A new Adam; with ``shared_prompt_pool`` the new task's E-prompt slots start from the previous task's."""
        super().begin_session(session)
        k, pool = self.e_pool.top_k, self.e_pool.pool_size
        if session > 0 and self.shared_prompt_pool and (session + 1) * k <= pool:
            with torch.no_grad():
                self.e_pool.prompts[session * k:(session + 1) * k] = self.e_pool.prompts[(session - 1) * k:session * k]

    def selected_prompts(self, query: Tensor, train: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """E-prompt ids (B x top_k: the task's slots in training, the best keys at test), their prefixes
        (layers x 2 x B x top_k * length x D) and the pull term."""
        b = query.shape[0]
        fixed = (task_prompt_ids(self.sessions.session, self.e_pool.top_k, self.e_pool.pool_size, b, query.device)
                 if train else None)
        e, idx, pull = self.e_pool(query, fixed)  # B x top_k x layers x 2 x length x D
        e = e.permute(2, 3, 0, 1, 4, 5)
        return idx, e.reshape(*e.shape[:3], -1, e.shape[-1]), pull

    def prompted(self, x: Tensor, query: Tensor, train: bool) -> Tuple[Tensor, Tensor]:
        """Logits of the [CLS] token with G- and E-prefixes in their blocks, and the pull term."""
        b = x.shape[0]
        _, e, pull = self.selected_prompts(query, train)
        prefixes: Dict[int, Tuple[Tensor, Tensor]] = {}
        for j, layer in enumerate(self.g_layers):
            prefixes[layer] = (self.g_prompt[j, 0].expand(b, -1, -1), self.g_prompt[j, 1].expand(b, -1, -1))
        for j, layer in enumerate(self.e_layers):
            prefixes[layer] = (e[j, 0], e[j, 1])
        out = vit_blocks(self.model, vit_embed(self.model, x), prefixes)
        return vit_classify(self.model, out[:, 0]), pull

    @torch.no_grad()
    def test_prompt_ids(self, x: Tensor) -> Tensor:
        """The E-prompt ids chosen at test for ``x`` (B x top_k; no state change)."""
        return self.selected_prompts(frozen_query(self.model, x), False)[0]
