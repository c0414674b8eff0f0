"""Prompt pools on a frozen ViT: the query, key matching, prompt selection and the pull loss, done once.

Shared by L2P (Wang et al., CVPR 2022, arXiv 2112.08654), DualPrompt (Wang et al., ECCV 2022, arXiv 2204.04799)
and CODA-Prompt's query (Smith et al., CVPR 2023). The mechanism follows LAMDA-PILOT@2647455 ``backbone/prompt.py``
(``Prompt`` / ``EPrompt``; a port of JH-LEE-KR/l2p-pytorch and dualprompt-pytorch, themselves ports of
google-research/l2p):

* the query is the frozen pretrained ViT's [CLS] feature, a second forward without prompts (``embedding_key: cls``
  with PILOT's ``original_backbone``): :func:`frozen_query`;
* keys and queries are L2-normalised as the reference does (``x * rsqrt(max(sum x^2, 1e-12))``) and matched by
  cosine similarity: :meth:`PromptPool.similarity`;
* each sample takes the ``top_k`` best keys; with ``batchwise`` (the reference's ``batchwise_prompt``) the batch's
  ``top_k`` most frequent choices are used for every sample of the batch: :func:`select_top_k`;
* the surrogate (pull) term is ``sum_i sum_{j in idx_i} cos(k_j, q_i) / B`` (the reference's ``reduce_sim``), which
  the loss subtracts with weight ``pull_constraint_coeff``: :func:`pull_term`;
* DualPrompt (and L2P's ``use_prompt_mask``) fixes the training selection to the task's slots
  ``[task * top_k, (task + 1) * top_k)`` while they fit in the pool: :func:`task_prompt_ids`.

:class:`PromptStrategy` is the learner both methods share: the frozen backbone (only prompts, keys and the head
learn), the reference's fresh head, Adam re-initialised at every session, the loss
``CE(logits masked to the session's classes) - coeff * pull`` (PILOT's ``_init_train``: columns of previous and
unseen classes at ``-inf``, the train mask of the official code), and prediction over every class seen so far.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.peft import head_parameter_names
from ctta.errors import ConfigError
from ctta.seeding import stable_seed

from .incremental import IncrementalStrategy, SessionClasses, mask_logits


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """``x / ||x||`` along ``dim`` as the reference computes it (``x * rsqrt(max(sum x^2, eps))``)."""
    square = torch.sum(x ** 2, dim=dim, keepdim=True)
    return x * torch.rsqrt(torch.clamp_min(square, eps))


def frozen_but_head(model: nn.Module, head_names: Sequence[str]) -> List[nn.Parameter]:
    """Freeze ``model`` (requires_grad off, eval mode: a frozen ViT) except the parameters named ``head_names``,
    which it returns trainable."""
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    head = [params[n] for n in head_names]
    for p in head:
        p.requires_grad_(True)
    model.eval()
    return head


@torch.no_grad()
def frozen_query(model: nn.Module, x: Tensor) -> Tensor:
    """The query of prompt matching: the frozen model's pre-logits feature of ``x`` without any prompt (for a timm
    ViT with ``global_pool='token'`` the [CLS] token after the final norm); no gradient."""
    return model.forward_features(x).detach()


def select_top_k(similarity: Tensor, top_k: int, batchwise: bool = False) -> Tensor:
    """Indices (B x top_k) of the best-matching keys per row of ``similarity`` (B x pool).

    ``batchwise``: the ``top_k`` ids chosen most often over the batch (counts of the per-sample choices; ties as
    ``torch.topk`` over the ids in increasing order), the same for every sample, as the reference's
    ``batchwise_prompt``."""
    _, idx = torch.topk(similarity, k=top_k, dim=1)
    if not batchwise:
        return idx
    ids, counts = torch.unique(idx, return_counts=True, sorted=True)
    pool = similarity.shape[1]
    if ids.shape[0] < pool:  # pad as the reference (jnp.unique with a size): the smallest id, count 0
        ids = torch.cat([ids, ids.new_full((pool - ids.shape[0],), int(idx.min()))])
        counts = torch.cat([counts, counts.new_zeros(pool - counts.shape[0])])
    _, major = torch.topk(counts, k=top_k)
    return ids[major].expand(similarity.shape[0], -1)


def pull_term(keys: Tensor, query: Tensor, idx: Tensor) -> Tensor:
    """The surrogate loss term ``sum_i sum_{j in idx_i} cos(keys_j, query_i) / B`` (pulls the selected keys to
    their queries; the loss subtracts it times ``pull_constraint_coeff``)."""
    selected = l2_normalize(keys, dim=-1)[idx]  # B x k x D
    return torch.sum(selected * l2_normalize(query, dim=-1).unsqueeze(1)) / query.shape[0]


def task_prompt_ids(task: int, top_k: int, pool_size: int, batch: int, device: torch.device) -> Optional[Tensor]:
    """The fixed training selection of task ``task``: slots ``[task * top_k, (task + 1) * top_k)`` for each of
    ``batch`` samples, or None when they do not fit in the pool (the reference then matches keys)."""
    start, end = task * top_k, (task + 1) * top_k
    if end > pool_size:
        return None
    return torch.arange(start, end, device=device).unsqueeze(0).expand(batch, -1)


class PromptPool(nn.Module):
    """``pool_size`` prompts (each of ``prompt_shape``) with learnable keys (``pool_size`` x ``key_dim``), both
    initialised U(-1, 1) (the reference's ``uniform`` initialisers), drawn from ``generator`` when given.

    ``forward(query, fixed)`` returns the selected prompts (B x top_k x prompt_shape), their ids (B x top_k) and
    the pull term; ``fixed`` (B x top_k ids) overrides the matching (DualPrompt's training selection)."""

    def __init__(self, pool_size: int, prompt_shape: Sequence[int], key_dim: int, top_k: int,
                 batchwise: bool = False, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ConfigError(f"prompt pool: top_k must be in [1, pool_size={pool_size}], got {top_k!r}")
        self.pool_size, self.top_k, self.batchwise = int(pool_size), int(top_k), bool(batchwise)
        shape = (self.pool_size, *[int(s) for s in prompt_shape])
        self.prompts = nn.Parameter(torch.rand(shape, generator=generator) * 2 - 1)
        self.keys = nn.Parameter(torch.rand(self.pool_size, int(key_dim), generator=generator) * 2 - 1)

    def similarity(self, query: Tensor) -> Tensor:
        """Cosine similarity (B x pool_size) of the queries with the keys."""
        return l2_normalize(query, dim=-1) @ l2_normalize(self.keys, dim=-1).t()

    def select(self, query: Tensor, fixed: Optional[Tensor] = None) -> Tensor:
        """Prompt ids (B x top_k): ``fixed`` when given, else the best-matching keys (batchwise if configured)."""
        if fixed is not None:
            return fixed
        with torch.no_grad():
            return select_top_k(self.similarity(query), self.top_k, self.batchwise)

    def forward(self, query: Tensor, fixed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        idx = self.select(query, fixed)
        return self.prompts[idx], idx, pull_term(self.keys, query, idx)


# --- prompts in a timm ViT's forward ---------------------------------------------------------------------------------

def _vit(model: nn.Module) -> Tuple[nn.Module, Any]:
    """The timm ViT inside ``model`` (a :class:`ctta.backbones.Classifier` or the bare net) and its input norm."""
    net = getattr(model, "net", model)
    for attr in ("patch_embed", "_pos_embed", "blocks", "norm"):
        if not hasattr(net, attr):
            from ctta.errors import UnsupportedError

            raise UnsupportedError(f"prompting needs a timm VisionTransformer, got {type(net).__name__} "
                                   f"without {attr!r}")
    return net, getattr(model, "normalize", None)


def vit_embed(model: nn.Module, x: Tensor) -> Tensor:
    """The token sequence (B x (prefix + patches) x D) entering the first block: patch embedding, class token and
    positional embedding, as timm's ``forward_features`` makes it (``x``: images as ``model`` takes them)."""
    net, normalize = _vit(model)
    t = net.patch_embed(normalize(x) if normalize is not None else x)
    t = net._pos_embed(t)
    t = net.patch_drop(t) if hasattr(net, "patch_drop") else t
    return net.norm_pre(t) if hasattr(net, "norm_pre") else t


def insert_prompt_tokens(model: nn.Module, tokens: Tensor, prompts: Tensor, prompt_pos: str = "cls") -> Tensor:
    """Prompt tuning: ``prompts`` (B x P x D) inserted right after the prefix ([CLS]) tokens of ``tokens``.

    ``prompt_pos="cls"``: each prompt token gets the class token's positional embedding (L2P in PILOT /
    JH-LEE-KR: ``resize_pos_embed`` expands the [CLS] entry over the prompt positions, so the sequence is
    ``[cls, prompts, patches] + [pos_cls, pos_cls x P, pos_patches]``); ``"none"``: no positional embedding (VPT)."""
    net, _ = _vit(model)
    n = int(getattr(net, "num_prefix_tokens", 1))
    if prompt_pos == "cls":
        prompts = prompts + net.pos_embed[:, :1]
    elif prompt_pos != "none":
        raise ConfigError(f"prompt_pos must be 'cls' or 'none', got {prompt_pos!r}")
    return torch.cat([tokens[:, :n], prompts.to(tokens.dtype), tokens[:, n:]], dim=1)


def prefix_attention(attn: nn.Module, x: Tensor, key: Optional[Tensor], value: Optional[Tensor]) -> Tensor:
    """A timm ``Attention`` on ``x`` (B x N x D) whose keys and values are preceded by per-sample prefix tokens
    ``key`` / ``value`` (B x L x D, split into heads as the keys are); None: the plain attention.

    Prefix tuning as DualPrompt's ``PreT_Attention`` (PILOT ``backbone/vit_dualprompt.py``): softmax over prefix
    and sequence keys together, no compensation (unlike LAE's :class:`ctta.backbones.peft.PrefixAttention`)."""
    if key is None:
        return attn(x)
    if getattr(attn, "gate", None) is not None:
        from ctta.errors import UnsupportedError

        raise UnsupportedError("prefix tuning does not support gated attention")
    b, n, _ = x.shape
    heads = attn.num_heads
    width = attn.qkv.out_features // 3
    hd = width // heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    pk = key.reshape(b, -1, heads, hd).transpose(1, 2)
    pv = value.reshape(b, -1, heads, hd).transpose(1, 2)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    w = ((q @ k.transpose(-2, -1)) * (hd ** -0.5)).softmax(dim=-1)
    out = (attn.attn_drop(w) @ v).transpose(1, 2).reshape(b, n, width)
    out = attn.proj(getattr(attn, "norm", nn.Identity())(out))
    return getattr(attn, "proj_drop", nn.Identity())(out)


def vit_blocks(model: nn.Module, tokens: Tensor,
               prefixes: Optional[Dict[int, Tuple[Tensor, Tensor]]] = None) -> Tensor:
    """The transformer blocks and final norm on ``tokens``; block ``i`` in ``prefixes`` attends with the
    per-sample prefix ``prefixes[i] = (key, value)`` (each B x L x D, :func:`prefix_attention`)."""
    net, _ = _vit(model)
    for i, blk in enumerate(net.blocks):
        if prefixes and i in prefixes:
            k, v = prefixes[i]
            tokens = tokens + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(tokens), k, v)))
            tokens = tokens + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(tokens))))
        else:
            tokens = blk(tokens)
    return net.norm(tokens)


def vit_classify(model: nn.Module, feature: Tensor) -> Tensor:
    """The ViT's head (``fc_norm``, head dropout, the classifier) on pooled features ``feature`` (B x D)."""
    net, _ = _vit(model)
    f = net.fc_norm(feature) if hasattr(net, "fc_norm") else feature
    f = net.head_drop(f) if hasattr(net, "head_drop") else f
    return net.get_classifier()(f)


@torch.no_grad()
def fresh_head(model: nn.Module, seed: int, std: float = 0.02) -> List[str]:
    """Re-draw the classifier head as the reference's new head (timm's ViT init: weights truncated N(0, std^2) at
    +-2, bias 0) from a seeded generator; returns the head's parameter names."""
    names = head_parameter_names(model)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(stable_seed(seed, "prompt-head"))
    for n in names:
        p = params[n]
        if p.dim() > 1:
            w = torch.empty(p.shape, dtype=p.dtype)
            nn.init.trunc_normal_(w, std=std, a=-2.0, b=2.0, generator=g)
            p.copy_(w)
        else:
            p.zero_()
    return names


class PromptStrategy(IncrementalStrategy):
    """The learner L2P and DualPrompt share (see the module docstring). Subclasses build their prompt modules,
    call :meth:`setup` with them, and implement ``prompted(x, query, train)`` -> ``(logits, pull)``."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, pull_coeff: float, head_init: str,
                 seed: int) -> None:
        super().__init__(model, seed, mask_unseen=True)
        _vit(self.model)  # a timm ViT, or a one-line UnsupportedError now
        if head_init == "reset":
            self.head_names = fresh_head(self.model, seed)
        elif head_init == "keep":
            self.head_names = head_parameter_names(self.model)
        else:
            raise ConfigError(f"{self.name}: head_init must be 'reset' or 'keep', got {head_init!r}")
        self.head = frozen_but_head(self.model, self.head_names)  # the reference's dropout and drop-path are 0
        self.lr, self.weight_decay, self.pull_coeff = float(lr), float(weight_decay), float(pull_coeff)
        self.session_classes = SessionClasses()

    def setup(self, prompt_parameters: Sequence[nn.Parameter]) -> None:
        """Adam over the prompt parameters and the head (constant lr, as the reference's ``scheduler: constant``)."""
        self.prompt_params = list(prompt_parameters)
        self.optimizer = torch.optim.Adam(self.prompt_params + self.head, lr=self.lr, weight_decay=self.weight_decay)

    # --- hooks of the methods -----------------------------------------------------------------------------------
    def prompted(self, x: Tensor, query: Tensor, train: bool) -> Tuple[Tensor, Tensor]:
        """Logits of ``x`` with the prompts the query selects (``train``: the training selection) and the pull term."""
        raise NotImplementedError

    def logits(self, x: Tensor) -> Tensor:
        """Prediction logits: the frozen query, then the prompted forward (no state change)."""
        self.model.eval()
        return self.prompted(x, frozen_query(self.model, x), False)[0]

    # --- sessions -----------------------------------------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        self.session_classes.segment_start(segment)

    def begin_session(self, session: int) -> None:
        """A fresh Adam state and the session's class mask (from the segment's classes, else the labels seen)."""
        self.optimizer.state.clear()  # the reference's reinit_optimizer: a new Adam at every task
        self.session_classes.begin(self.seen.num_classes, self.head[0].device)

    def end_session(self, session: int) -> None:
        self.session_classes.segment = None

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """One Adam step on ``CE(session-masked logits) - coeff * pull``; returns the seen-masked logits before it."""
        keep = self.session_classes.add(y)
        self.model.eval()
        query = frozen_query(self.model, x)
        with torch.enable_grad():
            logits, pull = self.prompted(x, query, True)
            loss = F.cross_entropy(mask_logits(logits, keep), y) - self.pull_coeff * pull
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        return self.mask(logits.detach())

    def trainable_parameters(self) -> List[nn.Parameter]:
        return self.prompt_params + self.head

    def extra(self) -> Any:
        return self.session_classes.state()

    def load_extra(self, state: Any) -> None:
        self.session_classes.load_state(state or {}, self.head[0].device)


__all__ = ["PromptPool", "PromptStrategy", "fresh_head", "frozen_but_head", "frozen_query", "insert_prompt_tokens",
           "l2_normalize", "prefix_attention", "pull_term", "select_top_k", "task_prompt_ids", "vit_blocks", "vit_classify",
           "vit_embed"]
