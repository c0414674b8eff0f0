"""GILCD: generalized incremental learning under concept drift (a drifting domain and a growing label space).

Stage 0 is the labelled base session (train data of the base classes, clean). Every stage has a domain from the
drift schedule (a corruption sequence, or one corruption at a gradually rising severity). When new classes appear
in a stage, a few labelled samples of each (``shots``, under that stage's domain) arrive first as a ``train``
segment; then the stage's unlabelled stream of all classes seen so far arrives as ``adapt`` segments, and an
optional ``eval`` segment checks held-out data of those classes under the stage's domain. A class is never shown
(in adapt or eval) before its first labelled samples. Adapt and eval data are disjoint halves of the test split.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ctta.errors import ConfigError
from ctta.seeding import stable_seed

from .base import STREAMS, Segment, Stream
from .datasets import ImageSet
from .incremental import (Part, check_int, class_indices, corruption_transform, generator, load_labelled,
                          parts_segment, resolve_class_order)


def drift_schedule(num_stages: int, corruptions: Union[str, Sequence[str]],
                   severities: Union[int, Sequence[int]]) -> List[Tuple[str, int]]:
    """(corruption, severity) per stage: lists are cycled to ``num_stages``; an int severity applies to all."""
    names = [c.strip() for c in corruptions.split(",") if c.strip()] if isinstance(corruptions, str) \
        else [str(c) for c in corruptions]
    if not names:
        raise ConfigError("the drift schedule needs at least one corruption")
    sev = [severities] if isinstance(severities, int) else list(severities)
    if not sev or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in sev):
        raise ConfigError(f"severities must be integers from 1 to 5, got {severities!r}")
    return [(names[k % len(names)], sev[k % len(sev)]) for k in range(num_stages)]


def gilcd_stream(name: str, train: ImageSet, test: ImageSet, base_classes: int, classes_per_stage: int,
                 shots: int, num_stages: Optional[int] = None,
                 corruptions: Union[str, Sequence[str]] = "gaussian_noise", severities: Union[int, Sequence[int]] = 5,
                 seed: int = 0, class_order: Optional[Sequence[int]] = None, batch_size: int = 64,
                 shot_batch_size: Optional[int] = None, base_per_class: Optional[int] = None,
                 adapt_per_class: Optional[int] = None, eval_per_class: Optional[int] = None,
                 eval_each_stage: bool = True, base_session: bool = True, params: str = "cifar10",
                 spec: Optional[Dict[str, Any]] = None) -> Stream:
    """Build a GILCD stream; ``num_stages`` counts stages after the base one (default: until all classes are in)."""
    check_int("base_classes", base_classes)
    check_int("classes_per_stage", classes_per_stage, low=0)
    check_int("shots", shots)
    check_int("batch_size", batch_size)
    for key, val in (("shot_batch_size", shot_batch_size), ("base_per_class", base_per_class),
                     ("adapt_per_class", adapt_per_class), ("eval_per_class", eval_per_class),
                     ("num_stages", num_stages)):
        check_int(key, val, optional=True)
    n_cls = len(train.classes)
    order = resolve_class_order(n_cls, seed, class_order)
    if base_classes > len(order):
        raise ConfigError(f"base_classes={base_classes} but the data has {len(order)} classes")
    if num_stages is None:
        rest = len(order) - base_classes
        if classes_per_stage == 0:
            raise ConfigError("with classes_per_stage=0 give num_stages (how many drift stages follow the base)")
        if rest % classes_per_stage:
            raise ConfigError(f"base_classes={base_classes} plus stages of classes_per_stage={classes_per_stage} do "
                              f"not fit the {len(order)} classes; give num_stages or another split")
        num_stages = rest // classes_per_stage
    need = base_classes + num_stages * classes_per_stage
    if need > len(order):
        raise ConfigError(f"base_classes={base_classes} + {num_stages} stages x {classes_per_stage} new classes "
                          f"need {need} classes, the data has {len(order)}")
    schedule = drift_schedule(num_stages + 1, corruptions, severities)
    stage_classes = [order[:base_classes]] + [order[base_classes + k * classes_per_stage:
                                                     base_classes + (k + 1) * classes_per_stage]
                                              for k in range(num_stages)]
    # the test split of every class, cut in a seeded half for the unlabelled stream and a half for eval
    adapt_pool: Dict[int, torch.Tensor] = {}
    eval_pool: Dict[int, torch.Tensor] = {}
    for c in order[:need]:
        members = torch.nonzero(test.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator(seed, "gilcd-split", c))]
        half = (len(members) + 1) // 2 if eval_each_stage else len(members)
        adapt_pool[c] = members[:half][:adapt_per_class].sort().values
        eval_pool[c] = members[half:][:eval_per_class].sort().values
    # labelled shots come from the train split
    shot_idx: List[List[int]] = []
    for k in range(1, num_stages + 1):
        picked: List[int] = []
        for c in stage_classes[k]:
            members = torch.nonzero(train.labels == c).flatten()
            if len(members) < shots:
                raise ConfigError(f"shots={shots} but class {c} has only {len(members)} train samples")
            perm = torch.randperm(len(members), generator=generator(seed, "gilcd-shots", c))
            picked += members[perm[:shots]].sort().values.tolist()
        shot_idx.append(picked)

    segments: List[Segment] = []
    seen: List[int] = []
    groups: List[str] = []
    for k, (corr, sev) in enumerate(schedule):
        tf = corruption_transform(corr, sev, seed, params)
        domain = corr if corr in ("clean", "none") else f"{corr}-{sev}"
        stage = f"stage-{k}"
        new = stage_classes[k]
        if k == 0:
            if base_session:
                idx = class_indices(train, new, base_per_class, seed, "base")
                segments.append(parts_segment("base", "train", [Part(train, idx)], batch_size, role="session",
                                              meta={"stage": 0, "classes": new, "new_classes": new},
                                              shuffle_seed=stable_seed(seed, "shuffle", "base")))
        elif new:
            idx = torch.tensor(shot_idx[k - 1], dtype=torch.long)
            segments.append(parts_segment(f"{stage}/shots", "train", [Part(train, idx, tf)],
                                          shot_batch_size or min(batch_size, len(idx)), role="session",
                                          meta={"stage": k, "new_classes": new, "shots": shots, "domain": domain},
                                          shuffle_seed=stable_seed(seed, "shuffle", stage, "shots")))
        seen += new
        if new or k == 0:
            groups.append(stage)
        adapt_idx = torch.cat([adapt_pool[c] for c in seen])
        segments.append(parts_segment(f"{stage}/{domain}", "adapt", [Part(test, adapt_idx, tf)], batch_size,
                                      role="domain", meta={"stage": k, "domain": domain, "corruption": corr,
                                                           "severity": sev, "classes": list(seen)},
                                      shuffle_seed=stable_seed(seed, "shuffle", stage)))
        if eval_each_stage:
            # one group per stage that introduced classes, so old vs. new classes can be read apart
            parts, gi = [], 0
            for j in range(k + 1):
                if j > 0 and not stage_classes[j]:
                    continue
                idx = torch.cat([eval_pool[c] for c in stage_classes[j]])
                parts.append(Part(test, idx, tf, group=gi))
                gi += 1
            segments.append(parts_segment(f"eval@{stage}", "eval", parts, max(batch_size, 256), role="probe",
                                          meta={"after": f"{stage}/{domain}", "domain": domain,
                                                "classes": list(seen)}, groups=list(groups)))
    full = dict(spec or {})
    full.update(name=name, base_classes=base_classes, classes_per_stage=classes_per_stage, shots=shots,
                num_stages=num_stages, corruptions=[c for c, _ in schedule], severities=[s for _, s in schedule],
                seed=seed, class_order=order, stage_classes=stage_classes, shot_indices=shot_idx,
                batch_size=batch_size, shot_batch_size=shot_batch_size, base_per_class=base_per_class,
                adapt_per_class=adapt_per_class, eval_per_class=eval_per_class, eval_each_stage=eval_each_stage,
                base_session=base_session, params=params)
    return Stream(name=name, segments=segments, num_classes=n_cls, setting="gilcd", spec=full)


def _gilcd(dataset: str, base: int, per_stage: int):
    def build(data_root: Optional[str] = None, base_classes: int = base, classes_per_stage: int = per_stage,
              shots: int = 5, num_stages: Optional[int] = None,
              corruptions: Union[str, List[str]] = "gaussian_noise,shot_noise,impulse_noise,brightness,contrast",
              severities: Union[int, List[int]] = 5, seed: int = 0, class_order: Optional[List[int]] = None,
              batch_size: int = 64, shot_batch_size: Optional[int] = None, base_per_class: Optional[int] = None,
              adapt_per_class: Optional[int] = None, eval_per_class: Optional[int] = None,
              eval_each_stage: bool = True, base_session: bool = True, download: bool = False) -> Stream:
        train, test = load_labelled(dataset, data_root, download)
        return gilcd_stream(f"{dataset}_gilcd", train, test, base_classes, classes_per_stage, shots, num_stages,
                            corruptions, severities, seed, class_order, batch_size, shot_batch_size,
                            base_per_class, adapt_per_class, eval_per_class, eval_each_stage, base_session,
                            spec={"dataset": dataset, "data_root": str(data_root) if data_root else None})

    build.__doc__ = (f"GILCD on {dataset}: corruption drift per stage while new classes arrive with a few labelled "
                     f"samples each; the rest of the stream is unlabelled.")
    return build


STREAMS.register("digits_gilcd", _gilcd("digits", 4, 2))
STREAMS.register("cifar10_gilcd", _gilcd("cifar10", 4, 2))
STREAMS.register("cifar100_gilcd", _gilcd("cifar100", 50, 10))

__all__ = ["drift_schedule", "gilcd_stream"]
