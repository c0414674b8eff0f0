"""Projected AdamW of CoSO (Continuous Subspace Optimization, arXiv 2505.11816; code github.com/quinn-ch/CoSO,
``coso/adamw.py`` and ``coso/coso_projector.py``).

Parameter groups with ``subspace=True`` hold 2-D weights W (m x n); for each, every step:

1. the gradient G is made orthogonal to the historical subspace H (m x k): ``G <- G - H H^T G``;
2. every ``update_gap`` steps the top-``proj_rank`` left singular vectors of G become the current subspace P, and G
   is absorbed into a rank-``sketch_rank`` frequent-directions sketch of the task (``fd_sketch.py``; with
   ``shrink_block``, the default, G is first cut to its top ``sketch_rank`` directions shrunk by its own
   (``sketch_rank``+1)-th singular value, as the official ``DoubleSVD``, reusing the SVD taken for P);
3. Adam runs on ``P^T G`` (moments in projected coordinates, as the official code, not rotated when P changes);
   the update ``P (m / (sqrt(v) + eps))`` is applied with AdamW's bias correction, the decoupled weight decay on W
   whole, as the official code.

:meth:`SubspaceAdamW.end_task` appends the sketch's directions holding a ``threshold`` share of its energy to H (by
default the official count ``sum(cumsum(share) < threshold)``; ``rule="reach"``: the fewest that reach it, one more)
as they are (the official concatenation: orthonormal up to rounding, as the sketched gradients were orthogonal to H)
and resets the moments, the step and the sketch. ``orthonormalize=True`` (not the official code) instead
re-orthonormalises the new directions against H by QR (dropping near-duplicates), projects each update and the
weight decay off H again (exact orthogonality whatever the numerics). Other groups are plain AdamW. Every operation
is the official one in the official order, so on the same gradients the weights are bit-identical to its
``CoSOAdamW`` (benchmarks/coso_reference.py ``--optimizer-check``). All state is tensors, so ``state_dict`` /
``load_state_dict`` carry it across a resume.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ctta.errors import ConfigError

from .fd_sketch import energy_rank, fd_update


class SubspaceAdamW(torch.optim.Optimizer):
    """AdamW whose ``subspace`` groups update only inside a gradient subspace orthogonal to past tasks' subspace."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, proj_rank: int = 15, sketch_rank: int = 100,
                 sketch_decay: float = 1.0, update_gap: int = 1, shrink_block: bool = True,
                 orthonormalize: bool = False) -> None:
        for name, v in (("proj_rank", proj_rank), ("sketch_rank", sketch_rank), ("update_gap", update_gap)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, subspace=False, proj_rank=proj_rank,
                        sketch_rank=sketch_rank, sketch_decay=sketch_decay, update_gap=update_gap,
                        shrink_block=bool(shrink_block), orthonormalize=bool(orthonormalize))
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["subspace"]:
                bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
                if bad:
                    raise ConfigError(f"subspace groups take 2-D weights only, got shapes {bad}")

    # --- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Any] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                hist: Optional[Tensor] = state.get("hist") if group["subspace"] else None
                exact = hist is not None and group["orthonormalize"]
                if group["subspace"]:
                    if hist is not None:
                        grad = grad - hist @ (hist.T @ grad)
                    if "proj" not in state or state["step"] % group["update_gap"] == 0:
                        u, s, _ = torch.linalg.svd(grad.float(), full_matrices=False)
                        state["proj"] = u[:, :group["proj_rank"]].to(p.dtype)
                        state["fd_basis"], state["fd_sigma"] = fd_update(
                            state.get("fd_basis"), state.get("fd_sigma"), grad, group["sketch_rank"],
                            group["sketch_decay"], group["shrink_block"], block_svd=(u, s))
                    grad = state["proj"].T @ grad
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                update = m / (v.sqrt() + group["eps"])
                if group["subspace"]:
                    update = state["proj"] @ update
                    if exact:
                        update = update - hist @ (hist.T @ update)
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0:
                    decay = p - hist @ (hist.T @ p) if exact else p
                    p.add_(decay, alpha=-group["lr"] * group["weight_decay"])
        return loss

    # --- task boundaries ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def end_task(self, threshold: float = 0.98, rule: str = "below") -> Dict[str, int]:
        """Close a task: the sketch's leading directions holding a ``threshold`` share of its energy
        (:func:`energy_rank`, ``rule``) join each weight's historical subspace; moments, step, current subspace and
        sketch are reset. Returns the historical dimension per subspace weight (index ``"g.i"``) for logging."""
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {threshold!r}")
        dims: Dict[str, int] = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                state = self.state[p]
                if group["subspace"] and "fd_sigma" in state:
                    k = energy_rank(state["fd_sigma"], threshold, rule)
                    new = state["fd_basis"][:, :k]
                    hist = state.get("hist")
                    if hist is None:  # H exists from the first task end on, maybe empty (the official rule may keep 0)
                        hist = p.new_zeros(p.shape[0], 0)
                    if k and group["orthonormalize"]:
                        new = new - hist @ (hist.T @ new)
                        q, r = torch.linalg.qr(new.float())
                        keep = r.diagonal().abs() > 1e-6  # drop directions already (numerically) in H
                        hist = torch.cat([hist, q[:, keep].to(p.dtype)], dim=1)[:, :p.shape[0]]
                    elif k:  # the official concatenation
                        hist = torch.cat([hist, new], dim=1)
                    state["hist"] = hist
                for key in ("proj", "fd_basis", "fd_sigma", "exp_avg", "exp_avg_sq"):
                    state.pop(key, None)
                if state:
                    state["step"] = 0
                if group["subspace"]:
                    h = state.get("hist")
                    dims[f"{gi}.{pi}"] = 0 if h is None else int(h.shape[1])
        return dims

    def historical_basis(self, p: Tensor) -> Optional[Tensor]:
        """H (m x k, orthonormal columns up to rounding; k may be 0) of a subspace weight, None before its first task
        ends."""
        return self.state[p].get("hist") if p in self.state else None

    def reset_group_state(self, groups: List[int]) -> None:
        """Forget the Adam state of the given (plain) groups, e.g. a head at a new session."""
        for gi in groups:
            for p in self.param_groups[gi]["params"]:
                self.state.pop(p, None)
