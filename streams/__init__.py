"""Streams: non-stationary data as segments of adapt / train / eval steps, built by name or from Python objects."""
from __future__ import annotations

from typing import Any

from .base import STREAMS, Segment, Stream, from_batches, tensor_segment
from .corruption_stream import corruption_stream  # noqa: F401  (registers cifar10c, cifar100c, digits_c)


def create(name: str, **spec: Any) -> Stream:
    """Build the registered stream ``name`` from its spec (``configs/streams/<name>.yaml`` gives the defaults)."""
    import inspect

    from ctta.config import stream_defaults
    from ctta.errors import ConfigError

    factory = STREAMS.get(name)
    spec = {**stream_defaults(name), **spec}
    accepted = set(inspect.signature(factory).parameters)
    unknown = sorted(set(spec) - accepted)
    if unknown:
        raise ConfigError(f"stream {name!r} has no option {', '.join(map(repr, unknown))}; "
                          f"it takes: {', '.join(sorted(accepted))}")
    return factory(**spec)


def corruption(dataset: str, root: Any = None, **spec: Any) -> Stream:
    """``corruption("cifar10", severity=5, ...)``: the corruption benchmark of a dataset (cifar10, cifar100, digits)."""
    key = {"cifar10": "cifar10c", "cifar100": "cifar100c", "digits": "digits_c"}.get(dataset, dataset)
    if root is not None:
        spec["data_root"] = root
    return create(key, **spec)


def list_streams() -> list[str]:
    return STREAMS.names()


__all__ = ["STREAMS", "Segment", "Stream", "create", "corruption", "corruption_stream", "from_batches",
           "list_streams", "tensor_segment"]
