"""The offline default dataset: scikit-learn's 8x8 handwritten digits (UCI), shipped inside the scikit-learn wheel.

Real images that need no download: upsampled to 16x16 RGB so the CIFAR corruptions apply and an idle 2-core CPU
runs the demo in about 20 s.
The train/test split (2/3 : 1/3, stratified) is fixed by a seed so the cached source model and the stream agree.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import ImageSet

SPLIT_SEED = 0
SIZE = 16


def load_digits(train: bool = False) -> ImageSet:
    """The digits train or test split as uint8 3 x 16 x 16 images (bilinear upsampling of the 8x8 originals)."""
    from sklearn.datasets import load_digits as _load

    data = _load()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # N x 1 x 8 x 8 in [0, 1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(data.target.astype(np.int64))
    g = torch.Generator().manual_seed(SPLIT_SEED)
    idx_train, idx_test = [], []
    for c in range(10):
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        cut = (2 * len(members)) // 3
        idx_train.append(members[:cut])
        idx_test.append(members[cut:])
    idx = torch.cat(idx_train if train else idx_test).sort().values
    return ImageSet(images=x[idx], labels=y[idx], classes=[str(i) for i in range(10)])
