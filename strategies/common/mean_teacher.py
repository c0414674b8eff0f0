"""Mean-teacher mechanics shared by CoTTA and PSMT: the augmentation-averaged teacher prediction and a masked EMA.

CoTTA (Wang et al., CVPR 2022) and the mean teachers built on it take the teacher's prediction on a test batch as the
pseudo-label; when the frozen source model (the anchor) is unconfident on the batch (mean max-probability below
``ap``), the teacher's prediction is averaged over ``views`` augmented copies instead. The views go through the
teacher in device-sized chunks with BatchNorm statistics computed per view (as in one forward per view).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .augment import AugmentConfig, TTAAugment
from .norm import view_grouped_batchnorm


def auto_views_per_chunk(device: torch.device, batch_size: int, views: int) -> int:
    """How many augmented views to send through the teacher per forward.

    On CPU, small forwards are faster (a 6400-image ResNet-20 forward took 2.5x longer than 32 forwards of 200
    on a 2-core machine): one view per forward unless batches are tiny. On a GPU, all views in one forward.
    """
    if device.type == "cpu":
        return max(1, min(views, 256 // max(batch_size, 1)))
    return views


def make_augment(soft_augment: bool = False, hflip_p: Optional[float] = None, seed: int = 0) -> TTAAugment:
    """CoTTA's augmentations: CIFAR ranges, or the ImageNet-C ('soft') ones; ``hflip_p`` overrides the flip rate."""
    aug = AugmentConfig.soft() if soft_augment else AugmentConfig()
    if hflip_p is not None:  # e.g. 0 for data whose mirror image is another class (digits, text)
        aug = dataclasses.replace(aug, hflip_p=hflip_p)
    return TTAAugment(aug, seed=seed)


@torch.no_grad()
def augmented_prediction(teacher: nn.Module, augment: TTAAugment, x: Tensor, views: int,
                         views_per_chunk: Union[int, str] = "auto") -> Tensor:
    """Teacher logits averaged over ``views`` augmented copies of x, sent through in device-sized chunks."""
    n = x.shape[0]
    chunk = auto_views_per_chunk(x.device, n, views) if views_per_chunk == "auto" else int(views_per_chunk)
    params = augment.sample(views)
    total: Optional[Tensor] = None
    done = 0
    while done < views:
        v = min(chunk, views - done)
        xs = augment.apply(x, params, done, done + v)
        with view_grouped_batchnorm(teacher, v):
            logits = teacher(xs).view(v, n, -1).sum(dim=0)
        total = logits if total is None else total + logits
        done += v
    assert total is not None
    return total / views


@torch.no_grad()
def teacher_pseudo_label(teacher: nn.Module, anchor: nn.Module, augment: TTAAugment, x: Tensor, ap: float,
                         views: int, views_per_chunk: Union[int, str] = "auto") -> Tensor:
    """CoTTA's pseudo-label: the augmentation-averaged teacher logits if the anchor's mean confidence is below ``ap``,
    else the teacher's plain logits. On an accelerator both are computed and one is picked on the device (no host
    sync); on the CPU, where the test costs nothing, the plain logits only when picked. The views are drawn either way
    (the augmentation generators advance alike, so the run is the same)."""
    anchor_conf = anchor(x).softmax(dim=1).amax(dim=1).mean()
    if x.device.type == "cpu" and bool(anchor_conf < ap):
        return augmented_prediction(teacher, augment, x, views, views_per_chunk)
    teacher_plain = teacher(x)
    teacher_aug = augmented_prediction(teacher, augment, x, views, views_per_chunk)
    return torch.where(anchor_conf < ap, teacher_aug, teacher_plain)


@torch.no_grad()
def masked_ema_update_(teacher: nn.Module, student: nn.Module, momentum: float,
                       update_masks: Sequence[Optional[Tensor]]) -> None:
    """In place, per element: teacher <- teacher + u * (1 - momentum) * (student - teacher).

    ``update_masks`` aligns with ``teacher.parameters()``: u = 1 (or True) updates the element by EMA, u = 0 keeps the
    teacher's value; ``None`` updates the whole tensor. All ones is the plain EMA of :func:`ema_update_`.
    """
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params) or len(t_params) != len(update_masks):
        raise ValueError(f"teacher ({len(t_params)}), student ({len(s_params)}) and masks ({len(update_masks)}) "
                         f"do not align")
    for t, s, u in zip(t_params, s_params, update_masks):
        step = (s.detach() - t) * (1.0 - momentum)
        t.add_(step if u is None else step * u.to(step.dtype))


@torch.no_grad()
def copy_or_ema_update_(teacher: nn.Module, student: nn.Module, momentum: float,
                        copy_masks: Mapping[str, Tensor]) -> None:
    """In place, per element of the parameters named in ``copy_masks``: the teacher takes the student's value where
    the mask is True, else one EMA step ``momentum * teacher + (1 - momentum) * student``; parameters without a
    mask take the EMA step. PSMT's released ``update_ema_variables_two``, with the masks matched by name."""
    students = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        s = students[name].detach()
        ema = momentum * t + (1.0 - momentum) * s
        m = copy_masks.get(name)
        t.copy_(ema if m is None else torch.where(m, s, ema))
