"""Corruption benchmarks (CIFAR-10-C style): a clean test set met under a sequence of corruptions, one per domain.

Each domain is the (seeded, shuffled) clean test set under one corruption at one severity: read from the
original -C files when present, otherwise generated on the device by :mod:`.corruptions`. Optional clean
``eval`` probes before and after the stream measure forgetting of the source domain.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from ctta.errors import ConfigError, CttaError
from ctta.seeding import stable_seed

from .base import STREAMS, Segment, Stream, tensor_segment
from .corruptions import CORRUPTION_ORDER, CORRUPTIONS, corrupt, generated_corruptions
from .datasets import ImageSet, load_corrupted, load_cifar

ORDERS = ("continual", "random", "reset")


def _check_spec(severity: int, batch_size: int, num_samples: Optional[int], order: str) -> None:
    if not isinstance(severity, int) or isinstance(severity, bool) or not 1 <= severity <= 5:
        raise ConfigError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ConfigError(f"num_samples must be a positive integer or omitted, got {num_samples!r}")
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


def _corruption_list(corruptions: Union[str, Sequence[str]]) -> List[str]:
    if corruptions in ("all", None):
        return list(CORRUPTION_ORDER)
    names = [c.strip() for c in corruptions.split(",")] if isinstance(corruptions, str) else list(corruptions)
    for c in names:
        CORRUPTIONS.get(c)  # unknown names fail here with the valid list
    if not names:
        raise ConfigError("no corruption given")
    return names


def corruption_stream(name: str, clean: ImageSet, corruptions: Union[str, Sequence[str]] = "all",
                      severity: int = 5, batch_size: int = 200, num_samples: Optional[int] = None,
                      order: str = "continual", seed: int = 1, clean_eval: bool = True,
                      params: str = "cifar10",
                      files: Optional[Callable[[str, int], Optional[ImageSet]]] = None,
                      spec: Optional[dict] = None) -> Stream:
    """Build a corruption stream over ``clean``; ``files(corruption, severity)`` may supply precomputed -C images."""
    _check_spec(severity, batch_size, num_samples, order)
    names = _corruption_list(corruptions)
    if order == "random":
        perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(stable_seed(seed, "order")))
        names = [names[i] for i in perm.tolist()]
    n_total = len(clean)
    n = min(num_samples or n_total, n_total)

    def pick(tag: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(stable_seed(seed, tag))
        return torch.randperm(n_total, generator=g)[:n]

    segments: List[Segment] = []
    probe_idx = pick("clean")
    if clean_eval:
        segments.append(tensor_segment("clean@start", "eval", clean.images[probe_idx], clean.labels[probe_idx],
                                       batch_size, role="probe"))
    for c in names:
        idx = pick(c)
        pre = files(c, severity) if files is not None else None
        if pre is not None:
            seg = tensor_segment(f"{c}-{severity}", "adapt", pre.images[idx], pre.labels[idx], batch_size,
                                 meta={"corruption": c, "severity": severity, "source": "files"})
        elif c not in generated_corruptions():
            raise CttaError(f"corruption {c!r} cannot be generated yet (generated: {', '.join(generated_corruptions())})"
                            f"; put the -C files ({c}.npy, labels.npy) under --data-root or choose other --corruptions")
        else:
            seg = tensor_segment(
                f"{c}-{severity}", "adapt", clean.images[idx], clean.labels[idx], batch_size,
                transform=lambda x, dev, c=c: corrupt(x, c, severity, seed=seed, params=params),
                meta={"corruption": c, "severity": severity, "source": "generated"})
        segments.append(seg)
    if clean_eval:
        segments.append(tensor_segment("clean@end", "eval", clean.images[probe_idx], clean.labels[probe_idx],
                                       batch_size, role="probe"))
    full_spec = dict(spec or {})
    full_spec.update(name=name, corruptions=names, severity=severity, batch_size=batch_size, num_samples=n,
                     order=order, seed=seed, clean_eval=clean_eval, params=params)
    return Stream(name=name, segments=segments, num_classes=len(clean.classes), setting="tta", spec=full_spec,
                  reset_each_domain=(order == "reset"))


def _cifar_c(dataset: str):
    def build(data_root: Optional[str] = None, corruptions: Union[str, Sequence[str]] = "all", severity: int = 5,
              batch_size: int = 200, num_samples: Optional[int] = None, order: str = "continual", seed: int = 1,
              clean_eval: bool = True, download: bool = False) -> Stream:
        clean = load_cifar(dataset, data_root, train=False, download=download)
        return corruption_stream(
            f"{dataset}c", clean, corruptions, severity, batch_size, num_samples, order, seed, clean_eval,
            params="cifar10", files=lambda c, s: load_corrupted(dataset, data_root, c, s) if data_root else None,
            spec={"dataset": dataset, "data_root": str(data_root) if data_root else None})

    build.__doc__ = f"{dataset.upper()}-C: the {dataset} test set under the 15 corruptions (files or generated)."
    return build


def digits_c(corruptions: Union[str, Sequence[str]] = "gaussian_noise,shot_noise,impulse_noise,brightness,contrast",
             severity: int = 5, batch_size: int = 64, num_samples: Optional[int] = None, order: str = "continual",
             seed: int = 1, clean_eval: bool = True, data_root: Optional[str] = None) -> Stream:
    """Offline default: scikit-learn's digits test split under corruptions (no download needed)."""
    from .digits import load_digits

    return corruption_stream("digits_c", load_digits(train=False), corruptions, severity, batch_size, num_samples,
                             order, seed, clean_eval, params="cifar10", spec={"dataset": "digits"})


STREAMS.register("cifar10c", _cifar_c("cifar10"))
STREAMS.register("cifar100c", _cifar_c("cifar100"))
STREAMS.register("digits_c", digits_c)
