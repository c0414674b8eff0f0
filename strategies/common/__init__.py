"""Mechanics shared by the strategies (losses, EMA and mean teachers, Fisher information, stochastic and masked
restore, norm-layer utilities, augmentations, source data).

Each lives here once; a strategy file only composes them.
"""
from .augment import AugmentConfig, TTAAugment
from .ema import ema_update_, frozen_copy
from .fisher import (
    DiagonalFisher,
    fisher_penalty,
    lowest_fraction_masks,
    masks_for,
    source_fisher,
    top_fraction_masks,
)
from .losses import (
    aug_cross_entropy,
    generalized_cross_entropy,
    soft_cross_entropy,
    soft_likelihood_ratio,
    softmax_entropy,
    symmetric_cross_entropy,
)
from .mean_teacher import (
    augmented_prediction,
    auto_views_per_chunk,
    copy_or_ema_update_,
    make_augment,
    masked_ema_update_,
    teacher_pseudo_label,
)
from .norm import (
    NORM_TYPES,
    batchnorm_layers,
    is_top_layer,
    mix_source_statistics_,
    norm_affine_parameters,
    norm_layers,
    sar_parameters,
    use_batch_statistics,
    view_grouped_batchnorm,
)
from .restore import masked_restore_, stochastic_restore_
from .source_data import SourceData, as_float_images, load_source_data

__all__ = [
    "AugmentConfig",
    "TTAAugment",
    "DiagonalFisher",
    "augmented_prediction",
    "auto_views_per_chunk",
    "copy_or_ema_update_",
    "ema_update_",
    "fisher_penalty",
    "lowest_fraction_masks",
    "source_fisher",
    "make_augment",
    "masked_ema_update_",
    "masks_for",
    "teacher_pseudo_label",
    "top_fraction_masks",
    "frozen_copy",
    "aug_cross_entropy",
    "generalized_cross_entropy",
    "soft_cross_entropy",
    "soft_likelihood_ratio",
    "softmax_entropy",
    "symmetric_cross_entropy",
    "NORM_TYPES",
    "batchnorm_layers",
    "is_top_layer",
    "mix_source_statistics_",
    "norm_affine_parameters",
    "norm_layers",
    "sar_parameters",
    "use_batch_statistics",
    "view_grouped_batchnorm",
    "stochastic_restore_",
    "masked_restore_",
    "SourceData",
    "as_float_images",
    "load_source_data",
]
