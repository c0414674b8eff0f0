"""The offline embedded default: a real, complete experiment that needs no download.

scikit-learn's handwritten digits (shipped in its wheel) as the source domain; a small CNN trained on the clean
training split at first use and cached in the user cache directory; then source, BN, TENT and CoTTA on the
digits test split under five corruptions at severity 5.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from ctta.streams.datasets import cache_dir  # the one cache folder: decoded data, this model, lsa adapters

log = logging.getLogger(__name__)

MODEL_FILE = "digits_tiny_cnn_v2.pt"
DEMO_STRATEGIES = "source,bn,tent,cotta"


def train_source_model(path: Path, epochs: int = 30, seed: int = 0) -> Path:
    """Train the demo's tiny CNN on the clean digits training split and save it as a checkpoint at ``path``."""
    from ctta.backbones import create
    from ctta.streams.digits import load_digits

    torch.manual_seed(seed)
    data = load_digits(train=True)
    x, y = data.images.float() / 255.0, data.labels
    model = create("tiny_cnn", num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(_jitter(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.net.state_dict(), "dataset": "sklearn digits (train split)", "epochs": epochs}, tmp)
    os.replace(tmp, path)
    log.info("trained the demo source model (%d epochs) -> %s", epochs, path)
    return path


def _jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Training augmentation: small random rotation, scale and shift per image (the usual source-training recipe)."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) - 0.5) * (2 * math.pi * 10 / 360)
    scale = 1 + (torch.rand(n, generator=g) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.25
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def source_model_path() -> Path:
    """The cached demo source model, trained now if it is not there yet."""
    path = cache_dir() / MODEL_FILE
    if not path.is_file():
        log.info("first use: training the demo source model on the clean digits (a few seconds)")
        train_source_model(path)
    return path


def demo_config(out: Optional[str] = None, device: str = "auto", strategies: str = DEMO_STRATEGIES) -> Dict[str, Any]:
    """The resolved config of the offline default experiment."""
    from ctta.config import resolve

    return resolve(cli={
        "stream": {"name": "digits_c"},
        # digits are not mirror-symmetric: CoTTA's views are not flipped here (CIFAR's 0.5 would make them other digits)
        "strategy": {"name": strategies, "hflip_p": 0.0},
        "backbone": {"name": "tiny_cnn", "weights": str(source_model_path()), "num_classes": 10},
        "run": {"device": device, "out": out or "runs/demo"},
    })
