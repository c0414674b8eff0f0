"""Source data for the strategies that may look at it before deployment: one option, ``source_data``, for all.

``source_data`` is a path to a CIFAR-10/100 train set (an ``.npz`` file, a folder holding ``train.npz`` /
``train_jpeg.npz``, or a torchvision folder; read with :func:`ctta.streams.datasets.load_cifar`) or a pair
``(images, labels)`` of tensors (images N x C x H x W, uint8 or float in [0, 1]). ``source_samples`` draws a seeded
random subset of that many images (``None`` or more than there are: all, in their stored order).

Used by LSA (the adapter is trained on it), PSMT and EATA (their Fisher information is estimated on it) and RMT (its
source prototypes, warm-up and source replay read it); all take ``source_data`` and ``source_samples`` under those
names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ctta.errors import ConfigError, DataNotFoundError
from ctta.seeding import stable_seed

#: The declaration of the ``source_data`` option (for a strategy's signature).
SourceData = Union[None, str, Path, Sequence[Any]]

#: How to pass it, for error messages.
HOW_TO_PASS = ("--set strategy.source_data=../shared/data/cifar10 (a CIFAR-10/100 train set), "
               "or source_data=(images, labels) in Python")


def load_source_data(source_data: Any, num_classes: Optional[int], samples: Optional[int], seed: int,
                     who: str) -> Tuple[Tensor, Tensor]:
    """``(images, labels)`` from a pair of tensors or a CIFAR train set path; a seeded random subset of ``samples``.

    ``who`` names the strategy in errors and seeds the subset (``stable_seed(seed, f"{who}-source-subset")``).
    Every refusal is a one-line :class:`ConfigError`.
    """
    if source_data is None:
        raise ConfigError(f"{who} needs source data: {HOW_TO_PASS}")
    if isinstance(source_data, (tuple, list)) and len(source_data) == 2:
        x, y = torch.as_tensor(source_data[0]), torch.as_tensor(source_data[1]).long()
    elif isinstance(source_data, (str, Path)):
        from ctta.streams.datasets import load_cifar  # lazy: data loading lives in streams

        name = {10: "cifar10", 100: "cifar100"}.get(num_classes)  # type: ignore[arg-type]
        if name is None:
            raise ConfigError(f"{who} source_data={str(source_data)!r}: only CIFAR-10/100 train sets are read from "
                              f"a path; for {num_classes} classes pass (images, labels) tensors")
        try:
            data = load_cifar(name, source_data, train=True)
        except DataNotFoundError as err:  # say which option pointed there
            raise DataNotFoundError(f"{who} source_data: {err}") from None
        x, y = data.images, data.labels
    else:
        raise ConfigError(f"{who} source_data must be a path or (images, labels), got {type(source_data).__name__}")
    if samples and samples < x.shape[0]:
        g = torch.Generator().manual_seed(stable_seed(seed, f"{who}-source-subset"))
        idx = torch.randperm(x.shape[0], generator=g)[:samples]
        x, y = x[idx], y[idx]
    return x, y


def as_float_images(x: Tensor, device: Union[str, torch.device]) -> Tensor:
    """A batch of source images on ``device`` as floats in [0, 1] (uint8 images are divided by 255)."""
    x = x.to(device)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
