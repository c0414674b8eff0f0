"""The selective scan of Mamba (S6) with a pluggable backend, and a small Mamba block built on it.

The recurrence (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023, Alg. 2), per
channel ``d`` and state ``n``, with input-dependent step ``delta``, ``B`` and ``C``::

    delta_t = softplus(delta_t + delta_bias)                       (when delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     (zero-order hold for A, Euler for B)
    y_t     = <C_t, h_t> + D * u_t
    out_t   = y_t * silu(z_t)                                      (when a gate z is given)

Backends: ``"torch"`` (:func:`selective_scan_ref`, plain PyTorch, any device, differentiable; chunks of the
sequence in closed form, state carried between chunks), ``"mamba"`` (the ``mamba-ssm`` CUDA kernel
``selective_scan_fn``, imported lazily) and ``"auto"`` (the kernel for CUDA tensors when it is installed, the
reference otherwise). :func:`selective_scan_naive` is the step-by-step definition above, kept for tests.
Shapes follow ``mamba_ssm``: ``u, delta, z``: (batch, d, L); ``A``: (d, n); ``B, C``: (batch, n, L); ``D``,
``delta_bias``: (d,).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.errors import ConfigError, UnsupportedError

BACKENDS = ("auto", "torch", "mamba")

ScanOut = Union[Tensor, Tuple[Tensor, Tensor]]


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ConfigError(f"selective scan: u and delta must both be (batch, d, L), got {tuple(u.shape)} and "
                          f"{tuple(delta.shape)}")
    b, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ConfigError(f"selective scan: A must be (d={d}, n), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, n, length):
            raise ConfigError(f"selective scan: {name} must be (batch, n, L) = {(b, n, length)}, got {tuple(t.shape)}")


def _prepare(u: Tensor, delta: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
             delta_softplus: bool) -> Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    if D is not None:
        y = y + u.float() * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_scan_naive(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                         z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                         delta_softplus: bool = False, return_last_state: bool = False) -> ScanOut:
    """The S6 recurrence one time step at a time (the definition; slow, for tests)."""
    _check_shapes(u, delta, A, B, C)
    dt = _prepare(u, delta, D, z, delta_bias, delta_softplus)
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1], dtype=torch.float32)
    ys = []
    for t in range(length):
        a_bar = torch.exp(dt[:, :, t, None] * A.float()[None])                          # (b, d, n)
        b_bar_u = dt[:, :, t, None] * B.float()[:, None, :, t] * u.float()[:, :, t, None]
        h = a_bar * h + b_bar_u
        ys.append((h * C.float()[:, None, :, t]).sum(-1))                                # (b, d)
    out = _finish(torch.stack(ys, dim=-1), u, D, z)
    return (out, h) if return_last_state else out


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                       return_last_state: bool = False, chunk: int = 16) -> ScanOut:
    """The S6 scan in plain PyTorch: within a chunk of ``chunk`` steps the state is the closed form
    ``h_t = exp(S_t) h_0 + sum_{s<=t} exp(S_t - S_s) delta_s B_s u_s`` with ``S_t = sum_{r<=t} delta_r A``
    (one batched product, no Python loop over steps); the last state carries into the next chunk.
    Memory per chunk: batch x d x chunk^2 x n."""
    _check_shapes(u, delta, A, B, C)
    if chunk < 1:
        raise ConfigError(f"selective scan: chunk must be >= 1, got {chunk}")
    dt = _prepare(u, delta, D, z, delta_bias, delta_softplus)                              # (b, d, L)
    b, d, length = u.shape
    a = A.float()
    log_a = dt.unsqueeze(-1) * a[None, :, None, :]                                         # (b, d, L, n), <= 0
    bu = (dt * u.float()).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(1)           # (b, d, L, n)
    c = C.float().transpose(1, 2).unsqueeze(1)                                              # (b, 1, L, n)
    h = u.new_zeros(b, d, a.shape[1], dtype=torch.float32)
    ys = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        s = torch.cumsum(log_a[:, :, start:stop], dim=2)                                    # (b, d, T, n)
        t_len = stop - start
        diff = s.unsqueeze(3) - s.unsqueeze(2)                                              # [t, s] = S_t - S_s
        future = torch.ones(t_len, t_len, dtype=torch.bool, device=u.device).triu(1)        # s > t
        weight = torch.exp(diff.masked_fill(future[None, None, :, :, None], float("-inf")))
        states = (weight * bu[:, :, start:stop].unsqueeze(2)).sum(3) + torch.exp(s) * h.unsqueeze(2)
        ys.append((states * c[:, :, start:stop]).sum(-1))                                   # (b, d, T)
        h = states[:, :, -1]
    out = _finish(torch.cat(ys, dim=-1), u, D, z)
    return (out, h) if return_last_state else out


def mamba_kernel_available() -> bool:
    """True when ``mamba_ssm``'s CUDA selective scan can be imported (and CUDA is present)."""
    if not torch.cuda.is_available():
        return False
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or a broken CUDA extension)
        return False
    return True


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str = "auto") -> ScanOut:
    """The selective scan with the chosen backend (see the module docstring)."""
    if backend not in BACKENDS:
        raise ConfigError(f"selective scan backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    use_kernel = backend == "mamba" or (backend == "auto" and u.is_cuda and mamba_kernel_available())
    if not use_kernel:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if not u.is_cuda:
        raise UnsupportedError(f"the mamba selective-scan kernel needs CUDA tensors, got tensors on {u.device}")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedError(f"selective scan backend 'mamba' needs the mamba-ssm package with its CUDA kernels "
                               f"(pip install mamba-ssm): {exc}") from None
    return selective_scan_fn(u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(),
                             C.contiguous(), None if D is None else D.float().contiguous(),
                             z=None if z is None else z.contiguous(),
                             delta_bias=None if delta_bias is None else delta_bias.float().contiguous(),
                             delta_softplus=delta_softplus, return_last_state=return_last_state)


class SelectiveSSM(nn.Module):
    """A Mamba block without output projection (as in Mamba-FSCIL's neck): input projection to ``x`` and a gate
    ``z``, causal depthwise convolution + SiLU on ``x``, input-dependent ``delta, B, C`` from ``x``, selective scan,
    output gated by ``silu(z)``. Initialisation as ``mamba_ssm``'s ``Mamba``: S4D-real ``A = -(1..n)``, ``D = 1``,
    ``delta`` bias so that ``softplus(bias)`` is log-uniform in [dt_min, dt_max].

    ``forward(x)`` with ``x`` (batch, L, d_model) returns ``(y, z, params)``: ``y`` (batch, L, d_inner), the gate
    pre-activation ``z`` (batch, d_inner, L) and ``params`` = ``{"dt": (batch, dt_rank, L), "B": (batch, n, L),
    "C": (batch, n, L)}`` (the input-dependent scan parameters, used by class-sensitive losses).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 1.0,
                 dt_rank: Optional[int] = None, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, backend: str = "auto", generator: Optional[torch.Generator] = None
                 ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"selective scan backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.d_inner = int(expand * d_model)
        self.dt_rank = int(dt_rank) if dt_rank else math.ceil(d_model / 16)
        self.backend = backend
        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        std = self.dt_rank ** -0.5
        with torch.no_grad():
            self.dt_proj.weight.uniform_(-std, std, generator=generator)
            dt = torch.exp(torch.rand(self.d_inner, generator=generator) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def zero_gate(self) -> None:
        """Zero the rows of ``in_proj`` that make the gate ``z``: ``silu(0) = 0``, so the block outputs exactly zero
        until those rows are trained (Mamba-FSCIL's zero-initialised novel branch)."""
        with torch.no_grad():
            self.in_proj.weight[self.d_inner:].zero_()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
        length = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)                                     # (b, 2 d_inner, L)
        xs, z = xz.chunk(2, dim=1)
        xs = F.silu(self.conv1d(xs)[..., :length])                               # causal
        dbl = self.x_proj(xs.transpose(1, 2))                                    # (b, L, r + 2n)
        dt, b_in, c_in = torch.split(dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj.weight @ dt.transpose(1, 2)                         # (b, d_inner, L), bias in the scan
        b_in, c_in = b_in.transpose(1, 2).contiguous(), c_in.transpose(1, 2).contiguous()
        y = selective_scan(xs, delta, -torch.exp(self.A_log.float()), b_in, c_in, self.D, z=z,
                           delta_bias=self.dt_proj.bias, delta_softplus=True, backend=self.backend)
        return y.transpose(1, 2), z, {"dt": dt.transpose(1, 2), "B": b_in, "C": c_in}
