"""Streams: non-stationary data as segments of adapt / train / eval steps, built by name or from Python objects."""
from __future__ import annotations

from typing import Any

from .base import STREAMS, Segment, Stream, from_batches, tensor_segment
from .corruption_stream import corruption_stream  # noqa: F401  (registers cifar10c, cifar100c, digits_c)


def create(name: str, **spec: Any) -> Stream:
    """Build the registered stream ``name`` from its spec (``configs/streams/<name>.yaml`` gives the defaults)."""
    from ctta.config import check_options, stream_defaults

    factory = STREAMS.get(name)
    spec = {**stream_defaults(name), **spec}
    check_options(factory, spec, f"stream {name!r}", "option")
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
