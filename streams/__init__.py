"""Streams: non-stationary data as segments of adapt / train / eval steps, built by name or from Python objects."""
from __future__ import annotations

from typing import Any

from .base import STREAMS, Segment, Stream, from_batches, tensor_segment
from .corruption_stream import corruption_stream  # noqa: F401  (registers cifar10c, cifar100c, digits_c)
from .custom import from_dataset, from_folders, from_tensors  # registers folders
from .gilcd import gilcd_stream  # registers digits_gilcd, cifar10_gilcd, cifar100_gilcd
from .incremental import class_incremental_stream, domain_incremental_stream, few_shot_stream  # *_ci, *_online, ...
from .sfda import sfda_stream  # registers sfda
from .imagenet import imagenet_c  # noqa: F401  (registers imagenet_c, imagenet_r, imagenet_a, imagenet_sketch, imagenet_v2)
from . import ccc  # noqa: F401  (the module; registers the ccc stream)
from . import unitta  # noqa: F401  (the module; registers the unitta stream: UniTTA's 36 scenarios)
from . import folder_cil  # noqa: F401  (registers imagenet_r_ci, cub200_ci, cub200_fscil, miniimagenet_fscil)


def to_avalanche(stream: Stream, device: str = "cpu") -> Any:
    """Export a class-incremental stream as an Avalanche benchmark (imports Avalanche now)."""
    from .avalanche_io import to_avalanche as _to

    return _to(stream, device)


def from_avalanche(benchmark: Any, **kwargs: Any) -> Stream:
    """A ctta stream (train sessions + accuracy-matrix evals) from an Avalanche benchmark."""
    from .avalanche_io import from_avalanche as _from

    return _from(benchmark, **kwargs)


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


def stream_choices(name: str) -> dict[str, tuple]:
    """The enumerated options a stream accepts, for ``ctta-bench list``: its ``order`` values (streams/orders.py)
    and ``label_shift`` kinds (streams/label_shift.py), when its factory takes those options."""
    import inspect

    from .label_shift import KINDS
    from .orders import ORDERS

    params = inspect.signature(STREAMS.get(name)).parameters
    out: dict[str, tuple] = {}
    if "order" in params:
        out["orders"] = ORDERS
    if "label_shift" in params:
        out["label shift"] = KINDS
    return out


__all__ = ["STREAMS", "Segment", "Stream", "class_incremental_stream", "create", "corruption", "corruption_stream",
           "domain_incremental_stream", "few_shot_stream", "from_avalanche", "from_batches", "from_dataset",
           "from_folders", "from_tensors", "gilcd_stream", "list_streams", "sfda_stream", "stream_choices",
           "tensor_segment", "to_avalanche"]
