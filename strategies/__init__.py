"""Strategies: one file per method, composed from the shared mechanics in ``common``; ``create`` is the one door in."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from ctta.config import check_options, strategy_defaults

from .base import STEP_KINDS, STRATEGIES, Strategy, register

# Registration: every module of this package is one strategy and registers itself on import.
for _info in pkgutil.iter_modules(__path__):
    if not _info.ispkg and _info.name not in ("base",) and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def create(name: str, model: nn.Module, **overrides: Any) -> Strategy:
    """Build strategy ``name`` around ``model`` with the paper's hyperparameters from ``configs/``, then overrides."""
    cls = STRATEGIES.get(name)
    hparams = {**strategy_defaults(name), **overrides}
    return build(cls, model, hparams)


def build(cls: type, model: nn.Module, hparams: dict) -> Strategy:
    """Instantiate ``cls`` with ``hparams``, turning an unknown hyperparameter into a one-line ConfigError."""
    check_options(cls.__init__, hparams, f"strategy {cls.name!r}", "hyperparameter", skip=("self", "model"))
    return cls(model, **hparams)


def list_strategies() -> list[str]:
    return STRATEGIES.names()


__all__ = ["STEP_KINDS", "STRATEGIES", "Strategy", "create", "list_strategies", "register", "strategy_defaults"]
