"""Mechanics shared by the strategies (losses, EMA teachers, stochastic restore, norm-layer utilities, augmentations).

Each lives here once; a strategy file only composes them.
"""
from .augment import AugmentConfig, TTAAugment
from .ema import ema_update_, frozen_copy
from .losses import soft_cross_entropy, softmax_entropy
from .norm import (
    NORM_TYPES,
    batchnorm_layers,
    norm_affine_parameters,
    norm_layers,
    use_batch_statistics,
    view_grouped_batchnorm,
)
from .restore import stochastic_restore_

__all__ = [
    "AugmentConfig",
    "TTAAugment",
    "ema_update_",
    "frozen_copy",
    "soft_cross_entropy",
    "softmax_entropy",
    "NORM_TYPES",
    "batchnorm_layers",
    "norm_affine_parameters",
    "norm_layers",
    "use_batch_statistics",
    "view_grouped_batchnorm",
    "stochastic_restore_",
]
