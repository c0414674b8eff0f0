"""Source-free domain adaptation targets: an unlabelled target set adapted for E epochs, then evaluated.

Variants (the label space of the target vs. the source model's ``num_known`` classes):
- ``closed``: the same classes;
- ``partial``: the target holds only a subset of the source classes (labels unchanged);
- ``open``: the target also holds classes the source never saw; their label is ``num_known`` ("unknown"), and
  the eval segment has groups ``known`` / ``unknown`` so known accuracy, unknown recall and the H-score follow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ctta.errors import ConfigError
from ctta.seeding import stable_seed

from .base import STREAMS, Segment, Stream
from .datasets import ImageSet
from .incremental import Part, check_int, corruption_transform, generator, load_labelled, parts_segment

VARIANTS = ("closed", "partial", "open")


def sfda_stream(name: str, target: ImageSet, variant: str = "closed", known_classes: Optional[Sequence[int]] = None,
                target_classes: Optional[Sequence[int]] = None, epochs: int = 1, batch_size: int = 64,
                eval_batch_size: int = 256, seed: int = 0, num_samples: Optional[int] = None,
                transform: Any = None, spec: Optional[Dict[str, Any]] = None) -> Stream:
    """SFDA over ``target`` (labels in the target's own class ids).

    ``known_classes``: the source model's classes in the target's ids, in the model's output order (default: all
    for closed/partial). ``target_classes``: the classes kept in the target (partial: a subset of the known ones;
    open: known plus unknown ones; default: all target classes). Labels are remapped to the model's order; in the
    open-set variant every class outside ``known_classes`` becomes ``len(known_classes)``.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    check_int("epochs", epochs)
    check_int("batch_size", batch_size)
    check_int("eval_batch_size", eval_batch_size)
    check_int("num_samples", num_samples, optional=True)
    n_t = len(target.classes)

    def ids(what: str, values: Optional[Sequence[int]]) -> Optional[List[int]]:
        if values is None:
            return None
        out = [int(v) for v in values]
        bad = [v for v in out if not 0 <= v < n_t]
        if bad:
            raise ConfigError(f"unknown class ids {bad[:5]} in {what}: the target has classes 0..{n_t - 1}")
        if len(set(out)) != len(out) or not out:
            raise ConfigError(f"{what} must list distinct class ids, got {out}")
        return out

    known = ids("known_classes", known_classes)
    kept = ids("target_classes", target_classes)
    if variant == "open" and known is None:
        raise ConfigError("the open-set variant needs known_classes (the source model's classes)")
    known = known if known is not None else list(range(n_t))
    kept = kept if kept is not None else list(range(n_t))
    if variant == "closed" and set(kept) != set(known):
        raise ConfigError(f"closed-set SFDA: target_classes {kept} must equal known_classes {known}")
    if variant == "partial" and not set(kept) < set(known):
        raise ConfigError(f"partial-set SFDA: target_classes {kept} must be a proper subset of known_classes")
    if variant == "open" and not (set(kept) - set(known)):
        raise ConfigError(f"open-set SFDA: target_classes {kept} hold no class outside known_classes {known}")
    num_known = len(known)
    lut = torch.full((n_t,), num_known, dtype=torch.long)
    lut[torch.tensor(known)] = torch.arange(num_known)
    idx = torch.nonzero(torch.isin(target.labels, torch.tensor(kept))).flatten()
    if idx.numel() == 0:
        raise ConfigError(f"the target set has no samples of classes {kept}")
    if num_samples is not None and num_samples < idx.numel():
        idx = idx[torch.randperm(idx.numel(), generator=generator(seed, "sfda-subset"))[:num_samples]].sort().values
    labels = lut[target.labels[idx]]
    segments: List[Segment] = []
    for e in range(epochs):
        segments.append(parts_segment(f"target/epoch-{e}", "adapt", [Part(target, idx, transform, labels=labels)],
                                      batch_size, role="domain",
                                      meta={"epoch": e, "num_epochs": epochs, "variant": variant},
                                      shuffle_seed=stable_seed(seed, "sfda-epoch", e)))
    unknown = labels == num_known
    if variant == "open":
        parts = [Part(target, idx[~unknown], transform, group=0, labels=labels[~unknown]),
                 Part(target, idx[unknown], transform, group=1, labels=labels[unknown])]
        groups: Optional[List[str]] = ["known", "unknown"]
    else:
        parts, groups = [Part(target, idx, transform, labels=labels)], None
    segments.append(parts_segment("target/eval", "eval", parts, eval_batch_size, role="probe",
                                  meta={"after": f"target/epoch-{epochs - 1}", "variant": variant,
                                        "unknown_label": num_known if variant == "open" else None},
                                  groups=groups))
    full = dict(spec or {})
    full.update(name=name, variant=variant, known_classes=known, target_classes=kept, epochs=epochs,
                batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, num_samples=num_samples,
                num_known_classes=num_known, unknown_label=num_known if variant == "open" else None)
    return Stream(name=name, segments=segments, num_classes=num_known, setting="sfda", spec=full)


def sfda(target: str = "gaussian_noise", dataset: str = "digits", data_root: Optional[str] = None,
         severity: int = 5, variant: str = "closed", known_classes: Optional[List[int]] = None,
         target_classes: Optional[List[int]] = None, epochs: int = 1, batch_size: int = 64,
         eval_batch_size: int = 256, seed: int = 0, num_samples: Optional[int] = None, image_size: Optional[int] = None,
         classes: Optional[List[str]] = None, download: bool = False) -> Stream:
    """SFDA target by name: a corruption of a data set's test split (``dataset``: digits, cifar10, cifar100), or
    an ImageFolder path (``target``: a folder of ``<class>/<image>``; ``classes`` fixes the class index order)."""
    if Path(str(target)).expanduser().is_dir() or "/" in str(target):
        from .datasets import load_image_folder

        data = load_image_folder(target, classes=classes, size=image_size)
        tf = None
        where = {"target": str(target), "image_size": image_size, "classes": classes}
    else:
        if not isinstance(severity, int) or isinstance(severity, bool) or not 1 <= severity <= 5:
            raise ConfigError(f"severity must be an integer from 1 to 5, got {severity!r}")
        tf = corruption_transform(target, severity, seed)  # unknown corruption names fail before loading data
        data = load_labelled(dataset, data_root, download)[1]
        where = {"target": target, "dataset": dataset, "severity": severity,
                 "data_root": str(data_root) if data_root else None}
    return sfda_stream("sfda", data, variant, known_classes, target_classes, epochs, batch_size, eval_batch_size,
                       seed, num_samples, tf, spec=where)


STREAMS.register("sfda", sfda)

__all__ = ["VARIANTS", "sfda", "sfda_stream"]
