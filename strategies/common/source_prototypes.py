"""Source-prototype alignment shared by RMT and SANTA (mariodoebler/test-time-adaptation@8b2ed63,
``classification/methods/rmt.py`` and ``methods/santa.py``, which carry the same code): class means of the source
features, each test feature's nearest source prototype, a two-layer projector and the SupCon loss (mode 'all',
HobbitLong/SupContrast ``losses.py``) over the views (prototype, test features, augmented test features).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.seeding import stable_seed

from .source_data import as_float_images, load_source_data

#: the reference stops reading source features once it holds more than this many
MAX_PROTOTYPE_SAMPLES = 100000


def seeded_source(source_data: Any, num_classes: int, samples: Optional[int], seed: int,
                  name: str) -> Tuple[Tensor, Tensor]:
    """The caller's labelled source images (``load_source_data``) in one order seeded by ``seed`` and ``name``."""
    x, y = load_source_data(source_data, num_classes, samples, seed, name)
    generator = torch.Generator().manual_seed(stable_seed(seed, f"{name}-source-order"))
    order = torch.randperm(x.shape[0], generator=generator)
    return x[order], y[order]


@torch.no_grad()
def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """C x D means of ``features`` per class of ``labels`` (as the reference: ``features[labels == c].mean(0)``);
    a class without samples gets a zero row."""
    means = torch.stack([features[labels == c].mean(dim=0) for c in range(num_classes)])
    present = torch.bincount(labels, minlength=num_classes) > 0
    return torch.where(present.unsqueeze(1), means, torch.zeros_like(means))


@torch.no_grad()
def source_class_means(model: nn.Module, images: Tensor, labels: Tensor, batch: int, num_classes: int,
                       device: torch.device) -> Tensor:
    """Class means of ``model.forward_features`` over the source images read in batches of ``batch`` (stopping once
    more than ``MAX_PROTOTYPE_SAMPLES`` are read, as the reference)."""
    feats: List[Tensor] = []
    ys: List[Tensor] = []
    total = 0
    for start in range(0, images.shape[0], batch):
        f = model.forward_features(as_float_images(images[start:start + batch], device))
        feats.append(f.view(f.shape[:2]))
        ys.append(labels[start:start + batch].to(device).long())
        total += f.shape[0]
        if total > MAX_PROTOTYPE_SAMPLES:
            break
    return class_means(torch.cat(feats), torch.cat(ys), num_classes)


@torch.no_grad()
def nearest_prototype(prototypes: Tensor, features: Tensor) -> Tensor:
    """Index of each feature's most cosine-similar prototype (N), from one product of normalised vectors."""
    return (F.normalize(prototypes, dim=1) @ F.normalize(features, dim=1).T).argmax(dim=0)


def make_projector(dim: int, projection_dim: int, seed: int, device: torch.device) -> nn.Module:
    """Linear-ReLU-Linear projector initialised as ``nn.Linear`` under ``torch.manual_seed(seed)``; the global
    generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, projection_dim), nn.ReLU(),
                             nn.Linear(projection_dim, projection_dim)).to(device)


def contrastive_loss(features: Tensor, projector: nn.Module, temperature: float) -> Tensor:
    """SupCon loss (mode 'all') of N samples with V views each (``features`` N x V x D): all V N projected,
    normalised views are anchors, a sample's other views its positives, every other view a negative."""
    n, v = features.shape[:2]
    z = F.normalize(projector(torch.cat(torch.unbind(features, dim=1), dim=0)), p=2, dim=1)  # view-major, V N x P
    logits = torch.matmul(z, z.T) / temperature
    logits = logits - torch.max(logits, dim=1, keepdim=True)[0].detach()  # numerical stability
    positives = torch.eye(n, dtype=torch.float32, device=z.device).repeat(v, v)
    not_self = torch.scatter(torch.ones_like(positives), 1, torch.arange(v * n, device=z.device).view(-1, 1), 0)
    positives = positives * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob_pos = (positives * log_prob).sum(1) / positives.sum(1)
    return (-mean_log_prob_pos).view(v, n).mean()


def prototype_contrast(prototypes: Tensor, features: Tensor, features_aug: Tensor, projector: nn.Module,
                       temperature: float) -> Tensor:
    """SupCon loss over (nearest source prototype of f(x), f(x), f(x')) per test sample: pulls the test features
    and their augmented view towards the source class they resemble most."""
    nearest = nearest_prototype(prototypes, features.detach())
    return contrastive_loss(torch.stack([prototypes[nearest], features, features_aug], dim=1), projector, temperature)


__all__ = ["MAX_PROTOTYPE_SAMPLES", "class_means", "contrastive_loss", "make_projector", "nearest_prototype",
           "prototype_contrast", "seeded_source", "source_class_means"]
