"""ctta-bench: continual and test-time adaptation on one engine, the same streams, measured the same way."""
from __future__ import annotations

from .errors import CttaError

__version__ = "0.1.0"
__all__ = ["CttaError", "run", "backbones", "streams", "strategies", "evaluation", "__version__"]


def __getattr__(name: str):
    """Import the peer packages and the engine lazily, so ``import ctta`` stays cheap and cycle-free."""
    import importlib

    if name in ("backbones", "streams", "strategies", "evaluation"):
        return importlib.import_module(f"ctta.{name}")
    if name == "run":
        from .engine import run

        return run
    raise AttributeError(f"module 'ctta' has no attribute {name!r}")
