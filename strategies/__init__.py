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

# Composites PLUGIN+HOST (e.g. lsa+tent): registered for every host whose class fits, so the CLI, YAML and
# `ctta-bench list` know them; building one may still refuse a host (see compose.py).
from .compose import create_composite, is_composite_name, register_composites  # noqa: E402

register_composites()


def create(name: str, model: nn.Module, **overrides: Any) -> Strategy:
    """Build strategy ``name`` around ``model`` with the paper's hyperparameters from ``configs/``, then overrides.

    ``PLUGIN+HOST`` (e.g. ``lsa+tent``) builds the host on the plug-in's wrapped model; its hyperparameters are
    nested per part (``lsa={...}, tent={...}``) or flat, each key routed to the part that takes it.
    """
    if is_composite_name(name):
        return create_composite(name, model, overrides)
    cls = STRATEGIES.get(name)
    hparams = {**strategy_defaults(name), **overrides}
    return build(cls, model, hparams)


def build(cls: type, model: nn.Module, hparams: dict) -> Strategy:
    """Instantiate ``cls`` with ``hparams``, turning an unknown hyperparameter into a one-line ConfigError."""
    check_options(cls.__init__, hparams, f"strategy {cls.name!r}", "hyperparameter", skip=("self", "model"))
    return cls(model, **hparams)


def check_name(name: str) -> None:
    """Fail, before any work, on a strategy name that cannot be built (unknown, or a refused PLUGIN+HOST)."""
    if is_composite_name(name) and name not in STRATEGIES:
        from .compose import host_class, parse_name

        host_class(*parse_name(name))
    STRATEGIES.get(name)


def list_strategies() -> list[str]:
    return STRATEGIES.names()


__all__ = ["STEP_KINDS", "STRATEGIES", "Strategy", "check_name", "create", "list_strategies", "register", "strategy_defaults"]
