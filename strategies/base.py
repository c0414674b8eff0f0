"""The strategy interface: what the engine calls on each step, what a strategy declares it supports, and the registry."""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Optional

import torch
from torch import Tensor, nn

from ctta.registry import Registry
from ctta.seeding import same_device

log = logging.getLogger(__name__)

STEP_KINDS: FrozenSet[str] = frozenset({"adapt", "train", "eval"})

STRATEGIES: Registry[type] = Registry("strategy")


class Strategy(nn.Module):
    """A learner wrapped around a backbone; the engine drives it one batch at a time.

    * ``adapt(x)``: predict on an unlabelled batch, then (optionally) adapt on it; returns the prediction's logits.
    * ``learn(x, y)``: a labelled batch of a learning session; returns the logits seen before the update.
    * ``predict(x)``: logits only, no change of state (``eval`` steps).

    Subclasses declare ``step_kinds`` (which of adapt/train/eval they handle) and ``settings`` (the stream
    settings they are meant for, e.g. ``"tta"`` or ``"class_incremental"``); the engine refuses a stream that
    needs something else before any work starts. ``configure()`` puts the model in the state the method needs,
    and the initial state is kept so ``reset()`` can return to it.
    """

    name: ClassVar[str] = ""
    step_kinds: ClassVar[FrozenSet[str]] = frozenset({"adapt", "eval"})
    settings: ClassVar[FrozenSet[str]] = frozenset({"tta"})
    #: Why a plug-in (e.g. ``lsa+``) cannot wrap this strategy's model, known from the class alone; None: it can.
    plugin_refusal: ClassVar[Optional[str]] = None

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.seed = seed
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._generator: Optional[torch.Generator] = None
        self._initial: Optional[Dict[str, Any]] = None
        self.hparams: Dict[str, Any] = {}  # set by ``strategies.create`` to the checked hyperparameters

    # --- the three step kinds -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits for ``x`` without changing any state."""
        return self.model(x)

    def adapt(self, x: Tensor) -> Tensor:
        """Predict on an unlabelled batch, then adapt on it; the default adapts nothing."""
        return self.predict(x)

    def stepped(self, x: Tensor, step: Callable[[Tensor], Tensor], steps: int) -> Tensor:
        """``steps`` calls of ``step(x)`` (one update each) with gradients on; returns the last call's output, the
        prediction it made before its update (as the official TENT-family code returns it)."""
        prediction = x.new_empty(0)
        with torch.enable_grad():
            for _ in range(steps):
                prediction = step(x)
        return prediction

    def learn(self, x: Tensor, y: Tensor) -> Tensor:
        """Learn from a labelled batch; strategies that support ``train`` steps override this."""
        raise NotImplementedError(f"strategy {self.name!r} does not learn from labelled batches")

    # --- segment boundaries (optional hooks) -------------------------------------------------------------
    def segment_start(self, segment: Any) -> None:
        """Called by the engine before the first batch of a segment (a domain, a session, a check)."""
        return None

    def segment_end(self, segment: Any) -> None:
        """Called by the engine after the last batch of a segment, before the checkpoint is written."""
        return None

    # --- state ------------------------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        """The strategy's random generator on ``device`` (seeded), for masks and sampling drawn on the device."""
        if self._generator is None or not same_device(self._generator.device, device):
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Parameters the method updates (used for the cost report)."""
        if self.optimizer is None:
            return []
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def stored_elements(self) -> int:
        """Elements of every tensor the strategy keeps beyond the backbone weights it started from (the cost report's
        "stored"): exemplar / replay memories (images, logits, labels), prompts, adapters, heads, prototypes, Gram
        or covariance matrices, teacher copies; a backbone tensor counts once it differs from the configured start.

        A submodule with its own ``stored_elements()`` (a memory buffer) answers for itself (the samples held, not
        the rows allocated); a wrapped strategy's tensors are walked as the rest (a tensor shared with the host
        counts once); tensors in plain attributes are not seen: override where a strategy keeps state outside
        parameters and buffers."""
        initial = (self._initial or {}).get("module") or {}
        trained = {id(p) for p in self.trainable_parameters()}
        params = {name for name, _ in self.named_parameters()}
        total, answered = 0, []
        for name, mod in self.named_modules():
            if name and not isinstance(mod, Strategy) and callable(getattr(mod, "stored_elements", None)) \
                    and not any(name.startswith(a) for a in answered):
                total += int(mod.stored_elements())
                answered.append(name + ".")
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if any(name.startswith(a) for a in answered):
                continue
            if name.startswith("model."):  # the backbone: only what changed from (or was added to) the start
                ref = initial.get(name)
                if ref is not None:
                    if ref.shape == t.shape and torch.equal(ref.to(t.device), t):
                        continue
                elif name not in params or (not initial and id(t) not in trained):
                    continue  # its non-persistent buffers; without a recorded start, its frozen weights
            total += t.numel()
        return total

    def remember_initial_state(self) -> None:
        """Keep the configured state so :meth:`reset` can return to it; call at the end of ``__init__``."""
        self._initial = copy.deepcopy(self.checkpoint_state())

    def reset(self) -> None:
        """Return to the state right after construction (used by reset-each-shift streams)."""
        if self._initial is None:
            raise RuntimeError(f"strategy {self.name!r} did not record its initial state")
        self.load_checkpoint_state(copy.deepcopy(self._initial))

    def restore_initial_model(self) -> None:
        """Load the backbone weights recorded by :meth:`remember_initial_state` into ``self.model`` (retraining from
        the start at a session end: GDumb, joint), without keeping a second copy of them."""
        if self._initial is None:
            raise RuntimeError(f"strategy {self.name!r} did not record its initial state")
        module = self._initial["module"]
        self.model.load_state_dict({k[len("model."):]: v for k, v in module.items() if k.startswith("model.")})

    def checkpoint_state(self) -> Dict[str, Any]:
        """Everything needed to resume: module tensors, optimizer state and random generator state."""
        return {
            "module": self.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "generator": self._generator.get_state() if self._generator is not None else None,
            "generator_device": str(self._generator.device) if self._generator is not None else None,
            "extra": self.extra_state(),
        }

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        self.load_state_dict(state["module"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self._restore_generator(state.get("generator"), state.get("generator_device"))
        self.load_extra_state(state.get("extra"))

    def _restore_generator(self, gen_state: Optional[Tensor], device: Optional[str]) -> None:
        """Put the random generator back as saved (a fresh strategy included); None: re-seed at the next draw."""
        if gen_state is None:
            self._generator = None
            return
        if device is None:
            device = str(self._generator.device) if self._generator is not None else "cpu"
        try:
            gen = torch.Generator(device=device)
            gen.set_state(gen_state.cpu() if isinstance(gen_state, Tensor) else gen_state)
        except (RuntimeError, TypeError) as err:  # e.g. a CUDA state resumed without CUDA
            log.warning("strategy %r: random generator state from %s not restored (%s); re-seeding", self.name,
                        device, err)
            self._generator = None
            return
        self._generator = gen

    def extra_state(self) -> Any:
        """Non-tensor state a subclass must carry across a resume (e.g. an augmentation generator)."""
        return None

    def load_extra_state(self, state: Any) -> None:
        return None


def register(cls: type) -> type:
    """Class decorator: register a strategy under its ``name``."""
    STRATEGIES.register(cls.name, cls)
    return cls
