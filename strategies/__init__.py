"""Strategies: one file per method, composed from the shared mechanics in ``common``; ``create`` is the one door in."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from ctta.config import strategy_defaults
from ctta.hparams import check_call

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
    """Instantiate ``cls`` with ``hparams`` checked against its declarations (a one-line ConfigError otherwise)."""
    checked = check_call(cls.__init__, hparams, f"strategy {cls.name!r}")
    strategy = cls(model, **checked)
    strategy.hparams = checked  # what it was built with (the Python API's config.yaml records it)
    return strategy


def check_hparams(name: str, hparams: dict) -> dict:
    """``hparams`` over the packaged defaults of strategy ``name``, checked and coerced, without building anything:
    the experiment calls it before a stream is read or a model built."""
    if is_composite_name(name):
        from .compose import check_composite

        return check_composite(name, hparams)
    cls = STRATEGIES.get(name)
    return check_call(cls.__init__, {**strategy_defaults(name), **hparams}, f"strategy {cls.name!r}")


def check_name(name: str) -> None:
    """Fail, before any work, on a strategy name that cannot be built (unknown, or a refused PLUGIN+HOST)."""
    if is_composite_name(name) and name not in STRATEGIES:
        from .compose import host_class, parse_name

        host_class(*parse_name(name))
    STRATEGIES.get(name)


def list_strategies() -> list[str]:
    return STRATEGIES.names()


__all__ = ["STEP_KINDS", "STRATEGIES", "Strategy", "check_hparams", "check_name", "create", "list_strategies", "register", "strategy_defaults"]
