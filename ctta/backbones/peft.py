"""Freezing and parameter-efficient modules, applied to any backbone through one mechanism.

:func:`inject` replaces every submodule that a selector picks by a wrapper built around it (the wrapper holds the
original module as ``.base``, so its weights and behaviour are untouched until the new parameters move away from
their identity initialisation). On top of it:

* :func:`add_film`: per-channel scale and shift after each norm layer (FiLM; FSA-FiLM, FiT), 2 x C parameters
  (:func:`efficientnet_film_layers`: the official FSA-FiLM placement in a timm EfficientNet);
* :func:`add_lora`: low-rank update ``W + (alpha / r) B A`` of Linear layers (LoRA, Hu et al. 2022), r x (in + out);
* :func:`add_adapter`: a residual bottleneck MLP after a module (Houlsby-style adapter), zero-initialised up-projection,
  or (``mode="parallel"``) beside it, ``base(x) + s * up(act(down(x)))`` (AdaptFormer / LAE), optionally with a
  learnable scalar scale ``s``;
* :func:`add_kv_lora`: LoRA on the key and value row blocks of a fused ``qkv`` Linear, each with its own learnable
  scale (LAE's LoRA);
* :func:`add_mora`: MoRA, a LoRA update split into self-activated, sparsely gated rank-1 experts with one
  block per task (Lu et al., arXiv 2506.21035; :class:`MixtureOfRankLoRA`);
* :func:`add_attention_peft`: LoRA / MoRA (any Linear wrapper) on the fused in-projection and the out-projection of
  ``nn.MultiheadAttention`` (open_clip's attention), whose weights torch reads directly (:class:`AttentionProjections`);
* :func:`add_prefix`: prefix tuning of timm attention (Li & Liang 2021): learnable key/value tokens prepended to the
  keys and values of each selected attention, with learnable scales and LAE's attention compensation.

The learnable scalar scales (:class:`Scaler`) are LAE's adaptation-speed calibration (Gao et al., ICCV 2023).

:func:`freeze` turns gradients off for everything except named patterns or the injected modules, and
:func:`trainable_parameters` / :func:`count_trainable` report what is left. :func:`vit_block_names` lists the
transformer blocks of a (wrapped) timm ViT for selectors such as ``"net.blocks.0.attn"``.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError, UnsupportedError

NORM_TYPES: Tuple[type, ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
Selector = Callable[[str, nn.Module], bool]


class PeftModule(nn.Module):
    """Base of the injected wrappers: ``base`` is the wrapped module; the wrapper's own parameters are the PEFT ones."""

    base: nn.Module

    def peft_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]


class FiLM(PeftModule):
    """``base(x) * scale + shift`` with per-channel ``scale`` (init 1) and ``shift`` (init 0); the channel axis is 1
    for BatchNorm/GroupNorm (N x C x ...) and the last for LayerNorm (... x C).

    A norm layer with a fused activation (timm's ``BatchNormAct2d`` / ``GroupNormAct``: a BatchNorm or GroupNorm
    subclass with ``drop`` and ``act`` modules) is modulated between the normalisation and the activation,
    ``act(drop(norm(x) * scale + shift))``, as FiLM after a plain norm layer followed by its activation (and as the
    official FSA-FiLM EfficientNet: ``swish(film(bn(x)))``)."""

    def __init__(self, base: nn.Module, channels: int, channel_dim: int) -> None:
        super().__init__()
        self.base = base
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        norm_only = _norm_forward_without_act(self.base)
        out = self.base(x) if norm_only is None else norm_only(x)
        if self.channel_dim == -1 or out.dim() == 2:
            out = out * self.scale + self.shift
        else:
            shape = [1, -1] + [1] * (out.dim() - 2)
            out = out * self.scale.view(shape) + self.shift.view(shape)
        if norm_only is not None:
            out = self.base.act(self.base.drop(out))
        return out


def _norm_forward_without_act(norm: nn.Module) -> Optional[Callable[[Tensor], Tensor]]:
    """For a norm layer with a fused activation (a BatchNorm/GroupNorm subclass with ``drop`` and ``act`` modules, as
    timm's ``BatchNormAct2d``), its normalisation alone: the forward of the torch class it extends; else None."""
    if not isinstance(norm, (_BatchNorm, nn.GroupNorm)) or not isinstance(getattr(norm, "act", None), nn.Module) \
            or not isinstance(getattr(norm, "drop", None), nn.Module):
        return None
    for cls in type(norm).__mro__[1:]:
        if cls.__module__.startswith("torch.nn.") and issubclass(cls, (_BatchNorm, nn.GroupNorm)):
            return lambda x: cls.forward(norm, x)
    return None


class LoRALinear(PeftModule):
    """``base(x) + (alpha / r) * x A^T B^T``: A (r x in) Kaiming-uniform, B (out x r) zero, so it starts as ``base``."""

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}")
        self.base = base
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> Tensor:
        """The low-rank update (out x in) the adapter adds to ``base.weight``."""
        return self.lora_B @ self.lora_A * self.scaling


class MixtureOfRankLoRA(PeftModule):
    """MoRA (Lu et al., arXiv 2506.21035): a LoRA update split into rank-1 experts ``B_i A_i``, self-activated and
    sparse, with one block of ``r`` experts per task (earlier blocks frozen by the caller).

    For an input token ``x``: raw activations ``z_i = A_i x`` over the live experts of all tasks so far; normalised
    scores ``s_i = z_i / ||z||_2``; the ``k`` best scores (the activation budget) get softmax weights
    ``w = softmax(s / tau)`` (over those ``k``), the rest 0; weights of scores below ``delta`` are zeroed
    (``w_i <- 1[s_i >= delta] w_i``, the paper's adaptive sparse activation). Output
    ``base(x) + alpha * sum_i w_i B_i z_i``. Experts whose ``alive`` flag is off (pruned) never activate. At most
    ``k`` gates are non-zero per token. ``A`` Kaiming-uniform, ``B`` zero: a new task block starts as a no-op.

    ``track``: accumulate how often each expert is active (per token) into ``act_count`` / ``act_tokens`` (tensors,
    no host sync) for end-of-task pruning; ``keep_gates``: keep the last gates (..., R) in ``last_gates`` (tests).
    """

    def __init__(self, base: nn.Linear, r: int = 4, k: int = 2, tau: float = 1.0, delta: float = float("-inf"),
                 alpha: float = 1.0) -> None:
        super().__init__()
        for label, v in (("rank r", r), ("budget k", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"MoRA {label} must be a positive integer, got {v!r}")
        if not float(tau) > 0:
            raise ConfigError(f"MoRA temperature tau must be positive, got {tau!r}")
        self.base = base
        self.r, self.k, self.tau, self.delta, self.alpha = r, k, float(tau), float(delta), float(alpha)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.track = False
        self.keep_gates = False
        self.last_gates: Optional[Tensor] = None
        self.act_count: Optional[Tensor] = None
        self.act_tokens: Optional[Tensor] = None

    @property
    def num_tasks(self) -> int:
        return len(self.A)

    def alive(self, task: int) -> Tensor:
        """Boolean (r,) flags of task ``task``'s experts (False: pruned)."""
        return getattr(self, f"alive_{task}")

    def add_task(self) -> int:
        """Append a block of ``r`` fresh experts (A Kaiming-uniform, B zero); returns its task index."""
        w = self.base.weight
        a = torch.empty(self.r, self.base.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A.append(nn.Parameter(a))
        self.B.append(nn.Parameter(torch.zeros(self.base.out_features, self.r, device=w.device, dtype=w.dtype)))
        t = len(self.A) - 1
        self.register_buffer(f"alive_{t}", torch.ones(self.r, dtype=torch.bool, device=w.device))
        self.reset_stats()
        return t

    def set_num_tasks(self, n: int) -> None:
        """Grow (fresh blocks) or shrink to ``n`` task blocks (used to match a checkpoint before loading it)."""
        while self.num_tasks < n:
            self.add_task()
        if self.num_tasks > n:
            for t in range(n, self.num_tasks):
                delattr(self, f"alive_{t}")
            self.A = nn.ParameterList(list(self.A)[:n])
            self.B = nn.ParameterList(list(self.B)[:n])
        self.reset_stats()

    def freeze_tasks(self, upto: int) -> None:
        """Turn off gradients of the experts of tasks ``0 .. upto - 1`` (the later ones stay as they are)."""
        for t in range(min(upto, self.num_tasks)):
            self.A[t].requires_grad_(False)
            self.B[t].requires_grad_(False)

    def task_parameters(self, task: int) -> List[nn.Parameter]:
        return [self.A[task], self.B[task]]

    def reset_stats(self) -> None:
        n = self.num_tasks * self.r
        dev = self.base.weight.device
        self.act_count = torch.zeros(n, device=dev)
        self.act_tokens = torch.zeros((), device=dev)

    @torch.no_grad()
    def prune(self, task: int, min_freq: float) -> Tensor:
        """Switch off the experts of ``task`` active on fewer than ``min_freq`` of the tracked tokens; returns the
        new alive flags. Without tracked tokens nothing is pruned."""
        alive = self.alive(task)
        if self.act_count is None or self.act_count.numel() != self.num_tasks * self.r:
            return alive
        freq = self.act_count[task * self.r:(task + 1) * self.r] / self.act_tokens.clamp_min(1)
        keep = (freq >= min_freq) | (self.act_tokens == 0)
        alive &= keep
        return alive

    def gates(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(raw activations z = A x, sparse gates w), both (..., R) over all task blocks (R = tasks x r)."""
        a = torch.cat(list(self.A), dim=0)
        z = x @ a.t()
        s = z / z.square().sum(-1, keepdim=True).add(1e-12).sqrt()
        alive = torch.cat([self.alive(t) for t in range(self.num_tasks)])
        s = s.masked_fill(~alive, float("-inf"))
        k = min(self.k, s.shape[-1])
        top, idx = s.topk(k, dim=-1)
        live = torch.isfinite(top)  # fewer than k live experts: the pruned ones picked get no weight
        w_top = torch.softmax(top.masked_fill(~live, -1e4) / self.tau, dim=-1)
        w_top = w_top * ((top >= self.delta) & live).to(w_top.dtype)
        w = torch.zeros_like(s, dtype=w_top.dtype).scatter(-1, idx, w_top)
        return z, w

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.num_tasks == 0:
            return out
        z, w = self.gates(x)
        if self.keep_gates:
            self.last_gates = w.detach()
        if self.track and self.act_count is not None and self.act_count.numel() == w.shape[-1]:
            with torch.no_grad():
                flat = (w.detach() > 0).reshape(-1, w.shape[-1])
                self.act_count += flat.sum(0).to(self.act_count.dtype)
                self.act_tokens += flat.shape[0]
        b = torch.cat(list(self.B), dim=1)
        return out + self.alpha * (w * z) @ b.t()


class _InProjection(nn.Module):
    """The fused q/k/v in-projection of an ``nn.MultiheadAttention`` seen as a Linear (``weight``, ``in_features``,
    ``out_features``, ``forward``), without registering its parameters again (they stay the attention's)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self._mha = [attention]  # a list: not a submodule, so no second path to the frozen weights

    @property
    def weight(self) -> Tensor:
        return self._mha[0].in_proj_weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self._mha[0].in_proj_bias

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class AttentionProjections(PeftModule):
    """Self-attention through an ``nn.MultiheadAttention``'s weights with a PEFT wrapper on its fused in-projection
    (``qkv``) and its ``out_proj`` (``out``), each built by ``factory`` (e.g. LoRA or MoRA on a Linear); torch's
    attention reads those weights directly, so wrapping the Linears alone would not change it.

    Supports what open_clip's towers use: self-attention (query = key = value), optional additive or boolean
    ``attn_mask``, no key padding mask, no bias_k / zero-attention, ``need_weights`` False (returns ``(out, None)``).
    """

    def __init__(self, base: nn.MultiheadAttention, factory: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        if not base._qkv_same_embed_dim or base.bias_k is not None or base.add_zero_attn:
            raise UnsupportedError("AttentionProjections supports a plain nn.MultiheadAttention (fused qkv, no "
                                   "bias_k/bias_v, no add_zero_attn)")
        self.base = base
        self.qkv = factory(_InProjection(base))
        self.out = factory(base.out_proj)

    def peft_parameters(self) -> List[nn.Parameter]:
        return [p for m in (self.qkv, self.out) if isinstance(m, PeftModule) for p in m.peft_parameters()]

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, None]:
        a = self.base
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise UnsupportedError("AttentionProjections supports self-attention only (query, key and value the same)")
        if key_padding_mask is not None or need_weights:
            raise UnsupportedError("AttentionProjections supports neither key_padding_mask nor need_weights=True")
        x = query if a.batch_first else query.transpose(0, 1)  # N x L x D
        n, length, dim = x.shape
        heads = a.num_heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                       dropout_p=a.dropout if self.training else 0.0,
                                                       is_causal=is_causal and attn_mask is None)
        out = self.out(o.transpose(1, 2).reshape(n, length, dim))
        return (out if a.batch_first else out.transpose(0, 1)), None


class Scaler(nn.Module):
    """Multiply by a scalar: a learnable parameter initialised to ``value`` when ``learnable``, else a constant."""

    def __init__(self, value: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        self.learnable = bool(learnable)
        if self.learnable:
            self.scale = nn.Parameter(torch.tensor(float(value)))
        else:
            self.value = float(value)

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.scale if self.learnable else self.value)


class Adapter(PeftModule):
    """A residual bottleneck of width ``bottleneck`` (up-projection and down-projection bias init 0, so it starts as
    ``base``).

    ``mode="after"``: ``h + s * up(act(down(h)))`` with ``h = base(x)`` (Houlsby-style); ``mode="parallel"``:
    ``base(x) + s * up(act(down(x)))`` (AdaptFormer, LAE; input and output widths equal). ``s`` is 1, or a learnable
    scalar (init 1) with ``learnable_scale``. Extra keyword arguments (e.g. timm's ``attn_mask``) go to ``base``.
    """

    def __init__(self, base: nn.Module, dim: int, bottleneck: int = 16, mode: str = "after",
                 learnable_scale: bool = False) -> None:
        super().__init__()
        if mode not in ("after", "parallel"):
            raise ConfigError(f"adapter mode must be 'after' or 'parallel', got {mode!r}")
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ConfigError(f"adapter bottleneck must be a positive integer, got {bottleneck!r}")
        self.base = base
        self.mode = mode
        self.down = nn.Linear(dim, bottleneck)  # weight: Kaiming-uniform (a = sqrt 5), torch's Linear default
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)  # as LAE's Adapter.reset_parameters (and AdaptFormer's)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scaler = Scaler(1.0, learnable=learnable_scale)

    def _branch(self, z: Tensor) -> Tensor:
        if z.dim() == 4:  # N x C x H x W: the adapter mixes channels per position
            return self.scaler(self.up(self.act(self.down(z.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.scaler(self.up(self.act(self.down(z))))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        h = self.base(x, *args, **kwargs)
        return h + self._branch(x if self.mode == "parallel" else h)


class KVLoRA(PeftModule):
    """LoRA on the key and value row blocks of a fused ``qkv`` Linear (rows ``[q; k; v]``), as LAE's ``KVLoRA``:
    ``W + [0; s_k B_k A_k; s_v B_v A_v]`` with A Kaiming-uniform, B zero (starts as ``base``), ``s`` learnable
    scalars (init 1) unless ``learnable_scale`` is False. No ``alpha / r`` factor (the official code has none)."""

    def __init__(self, base: nn.Linear, r: int = 5, learnable_scale: bool = True) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}")
        if base.out_features % 3:
            raise UnsupportedError(f"KVLoRA needs a fused qkv Linear (out_features divisible by 3), got "
                                   f"out_features={base.out_features}")
        self.base = base
        self.r = r
        dim, dev, dt = base.out_features // 3, base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt))
                                        for _ in range(2)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(dim, r, device=dev, dtype=dt)) for _ in range(2)])
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scalers = nn.ModuleList([Scaler(1.0, learnable_scale) for _ in range(2)])

    def delta_weight(self) -> Tensor:
        """The update (out x in) added to ``base.weight``: zero on the query rows."""
        kv = [s(b @ a) for s, a, b in zip(self.scalers, self.lora_A, self.lora_B)]
        return torch.cat([torch.zeros_like(kv[0]), *kv], dim=0)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.base.weight + self.delta_weight(), self.base.bias)


class PrefixAttention(PeftModule):
    """Prefix tuning of a timm ``Attention``: ``length`` learnable key and value tokens (init U(0, 0.01), each set
    times a learnable scalar) join the keys and values of every head.

    With ``compensatory`` (LAE's default) the attention weights on the prefix tokens are renormalised to sum to 1
    per query (``Prefix.compensate`` of the official LAE code), after the softmax over all keys. Attention masks are
    not supported.
    """

    def __init__(self, base: nn.Module, length: int = 10, compensatory: bool = True,
                 learnable_scale: bool = True) -> None:
        super().__init__()
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ConfigError(f"prefix length must be a positive integer, got {length!r}")
        for attr in ("qkv", "proj", "num_heads"):
            if not hasattr(base, attr):
                raise UnsupportedError(f"prefix tuning needs a timm-style attention with qkv/proj/num_heads, got "
                                       f"{type(base).__name__} without {attr!r}")
        if getattr(base, "gate", None) is not None:
            raise UnsupportedError("prefix tuning does not support gated attention")
        self.base = base
        self.length = length
        self.compensatory = bool(compensatory)
        width = base.qkv.out_features // 3
        ref = base.qkv.weight
        self.key = nn.Parameter(torch.empty(length, width, device=ref.device, dtype=ref.dtype).uniform_(0, 0.01))
        self.value = nn.Parameter(torch.empty(length, width, device=ref.device, dtype=ref.dtype).uniform_(0, 0.01))
        self.key_scaler = Scaler(1.0, learnable_scale)
        self.value_scaler = Scaler(1.0, learnable_scale)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise UnsupportedError("prefix tuning does not support attention masks")
        b, n, _ = x.shape
        a = self.base
        heads = a.num_heads
        width = a.qkv.out_features // 3
        hd = width // heads
        q, k, v = a.qkv(x).chunk(3, dim=-1)
        pk = self.key_scaler(self.key).expand(b, -1, -1)
        pv = self.value_scaler(self.value).expand(b, -1, -1)
        k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)  # key order does not matter to attention
        q = q.reshape(b, n, heads, hd).transpose(1, 2)
        k = k.reshape(b, n + self.length, heads, hd).transpose(1, 2)
        v = v.reshape(b, n + self.length, heads, hd).transpose(1, 2)
        q = getattr(a, "q_norm", nn.Identity())(q)
        k = getattr(a, "k_norm", nn.Identity())(k)
        attn = (q * (hd ** -0.5)) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = getattr(a, "attn_drop", nn.Identity())(attn)
        if self.compensatory:
            pre = attn[..., :self.length]
            pre = pre / pre.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            attn = torch.cat([pre, attn[..., self.length:]], dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, width)
        out = getattr(a, "norm", nn.Identity())(out)
        out = a.proj(out)
        return getattr(a, "proj_drop", nn.Identity())(out)


# --- the one mechanism ----------------------------------------------------------------------------------------------

def _selector(select: Union[None, str, Sequence[str], Selector], types: Tuple[type, ...]) -> Selector:
    if select is None:
        return lambda name, m: isinstance(m, types)
    if callable(select):
        return lambda name, m: isinstance(m, types) and bool(select(name, m))
    patterns = [select] if isinstance(select, str) else list(select)
    return lambda name, m: isinstance(m, types) and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def inject(model: nn.Module, select: Selector, factory: Callable[[nn.Module], nn.Module]) -> List[str]:
    """Replace every submodule ``m`` (qualified name ``n``) with ``select(n, m)`` by ``factory(m)``; returns the names.

    Modules inside an already injected wrapper are skipped, so injecting twice does not nest.
    """
    targets = [(n, m) for n, m in model.named_modules()
               if n and select(n, m) and not isinstance(m, PeftModule)
               and not any(isinstance(model.get_submodule(p), PeftModule) for p in _prefixes(n))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factory(module))
    return [n for n, _ in targets]


def _prefixes(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _channels(norm: nn.Module) -> Tuple[int, int]:
    if isinstance(norm, _BatchNorm):
        return norm.num_features, 1
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels, 1
    if isinstance(norm, nn.LayerNorm):
        if len(norm.normalized_shape) != 1:
            raise UnsupportedError(f"FiLM needs a LayerNorm over one axis, got normalized_shape "
                                   f"{tuple(norm.normalized_shape)}")
        return int(norm.normalized_shape[0]), -1
    raise UnsupportedError(f"FiLM does not know the channels of {type(norm).__name__}")


def add_film(model: nn.Module, select: Union[None, str, Sequence[str], Selector] = None) -> List[FiLM]:
    """Wrap every norm layer (BatchNorm, LayerNorm, GroupNorm; ``select`` narrows by name pattern or predicate)
    in :class:`FiLM`; returns the new modules (2 x channels parameters each)."""
    def make(norm: nn.Module) -> FiLM:
        c, dim = _channels(norm)
        ref = next(iter(norm.parameters()), None)
        film = FiLM(norm, c, dim)
        return film.to(ref.device) if ref is not None else film

    names = inject(model, _selector(select, NORM_TYPES), make)
    if not names:
        raise UnsupportedError(f"add_film found no norm layer in {type(model).__name__}")
    return [model.get_submodule(n) for n in names]


def efficientnet_film_layers(model: nn.Module) -> Optional[List[str]]:
    """The norm layers the official FSA-FiLM modulates, in the timm EfficientNet inside ``model`` (None when it holds
    none): the stem BN (``bn1``), each block's BN after its depthwise conv and the head BN (``bn2``).

    Official (aresPanos/fsa ``src/cnn/efficientnet.py``, ``FilmEfficientNet``): FiLM after ``_bn0`` (stem), after
    each ``MBConvBlock``'s ``_bn1`` (the depthwise conv's BN) and after ``_bn1`` (head), each before the swish. In
    timm's blocks the depthwise BN is ``bn1`` of ``DepthwiseSeparableConv`` (conv_dw -> bn1 -> se -> conv_pw -> bn2;
    the official expand-ratio-1 block) and ``bn2`` of ``InvertedResidual`` / ``CondConvResidual`` (conv_pw -> bn1 ->
    conv_dw -> bn2 -> se -> conv_pwl -> bn3). Blocks without a depthwise conv (EfficientNetV2's ``EdgeResidual``,
    ``ConvBnAct``; not in the official B0) take the BN after their spatial conv (``bn1``): our extension.
    """
    try:
        from timm.models._efficientnet_blocks import (ConvBnAct, DepthwiseSeparableConv, EdgeResidual,
                                                      InvertedResidual)
        from timm.models.efficientnet import EfficientNet
    except ImportError:  # timm missing or reorganised: no official placement to offer
        return None
    nets = [(n, m) for n, m in model.named_modules() if isinstance(m, EfficientNet)]
    if not nets:
        return None
    if len(nets) > 1:
        raise UnsupportedError(f"{type(model).__name__} holds {len(nets)} timm EfficientNets; the FiLM placement "
                               f"needs exactly one")
    prefix, net = nets[0]
    p = prefix + "." if prefix else ""
    names = [p + "bn1"]
    for i, stage in enumerate(net.blocks):
        for j, block in enumerate(stage):
            if isinstance(block, InvertedResidual):  # CondConvResidual included
                bn = "bn2"
            elif isinstance(block, (DepthwiseSeparableConv, EdgeResidual, ConvBnAct)):
                bn = "bn1"
            else:
                raise UnsupportedError(f"no FSA-FiLM placement for the timm block {type(block).__name__} "
                                       f"(blocks.{i}.{j}); use FiLM on every norm layer instead")
            names.append(f"{p}blocks.{i}.{j}.{bn}")
    names.append(p + "bn2")
    return names


def add_lora(model: nn.Module, r: int = 4, alpha: float = 1.0, select: Union[None, str, Sequence[str], Selector] = None,
             dropout: float = 0.0) -> List[LoRALinear]:
    """Wrap Linear layers (all, or those ``select`` names, e.g. ``"*.attn.qkv"``) in :class:`LoRALinear`."""
    names = inject(model, _selector(select, (nn.Linear,)), lambda m: LoRALinear(m, r, alpha, dropout))
    if not names:
        raise UnsupportedError(f"add_lora found no nn.Linear matching {select!r} in {type(model).__name__}")
    return [model.get_submodule(n) for n in names]


def _not_mha_out_proj(model: nn.Module) -> Selector:
    """False for the ``out_proj`` of an ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` directly, so a
    wrapper there would break it)."""
    mha = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return lambda name, m: name.rpartition(".")[0] not in mha


def add_mora(model: nn.Module, r: int = 4, k: int = 2, tau: float = 1.0, delta: float = float("-inf"),
             alpha: float = 1.0, select: Union[None, str, Sequence[str], Selector] = None,
             tasks: int = 1, attention: bool = False) -> List[MixtureOfRankLoRA]:
    """Wrap Linear layers (``select``: name patterns or predicate; the out-projection of ``nn.MultiheadAttention``
    is never wrapped as a Linear) in :class:`MixtureOfRankLoRA` with ``tasks`` blocks of ``r`` rank-1 experts each;
    with ``attention``, also the in- and out-projections of every ``nn.MultiheadAttention`` (open_clip's towers)
    through :class:`AttentionProjections`. Returns every MoRA module."""
    def make(m: nn.Module) -> MixtureOfRankLoRA:
        return MixtureOfRankLoRA(m, r, k, tau, delta, alpha)

    wrappers = add_attention_peft(model, make) if attention else []
    sel = _selector(select, (nn.Linear,))
    ok = _not_mha_out_proj(model)
    names = inject(model, lambda n, m: sel(n, m) and ok(n, m), make)
    mods = [m for w in wrappers for m in (w.qkv, w.out)] + [model.get_submodule(n) for n in names]
    if not mods:
        raise UnsupportedError(f"add_mora found no nn.Linear matching {select!r}"
                               f"{' nor nn.MultiheadAttention' if attention else ''} in {type(model).__name__}")
    for m in mods:
        m.set_num_tasks(tasks)
    return mods

def add_attention_peft(model: nn.Module, factory: Callable[[nn.Module], nn.Module],
                       select: Union[None, str, Sequence[str], Selector] = None) -> List[AttentionProjections]:
    """Wrap each ``nn.MultiheadAttention`` (``select`` narrows) in :class:`AttentionProjections`, whose in- and
    out-projections get ``factory`` (e.g. ``lambda m: LoRALinear(m, 4)``); returns the wrappers (maybe none)."""
    names = inject(model, _selector(select, (nn.MultiheadAttention,)), lambda m: AttentionProjections(m, factory))
    return [model.get_submodule(n) for n in names]


def add_adapter(model: nn.Module, select: Union[str, Sequence[str], Selector], dim: int,
                bottleneck: int = 16, mode: str = "after", learnable_scale: bool = False) -> List[Adapter]:
    """Put a residual bottleneck :class:`Adapter` after (``mode="after"``) or beside (``"parallel"``) each module
    ``select`` names (its output width is ``dim``); ``learnable_scale`` adds LAE's learnable output scale."""
    names = inject(model, _selector(select, (nn.Module,)),
                   lambda m: Adapter(m, dim, bottleneck, mode, learnable_scale).to(
                       next(iter(m.parameters()), torch.empty(0)).device))
    if not names:
        raise UnsupportedError(f"add_adapter found no module matching {select!r} in {type(model).__name__}")
    return [model.get_submodule(n) for n in names]


def add_kv_lora(model: nn.Module, r: int = 5, select: Union[None, str, Sequence[str], Selector] = "*.attn.qkv",
                learnable_scale: bool = True) -> List[KVLoRA]:
    """Wrap fused qkv Linear layers (``select``) in :class:`KVLoRA` (LoRA on keys and values, LAE)."""
    names = inject(model, _selector(select, (nn.Linear,)), lambda m: KVLoRA(m, r, learnable_scale))
    if not names:
        raise UnsupportedError(f"add_kv_lora found no nn.Linear matching {select!r} in {type(model).__name__}")
    return [model.get_submodule(n) for n in names]


def add_prefix(model: nn.Module, select: Union[str, Sequence[str], Selector] = "*.attn", length: int = 10,
               compensatory: bool = True, learnable_scale: bool = True) -> List[PrefixAttention]:
    """Wrap timm attention modules (``select``; modules with ``qkv``, ``proj`` and ``num_heads``) in
    :class:`PrefixAttention`: 2 x ``length`` x width prefix parameters (+2 scales) each."""
    def is_attention(name: str, m: nn.Module) -> bool:
        return all(hasattr(m, a) for a in ("qkv", "proj", "num_heads"))

    base_sel = _selector(select, (nn.Module,))
    names = inject(model, lambda n, m: base_sel(n, m) and is_attention(n, m),
                   lambda m: PrefixAttention(m, length, compensatory, learnable_scale))
    if not names:
        raise UnsupportedError(f"add_prefix found no attention module matching {select!r} in {type(model).__name__}")
    return [model.get_submodule(n) for n in names]


def vit_block_names(model: nn.Module) -> List[str]:
    """Qualified names of the transformer blocks of a timm ViT (bare or wrapped, e.g. ``net.blocks.3``)."""
    for name, m in model.named_modules():
        if name.split(".")[-1] == "blocks" and isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) and \
                all(hasattr(b, "attn") for b in m):
            return [f"{name}.{i}" for i in range(len(m))]
    raise UnsupportedError(f"{type(model).__name__} has no ViT 'blocks' container of attention blocks")


def peft_modules(model: nn.Module) -> List[PeftModule]:
    return [m for m in model.modules() if isinstance(m, PeftModule)]


def peft_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters the injected modules added (not those of the modules they wrap)."""
    return [p for m in peft_modules(model) for p in m.peft_parameters()]


def freeze(model: nn.Module, except_: Union[None, str, Iterable[str]] = None, peft: bool = False) -> List[str]:
    """Turn off gradients of every parameter of ``model`` except those whose qualified name matches a pattern of
    ``except_`` (fnmatch, e.g. ``"net.fc.*"``) and, with ``peft``, the parameters of injected modules.

    Returns the names left trainable. Norm statistics are buffers: keep the frozen part in ``eval()`` mode too.
    """
    patterns = [except_] if isinstance(except_, str) else list(except_ or [])
    keep = {id(p) for p in peft_parameters(model)} if peft else set()
    trainable = []
    for name, p in model.named_parameters():
        on = id(p) in keep or any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(on)
        if on:
            trainable.append(name)
    unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n, _ in model.named_parameters())]
    if unmatched:
        raise ConfigError(f"freeze: no parameter matches {unmatched} in {type(model).__name__}")
    return trainable


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def head_parameter_names(model: nn.Module) -> List[str]:
    """Qualified names of the final classifier's parameters (timm ``get_classifier()``, else the last Linear)."""
    net = getattr(model, "net", model)
    head: Optional[nn.Module] = None
    if hasattr(net, "get_classifier"):
        head = net.get_classifier()
    else:
        for m in model.modules():
            if isinstance(m, nn.Linear) and not isinstance(m, PeftModule):
                head = m
    if head is None or not any(True for _ in head.parameters()):
        raise UnsupportedError(f"cannot find the classifier head of {type(model).__name__}")
    ids = {id(p) for p in head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


__all__ = ["Adapter", "AttentionProjections", "FiLM", "KVLoRA", "LoRALinear", "MixtureOfRankLoRA", "NORM_TYPES",
           "PeftModule", "PrefixAttention", "Scaler", "add_adapter", "add_attention_peft", "add_film", "add_kv_lora",
           "add_lora", "add_mora", "add_prefix", "count_trainable", "efficientnet_film_layers", "freeze",
           "head_parameter_names", "inject", "peft_modules", "peft_parameters", "trainable_parameters",
           "vit_block_names"]


# --- EASE: one adapter per task beside each block's MLP ---------------------------------------------------------------

class Bottleneck(nn.Module):
    """The adapter branch alone, ``s * up(act(down(x)))``: Kaiming-uniform (a = sqrt 5) down-projection, zero biases
    and up-projection (so it adds 0 at first), ReLU then dropout (AdaptFormer / PILOT's ``init_option="lora"``)."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.down = torch.nn.utils.skip_init(nn.Linear, dim, bottleneck)  # no draw from the global generator
        self.act = nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
        self.up = torch.nn.utils.skip_init(nn.Linear, bottleneck, dim)
        self.scaler = Scaler(scale, learnable=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            for p in (self.down.bias, self.up.weight, self.up.bias):
                p.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.scaler(self.up(self.act(self.down(x))))


class AdapterSet(PeftModule):
    """Several parallel bottleneck adapters beside one module, one per task (EASE's expandable subspaces):
    ``base(x) + branch_k(x)`` with ``k = active`` (None: ``base(x)``, the pretrained model). :meth:`add` appends a
    fresh :class:`Bottleneck`; the caller freezes the earlier ones."""

    def __init__(self, base: nn.Module, dim: int, bottleneck: int = 64, scale: float = 0.1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ConfigError(f"adapter bottleneck must be a positive integer, got {bottleneck!r}")
        self.base = base
        self.dim, self.bottleneck, self.scale, self.dropout = int(dim), bottleneck, float(scale), float(dropout)
        self.adapters = nn.ModuleList()
        self.active: Optional[int] = None

    def __len__(self) -> int:
        return len(self.adapters)

    def add(self, generator: Optional[torch.Generator] = None) -> Bottleneck:
        """Append a fresh adapter (its down-projection drawn from ``generator``); returns it."""
        ref = next(iter(self.base.parameters()), None)
        ad = Bottleneck(self.dim, self.bottleneck, self.scale, self.dropout, generator)
        self.adapters.append(ad.to(ref.device) if ref is not None else ad)
        return ad

    def set_count(self, n: int, generator: Optional[torch.Generator] = None) -> None:
        """Grow (fresh adapters) or shrink to ``n`` adapters (to match a checkpoint before loading it)."""
        while len(self.adapters) < n:
            self.add(generator)
        if len(self.adapters) > n:
            self.adapters = nn.ModuleList(list(self.adapters)[:n])
        if self.active is not None and self.active >= n:
            self.active = None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base(x, *args, **kwargs)
        if self.active is None:
            return out
        return out + self.adapters[self.active](x)


def add_ffn_adapter_sets(model: nn.Module, bottleneck: int = 64, scale: float = 0.1,
                         dropout: float = 0.0) -> List[AdapterSet]:
    """An empty :class:`AdapterSet` beside every ViT block's MLP (AdaptFormer's parallel placement, as PILOT's
    ``vit_ease.Block``): ``x + mlp(norm2(x)) + branch_k(x)`` with ``x`` the stream after attention (the block's
    ``norm2`` moves inside the wrapped branch so the adapter reads ``x``); returns the sets, in block order."""
    sets = []
    for name in vit_block_names(model):
        block = model.get_submodule(name)
        width = block.mlp.fc2.out_features
        s = AdapterSet(nn.Sequential(block.norm2, block.mlp), width, bottleneck, scale, dropout)
        block.mlp, block.norm2 = s, nn.Identity()
        sets.append(s)
    return sets


def set_active_adapter(sets: Sequence[AdapterSet], index: Optional[int]) -> None:
    """Route every set through its adapter ``index`` (None: none, the pretrained path)."""
    for s in sets:
        s.active = index


__all__ += ["AdapterSet", "Bottleneck", "add_ffn_adapter_sets", "set_active_adapter"]


# --- SSF (scale and shift of features) and VPT (visual prompt tokens): APER's first-session PEFT ---------------------

class SSF(PeftModule):
    """SSF (Lian, Zhou, Feng, Wang; "Scaling & Shifting Your Features", NeurIPS 2022, arXiv 2210.08823):
    ``base(x) * scale + shift`` per output channel (the last axis; axis 1 after a Conv2d), ``scale`` ~ N(1, 0.02) and
    ``shift`` ~ N(0, 0.02) as LAMDA-PILOT's ``backbone/vit_ssf.py`` ``init_ssf_scale_shift`` (not the identity)."""

    def __init__(self, base: nn.Module, channels: int, channel_dim: int = -1,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.base = base
        self.channel_dim = int(channel_dim)
        ref = next(iter(base.parameters()), torch.empty(0))
        self.scale = nn.Parameter(torch.empty(channels, device=ref.device).normal_(1.0, 0.02, generator=generator))
        self.shift = nn.Parameter(torch.empty(channels, device=ref.device).normal_(0.0, 0.02, generator=generator))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base(x, *args, **kwargs)
        if self.channel_dim == 1 and out.dim() > 2:
            shape = [1, -1] + [1] * (out.dim() - 2)
            return out * self.scale.view(shape) + self.shift.view(shape)
        return out * self.scale + self.shift


def _ssf_channels(m: nn.Module) -> Tuple[int, int]:
    """(channels, channel axis) of a module SSF follows: Linear, LayerNorm or Conv2d."""
    if isinstance(m, nn.Linear):
        return m.out_features, -1
    if isinstance(m, nn.Conv2d):
        return m.out_channels, 1
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return int(m.normalized_shape[0]), -1
    raise UnsupportedError(f"SSF needs a Linear, Conv2d or 1-axis LayerNorm, got {type(m).__name__}")


def vit_ssf_layers(model: nn.Module) -> List[str]:
    """The layers PILOT's SSF ViT (``backbone/vit_ssf.py``) follows with a scale and shift, in a timm ViT: the patch
    projection (and patch norm, if any), each block's ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``, and the final ``norm``."""
    blocks = vit_block_names(model)
    prefix = blocks[0].rpartition(".")[0].rpartition("blocks")[0]
    names = [prefix + "patch_embed.proj"]
    if isinstance(getattr(model.get_submodule(prefix + "patch_embed"), "norm", None), nn.LayerNorm):
        names.append(prefix + "patch_embed.norm")
    for b in blocks:
        names += [f"{b}.{s}" for s in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
    if isinstance(getattr(model.get_submodule(prefix.rstrip(".")) if prefix else model, "norm", None), nn.LayerNorm):
        names.append(prefix + "norm")
    return names


def add_ssf(model: nn.Module, select: Union[None, str, Sequence[str], Selector] = None,
            generator: Optional[torch.Generator] = None) -> List[SSF]:
    """Wrap the layers ``select`` names (default: :func:`vit_ssf_layers`, PILOT's placement) in :class:`SSF`, in
    module order; returns the new modules (2 x channels parameters each)."""
    if select is None:
        wanted = set(vit_ssf_layers(model))
        select = lambda name, m: name in wanted  # noqa: E731

    def make(m: nn.Module) -> SSF:
        c, dim = _ssf_channels(m)
        return SSF(m, c, dim, generator)

    names = inject(model, _selector(select, (nn.Linear, nn.Conv2d, nn.LayerNorm)), make)
    if not names:
        raise UnsupportedError(f"add_ssf found no layer matching {select!r} in {type(model).__name__}")
    return [model.get_submodule(n) for n in names]


class PromptTokens(PeftModule):
    """VPT (Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim; "Visual Prompt Tuning", ECCV 2022, arXiv 2203.12119):
    ``length`` learnable tokens appended after the token sequence (N x L x D) entering ``base`` and dropped from its
    output (the first L tokens come out), as PILOT's ``backbone/vpt.py`` ``VPT_ViT.forward_features``; zero init as
    there. Wrapping each block is VPT-deep, wrapping the block stack once is VPT-shallow."""

    def __init__(self, base: nn.Module, length: int, dim: int) -> None:
        super().__init__()
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ConfigError(f"prompt length must be a positive integer, got {length!r}")
        self.base = base
        ref = next(iter(base.parameters()), torch.empty(0))
        self.tokens = nn.Parameter(torch.zeros(length, dim, device=ref.device))

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        n = x.shape[1]
        x = torch.cat([x, self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        return self.base(x, *args, **kwargs)[:, :n]


def add_vpt(model: nn.Module, length: int = 5, deep: bool = True) -> List[PromptTokens]:
    """VPT on a timm ViT: :class:`PromptTokens` around every block (``deep``) or around the block stack (shallow:
    one set of tokens through all blocks); returns the new modules."""
    blocks = vit_block_names(model)
    dim = int(model.get_submodule(blocks[0]).norm1.normalized_shape[0])
    targets = blocks if deep else [blocks[0].rpartition(".")[0]]
    wanted = set(targets)
    inject(model, lambda n, m: n in wanted, lambda m: PromptTokens(m, length, dim))
    return [model.get_submodule(n) for n in targets]


__all__ += ["PromptTokens", "SSF", "add_ssf", "add_vpt", "vit_ssf_layers"]
