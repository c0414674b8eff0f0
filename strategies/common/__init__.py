"""Mechanics shared by the strategies (losses, EMA and mean teachers, Fisher information, stochastic restore,
norm-layer utilities, augmentations).

Each lives here once; a strategy file only composes them.
"""
from .augment import AugmentConfig, TTAAugment
from .ema import ema_update_, frozen_copy
from .fisher import DiagonalFisher, fisher_penalty, masks_for, top_fraction_masks
from .losses import soft_cross_entropy, softmax_entropy
from .mean_teacher import (
    augmented_prediction,
    auto_views_per_chunk,
    make_augment,
    masked_ema_update_,
    teacher_pseudo_label,
)
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
    "DiagonalFisher",
    "augmented_prediction",
    "auto_views_per_chunk",
    "ema_update_",
    "fisher_penalty",
    "make_augment",
    "masked_ema_update_",
    "masks_for",
    "teacher_pseudo_label",
    "top_fraction_masks",
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
