"""CODA-Prompt: continual decomposed attention-based prompting on a frozen ViT (rehearsal-free class-incremental).

Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris, Kira; "CODA-Prompt: COntinual Decomposed
Attention-based Prompting for Rehearsal-Free Continual Learning" (CVPR 2023, arXiv 2211.13218). Reference for the
numbers: LAMDA-PILOT@2647455 ``models/coda_prompt.py`` (learner), ``backbone/prompt.py`` ``CodaPrompt`` (used by
``backbone/vit_coda_promtpt.py``), ``exps/coda_prompt.json``; cross-read with the official GT-RIPL/CODA-Prompt@6417d4f
(``models/zoo.py`` ``CodaPrompt`` / ``ViTZoo``, ``learners/prompt.py``, ``utils/schedulers.py``,
``experiments/cifar-100.sh``), whose prompt module, loss, optimiser and schedule PILOT's equal line for line (PILOT
ports it); run side by side by ``benchmarks/coda_prompt_reference.py``.

Per prompted layer l (the reference's ``e_layers`` 0-4, capped at the ViT's depth) a pool of M components
``P_l`` (M x L x D), keys ``K_l`` (M x D_k) and attention vectors ``A_l`` (M x D_k), split into ``num_tasks``
slices of ``M // num_tasks``. For an image x:

1. query ``q`` = the frozen ViT's [CLS] feature of x (a forward without prompts, :func:`frozen_query`);
2. weights ``alpha_m = cos(q * A_m, K_m)`` over the components of the tasks so far (:func:`component_weights`);
3. prompt ``p = sum_m alpha_m P_m`` (B x L x D); its first L/2 tokens are prefix keys, the last L/2 prefix values
   of layer l's attention (prefix tuning: :func:`strategies.common.prompt_pool.vit_blocks`, one softmax over prefix
   and sequence keys, as the reference's ``Attention``);
4. logits = head of the prompted [CLS] token after the final norm.

Training (task t): only slice t of every P, K, A learns; slices < t enter detached (``K[:s].detach()``) and are never
updated; at the start of task t > 0 slice t is re-initialised by classical Gram-Schmidt against slices < t (the
reference's ``process_task_count``: Gaussian vectors, each minus its projections on every earlier vector, then
normalised; :func:`gram_schmidt_init`: exactly orthogonal to orthonormal previous slices, up to their drift from
orthonormality after training, as the reference); slice 0 the same at construction. Loss = cross-entropy on the
logits with every class outside the session at ``-inf`` (the reference's ``logits[:, :known] = -inf`` over the seen
head) plus
``ortho_mu * sum_l (||K K^T - I||^2 + ||A A^T - I||^2 + ||P P^T - I||^2)`` (means over entries, on the train-time
slices ``0 .. t``; :func:`ortho_penalty`). Adam (lr 1e-3, no weight decay) over the components and the head, a new
one per task, and per epoch the reference's cosine ``lr * cos(99 pi max(e - 1, 0) / (200 (E - 1)))`` (its scheduler
repeats epoch 0's rate once; :func:`strategies.common.optim.epoch_cosine`, the same schedule). Prediction: all components of
the tasks so far, classes seen so far.

Head: the reference's ``nn.Linear(width, classes)`` drawn at construction (``head_init: fresh``, torch's default
init from our seed), trained with the components; ``keep`` keeps the backbone's own head.

Differences from the reference (none at the defaults): components are held per task slice, so with
``weight_decay > 0`` earlier slices stay frozen here while the reference's L2 term (on the whole tensors) still
decays them; a previous component of norm ~0 is skipped by Gram-Schmidt (the reference would loop forever);
the query of a ViT pooled by averaging is its pooled feature (the paper's and references' ViTs use [CLS]).
``ortho_mu`` is 0 in both references' runs (PILOT's json; the official ``experiments/cifar-100.sh``, ``imagenet-r.sh``,
``domainnet.sh``: "with updated code, now can be 0"); the paper's regulariser is the option ``ortho_mu > 0``.
"""
from __future__ import annotations

import logging
from typing import Any, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.backbones.peft import head_parameter_names, vit_block_names
from ctta.errors import ConfigError
from ctta.hparams import Count, NonNegative, NonNegInt, Positive
from ctta.seeding import stable_seed

from .base import register
from .common.incremental import IncrementalStrategy, SessionClasses, fresh_linear_, mask_logits, train_segment_epochs
from .common.optim import epoch_cosine
from .common.prompt_pool import frozen_but_head, frozen_query, vit_blocks, vit_classify, vit_embed

log = logging.getLogger(__name__)


def component_weights(query: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
    """CODA's attention weights (B x M): ``cos(q * A_m, K_m)``, the query (B x D) masked by each attention vector
    and compared with its key (the reference's ``einsum('bd,kd->bkd')``, then cosine along D)."""
    aq = F.normalize(query.unsqueeze(1) * attention.unsqueeze(0), dim=2)
    return torch.einsum("bkd,kd->bk", aq, F.normalize(keys, dim=1))


def ortho_penalty(t: Tensor) -> Tensor:
    """``mean((T T^T - I)^2)`` of the rows of ``t`` (M x n): the reference's orthogonality penalty."""
    return (t @ t.T - torch.eye(t.shape[0], device=t.device, dtype=t.dtype)).square().mean()


@torch.no_grad()
def gram_schmidt_init(previous: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` new unit rows after the rows of ``previous`` (s x n) by the reference's ``gram_schmidt``: Gaussian
    vectors, each minus its projections on every earlier vector (the previous rows as they are and the new ones so
    far, unnormalised), normalised at the end. Orthonormal and orthogonal to ``previous`` when its rows are
    orthonormal (as initialised); after training moved them, orthogonal up to that drift (as the reference). Rows
    of squared norm < 1e-8 are skipped (the reference loops forever on them). Drawn on the CPU."""
    basis = previous.detach().to("cpu", torch.float32).flatten(1)
    n = basis.shape[1]
    new = []
    for _ in range(count):
        v = torch.randn(n, generator=generator)
        norms = (basis * basis).sum(1)
        coef = torch.where(norms >= 1e-8, (basis @ v) / norms.clamp_min(1e-8), torch.zeros_like(norms))
        u = v - coef @ basis
        new.append(u)
        basis = torch.cat([basis, u.unsqueeze(0)])
    out = torch.stack(new)
    return out / out.norm(dim=1, keepdim=True)


@register
class CodaPrompt(IncrementalStrategy):
    """Per-layer decomposed prompts (components, keys, attention) weighted by the frozen query; see the module
    docstring."""

    name = "coda_prompt"

    def __init__(self, model: nn.Module, pool_size: Count = 100, prompt_length: Count = 8, ortho_mu: NonNegative = 0.0,
                 num_tasks: Count = 10, prompt_layers: Optional[Sequence[NonNegInt]] = None, lr: Positive = 1e-3,
                 weight_decay: NonNegative = 0.0, cosine: bool = True, head_init: Literal["fresh", "keep"] = "fresh",
                 seed: int = 0) -> None:
        super().__init__(model, seed, mask_unseen=True)
        if prompt_length % 2:
            raise ConfigError(f"coda_prompt: prompt_length must be even (half keys, half values), got {prompt_length}")
        self.per_task = pool_size // num_tasks
        if self.per_task < 1:
            raise ConfigError(f"coda_prompt: pool_size={pool_size} gives no component per task for "
                              f"num_tasks={num_tasks}")
        blocks = vit_block_names(self.model)
        layers = list(prompt_layers) if prompt_layers is not None else [b for b in range(5) if b < len(blocks)]
        bad = [b for b in layers if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(blocks)]
        if bad or not layers:
            raise ConfigError(f"coda_prompt: prompt_layers must be block indices in [0, {len(blocks)}), got {layers!r}")
        self.layers = sorted(set(layers))
        self.num_tasks, self.length, self.ortho_mu = int(num_tasks), int(prompt_length), float(ortho_mu)
        self.head_names = head_parameter_names(self.model)
        if head_init == "fresh":
            head = self.model.get_submodule(self.head_names[0].rpartition(".")[0])
            if not isinstance(head, nn.Linear):
                raise ConfigError(f"coda_prompt: head_init 'fresh' needs an nn.Linear head, got {type(head).__name__}")
            fresh_linear_(head, torch.Generator().manual_seed(stable_seed(seed, "coda-prompt-head")))
        elif head_init != "keep":
            raise ConfigError(f"coda_prompt: head_init must be 'fresh' or 'keep', got {head_init!r}")
        self.head = frozen_but_head(self.model, self.head_names)  # the reference's dropout and drop-path are 0
        width = self.model.get_submodule(f"{blocks[self.layers[0]]}.attn").qkv.out_features // 3
        key_dim = int(self.model.feature_dim)  # the query's width (the reference's key_d = 768 = ViT-B's width)
        ref = self.head[0]
        self.prompt = nn.Module()  # per layer: ParameterLists of task slices (P: n x L x D, K and A: n x D_k)
        for layer in self.layers:
            for kind, shape in (("p", (self.per_task, self.length, width)), ("k", (self.per_task, key_dim)),
                                ("a", (self.per_task, key_dim))):
                setattr(self.prompt, f"{kind}{layer}", nn.ParameterList(
                    [nn.Parameter(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
                     for _ in range(self.num_tasks)]))
        self.init_task_slices(0)
        self.optimizer = torch.optim.Adam(list(self.prompt.parameters()) + self.head, lr=lr, weight_decay=weight_decay)
        self.base_lr, self.cosine = float(lr), bool(cosine)
        self.session_classes = SessionClasses()
        self._epochs = 0  # epochs of the current session (0: unknown)
        self._epoch_samples = 0
        self._done = 0
        self.remember_initial_state()

    # --- components ---------------------------------------------------------------------------------------------
    def slices(self, kind: str, layer: int) -> nn.ParameterList:
        """The task slices of ``kind`` (``p``, ``k`` or ``a``) of prompted layer ``layer``."""
        return getattr(self.prompt, f"{kind}{layer}")

    @property
    def task(self) -> int:
        """The task whose slice learns now (the last one learned between sessions; 0 before any)."""
        return max(self.sessions.session, 0)

    @torch.no_grad()
    def init_task_slices(self, task: int) -> None:
        """Gram-Schmidt init of slice ``task`` of every P, K, A against slices ``< task``; only it stays trainable."""
        if task >= self.num_tasks:
            raise ConfigError(f"coda_prompt: session {task} needs more than num_tasks={self.num_tasks} slices")
        for layer in self.layers:
            for kind in ("k", "a", "p"):  # the reference's order in process_task_count
                sl = self.slices(kind, layer)
                prev = torch.cat([s.reshape(s.shape[0], -1) for s in list(sl)[:task]]) if task else sl[0][:0].flatten(1)
                g = torch.Generator().manual_seed(stable_seed(self.seed, "coda-prompt-gs", task, layer, kind))
                sl[task].copy_(gram_schmidt_init(prev, self.per_task, g).reshape(sl[task].shape))
        self._train_only(task)

    def _train_only(self, task: int) -> None:
        """Gradients on for task ``task``'s slices only (earlier and later ones frozen)."""
        for p in self.prompt.parameters():
            p.requires_grad_(False)
        for layer in self.layers:
            for kind in ("p", "k", "a"):
                self.slices(kind, layer)[task].requires_grad_(True)

    def components(self, layer: int, train: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """(P, K, A) of ``layer`` over the tasks so far; in training earlier slices enter detached."""
        t = self.task
        out = []
        for kind in ("p", "k", "a"):
            sl = list(self.slices(kind, layer))[:t + 1]
            out.append(torch.cat([s.detach() if train and i < t else s for i, s in enumerate(sl)]))
        return out[0], out[1], out[2]

    def prompted(self, x: Tensor, train: bool) -> Tuple[Tensor, Tensor]:
        """(logits with CODA's prefixes, the orthogonality loss) for images ``x``."""
        query = frozen_query(self.model, x)
        ortho = query.new_zeros(())
        prefixes = {}
        for layer in self.layers:
            p, k, a = self.components(layer, train)
            prompt = torch.einsum("bk,kld->bld", component_weights(query, k, a), p)
            prefixes[layer] = (prompt[:, :self.length // 2], prompt[:, self.length // 2:])
            if train and self.ortho_mu > 0:
                ortho = ortho + self.ortho_mu * (ortho_penalty(k) + ortho_penalty(a) + ortho_penalty(p.flatten(1)))
        tokens = vit_blocks(self.model, vit_embed(self.model, x), prefixes)
        return vit_classify(self.model, tokens[:, 0]), ortho

    def logits(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.prompted(x, False)[0]

    # --- sessions -----------------------------------------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        self.session_classes.segment_start(segment)
        info = train_segment_epochs(segment)
        if info is not None:
            self._epochs, self._epoch_samples = info

    def begin_session(self, session: int) -> None:
        if session > 0:
            self.init_task_slices(session)
        self.optimizer.state.clear()  # the reference's new optimiser at every task
        self.session_classes.begin(self.seen.num_classes, self.head[0].device)
        self._done = 0

    def end_session(self, session: int) -> None:
        self.session_classes.segment = None
        self._epochs = self._epoch_samples = 0

    def _set_lr(self) -> None:
        """The reference's per-epoch cosine rate for the next batch (epoch from the samples learned this session)."""
        epoch = min(self._done // self._epoch_samples, self._epochs - 1) if self._epochs > 0 else 0
        factor = epoch_cosine(epoch, self._epochs) if self.cosine else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * factor

    def learn_batch(self, x: Tensor, y: Tensor) -> Tensor:
        keep = self.session_classes.add(y)
        self.model.eval()
        self._set_lr()
        with torch.enable_grad():
            logits, ortho = self.prompted(x, True)
            loss = F.cross_entropy(mask_logits(logits, keep), y) + ortho
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self._done += int(x.shape[0])
        return self.mask(logits.detach())

    def trainable_parameters(self) -> List[nn.Parameter]:
        t = self.task
        return [self.slices(k, layer)[t] for layer in self.layers for k in ("p", "k", "a")] + self.head

    def extra(self) -> Any:
        return {**self.session_classes.state(), "epochs": self._epochs,
                "epoch_samples": self._epoch_samples, "done": self._done}

    def load_extra(self, state: Any) -> None:
        state = state or {}
        self.session_classes.load_state(state, self.head[0].device)
        self._epochs = int(state.get("epochs", 0))
        self._epoch_samples = int(state.get("epoch_samples", 0))
        self._done = int(state.get("done", 0))
        self._train_only(self.task)
