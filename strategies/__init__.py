"""Strategies: one file per method, composed from the shared mechanics in ``common``; ``create`` is the one door in."""
from __future__ import annotations

from typing import Any

from torch import nn

from ctta.config import strategy_defaults

from . import bn, cotta, finetune, source, tent  # noqa: F401  (registration)
from .base import STEP_KINDS, STRATEGIES, Strategy, register


def create(name: str, model: nn.Module, **overrides: Any) -> Strategy:
    """Build strategy ``name`` around ``model`` with the paper's hyperparameters from ``configs/``, then overrides."""
    cls = STRATEGIES.get(name)
    hparams = {**strategy_defaults(name), **overrides}
    return build(cls, model, hparams)


def build(cls: type, model: nn.Module, hparams: dict) -> Strategy:
    """Instantiate ``cls`` with ``hparams``, turning an unknown hyperparameter into a one-line ConfigError."""
    import inspect

    from ctta.errors import ConfigError

    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p not in ("self", "model")]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ConfigError(f"strategy {cls.name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                          f"it takes: {', '.join(accepted)}")
    return cls(model, **hparams)


def list_strategies() -> list[str]:
    return STRATEGIES.names()


__all__ = ["STEP_KINDS", "STRATEGIES", "Strategy", "create", "list_strategies", "register", "strategy_defaults"]
