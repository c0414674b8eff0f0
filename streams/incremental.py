"""Continual-learning streams: class-incremental, few-shot class-incremental, online and domain-incremental.

Each learning session is a ``train`` segment (role ``session``); after it an ``eval`` segment holds the test data of
everything learned so far, with ``groups`` = the sessions and ``meta["after"]`` = the session's name, so the
accuracy matrix R[i, j] can be read off the run. Class orders and few-shot samples come from the stream's seed and
are written into its spec, so the spec alone rebuilds the same stream. Segments index the data set and copy the
selected images to the device chunk by chunk when the engine reaches them (:mod:`.gather`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ctta.errors import ConfigError
from ctta.seeding import stable_seed

from .base import STREAMS, Segment, Stream
from .gather import Block, gathered_segment
from .datasets import ImageSet

Transform = Callable[[Tensor], Tensor]


# ---- shared pieces (also used by gilcd.py, sfda.py and custom.py) -------------------------------------------------

@dataclass
class Part:
    """Samples ``idx`` of ``data`` (optionally transformed on the device, optionally relabelled) in group ``group``."""

    data: ImageSet
    idx: Tensor
    transform: Optional[Transform] = None
    group: int = 0
    labels: Optional[Tensor] = None  # replaces data.labels[idx] (e.g. open-set "unknown" mapping)

    def __len__(self) -> int:
        return int(self.idx.numel())


def check_int(name: str, value: Any, low: int = 1, optional: bool = False) -> Optional[int]:
    """A one-line ConfigError unless ``value`` is an integer >= ``low`` (or None when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}{' or omitted' if optional else ''}, got {value!r}")
    return value


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


def parts_segment(name: str, kind: str, parts: Sequence[Part], batch_size: int, role: str = "session",
                  meta: Optional[Dict[str, Any]] = None, groups: Optional[List[str]] = None,
                  shuffle_seed: Optional[int] = None, epochs: int = 1, keep_order: bool = False) -> Segment:
    """A segment over indexed parts of in-memory sets; shuffled (a new order per epoch) when ``shuffle_seed`` is set.

    Each part's transform runs on the device once per image of a chunk (a whole small segment is one chunk, so once
    before repetition over epochs). ``eval`` segments are
    always shuffled (seeded by their name when no seed is given): class-sorted test batches would penalise every
    method that normalises with batch statistics; ``keep_order`` keeps the parts in sequence (probes whose parts
    are already shuffled, one domain per batch).
    """
    check_int("epochs", epochs)
    if shuffle_seed is None and kind == "eval" and not keep_order:
        shuffle_seed = stable_seed("eval-order", name)
    n = sum(len(p) for p in parts)
    if n == 0:
        raise ConfigError(f"segment {name!r} would hold no samples")
    if shuffle_seed is not None:
        gen = torch.Generator().manual_seed(shuffle_seed)
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])
    elif epochs > 1:
        order = torch.arange(n).repeat(epochs)
    else:
        order = None
    blocks = [Block(p.data.images, p.idx, p.labels if p.labels is not None else p.data.labels[p.idx], p.group,
                    p.transform) for p in parts]
    return gathered_segment(name, kind, blocks, batch_size, order=order, role=role, meta=meta,
                            groups=list(groups) if groups is not None else None)


def class_indices(data: ImageSet, classes: Sequence[int], per_class: Optional[int] = None,
                  seed: Optional[int] = None, tag: str = "") -> Tensor:
    """Indices of ``data`` whose label is in ``classes`` (in class order); ``per_class`` keeps a seeded subset."""
    out = []
    for c in classes:
        members = torch.nonzero(data.labels == c).flatten()
        if per_class is not None and len(members) > per_class:
            perm = torch.randperm(len(members), generator=generator(seed, tag, "subset", c))
            members = members[perm[:per_class]].sort().values
        out.append(members)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def resolve_class_order(num_classes: int, seed: int, class_order: Optional[Sequence[int]] = None,
                        shuffle: bool = True) -> List[int]:
    """The explicit ``class_order`` (checked: distinct known ids) or a seeded permutation of all classes."""
    if class_order is None:
        if not shuffle:
            return list(range(num_classes))
        return torch.randperm(num_classes, generator=generator(seed, "class_order")).tolist()
    order = [int(c) for c in class_order]
    bad = [c for c in order if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"unknown class ids {bad[:5]} in class_order: the data has classes 0..{num_classes - 1}")
    if len(set(order)) != len(order):
        raise ConfigError(f"class_order repeats a class: {order}")
    return order


DATASET_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


def num_dataset_classes(dataset: str) -> int:
    """Class count of a named data set, known before loading it (so bad splits fail before any work)."""
    if dataset not in DATASET_CLASSES:
        raise ConfigError(f"dataset must be one of {', '.join(DATASET_CLASSES)}, got {dataset!r}")
    return DATASET_CLASSES[dataset]


def load_labelled(dataset: str, data_root: Optional[str] = None, download: bool = False) -> Tuple[ImageSet, ImageSet]:
    """(train, test) of a named labelled data set: ``digits`` (offline), ``cifar10`` or ``cifar100``."""
    if dataset == "digits":
        from .digits import load_digits

        return load_digits(train=True), load_digits(train=False)
    if dataset in ("cifar10", "cifar100"):
        from .datasets import load_cifar

        return (load_cifar(dataset, data_root, train=True, download=download),
                load_cifar(dataset, data_root, train=False, download=download))
    raise ConfigError(f"dataset must be one of digits, cifar10, cifar100, got {dataset!r}")


def eval_segment(after: str, test: ImageSet, sessions: Sequence[Tuple[str, Sequence[int]]], batch_size: int,
                 per_class: Optional[int], seed: int, transforms: Optional[Sequence[Optional[Transform]]] = None,
                 extra_meta: Optional[Dict[str, Any]] = None) -> Segment:
    """``eval@<after>``: the test data of ``sessions`` (name, classes), one group per session."""
    parts = [Part(test, class_indices(test, cls, per_class, seed, "test"),
                  transform=transforms[j] if transforms else None, group=j)
             for j, (_, cls) in enumerate(sessions)]
    seen = [c for _, cls in sessions for c in cls]
    meta = {"after": after, "classes": seen, **(extra_meta or {})}
    return parts_segment(f"eval@{after}", "eval", parts, batch_size, role="probe", meta=meta,
                         groups=[s for s, _ in sessions])


# ---- class-incremental ---------------------------------------------------------------------------------------------

def split_sessions(order: Sequence[int], init_classes: int, increment: int,
                   num_sessions: Optional[int] = None) -> List[List[int]]:
    """``order`` cut into a first session of ``init_classes`` and then sessions of ``increment`` classes."""
    check_int("init_classes", init_classes)
    check_int("increment", increment)
    check_int("num_sessions", num_sessions, optional=True)
    n = len(order)
    if num_sessions is None:
        if init_classes > n or (n - init_classes) % increment:
            raise ConfigError(f"init_classes={init_classes} plus sessions of increment={increment} do not fit the "
                              f"{n} classes (need {n} = init_classes + k * increment)")
        num_sessions = 1 + (n - init_classes) // increment
    need = init_classes + (num_sessions - 1) * increment
    if need > n:
        raise ConfigError(f"init_classes={init_classes} + {num_sessions - 1} sessions of increment={increment} need "
                          f"{need} classes, the data has {n}")
    cuts = [0, init_classes] + [init_classes + k * increment for k in range(1, num_sessions)]
    return [list(order[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def class_incremental_stream(name: str, train: ImageSet, test: ImageSet, init_classes: int, increment: int,
                             seed: int = 0, class_order: Optional[Sequence[int]] = None,
                             num_sessions: Optional[int] = None, batch_size: int = 32, eval_batch_size: int = 256,
                             epochs: int = 1, train_per_class: Optional[int] = None,
                             test_per_class: Optional[int] = None, setting: str = "class_incremental",
                             spec: Optional[Dict[str, Any]] = None) -> Stream:
    """Class-incremental learning over ``train``/``test``: ``session-k`` train segments, each followed by an eval."""
    check_int("epochs", epochs)
    check_int("batch_size", batch_size)
    check_int("eval_batch_size", eval_batch_size)
    check_int("train_per_class", train_per_class, optional=True)
    check_int("test_per_class", test_per_class, optional=True)
    order = resolve_class_order(len(train.classes), seed, class_order)
    sessions = split_sessions(order, init_classes, increment, num_sessions)
    segments: List[Segment] = []
    learned: List[Tuple[str, List[int]]] = []
    for k, classes in enumerate(sessions):
        sname = f"session-{k}"
        idx = class_indices(train, classes, train_per_class, seed, "train")
        if idx.numel() == 0:
            raise ConfigError(f"{sname}: the train data has no samples of classes {classes}")
        segments.append(parts_segment(sname, "train", [Part(train, idx)], batch_size, role="session",
                                      meta={"session": k, "classes": classes, "epochs": epochs},
                                      shuffle_seed=stable_seed(seed, "shuffle", sname), epochs=epochs))
        learned.append((sname, classes))
        segments.append(eval_segment(sname, test, learned, eval_batch_size, test_per_class, seed))
    full = dict(spec or {})
    full.update(name=name, init_classes=init_classes, increment=increment, seed=seed, class_order=order,
                sessions=sessions, batch_size=batch_size, eval_batch_size=eval_batch_size, epochs=epochs,
                train_per_class=train_per_class, test_per_class=test_per_class)
    return Stream(name=name, segments=segments, num_classes=len(train.classes), setting=setting, spec=full)


# ---- few-shot class-incremental ------------------------------------------------------------------------------------

def _pick_shots(train: ImageSet, classes: Sequence[int], shots: int, seed: int, session: int) -> List[int]:
    picked: List[int] = []
    for c in classes:
        members = torch.nonzero(train.labels == c).flatten()
        if len(members) < shots:
            raise ConfigError(f"shots={shots} but class {c} has only {len(members)} train samples")
        perm = torch.randperm(len(members), generator=generator(seed, "shots", session, c))
        picked += members[perm[:shots]].sort().values.tolist()
    return picked


def _check_given_shots(train: ImageSet, sessions: Sequence[Sequence[int]], given: Sequence[Sequence[int]],
                       shots: int) -> List[List[int]]:
    if len(given) != len(sessions) - 1:
        raise ConfigError(f"fewshot_indices must list {len(sessions) - 1} sessions, got {len(given)}")
    out, seen = [], set()
    n = len(train)
    for k, (idx, classes) in enumerate(zip(given, sessions[1:]), start=1):
        idx = [int(i) for i in idx]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ConfigError(f"fewshot_indices of session {k}: indices {bad[:5]} outside the {n} train samples")
        labels = train.labels[torch.tensor(idx, dtype=torch.long)].tolist() if idx else []
        counts = {c: labels.count(c) for c in classes}
        if any(v != shots for v in counts.values()) or len(labels) != shots * len(classes):
            raise ConfigError(f"fewshot_indices of session {k} must hold exactly {shots} samples of each of classes "
                              f"{list(classes)}, got label counts {counts}")
        if seen & set(idx):
            raise ConfigError(f"fewshot_indices of session {k} repeat samples of an earlier session")
        seen |= set(idx)
        out.append(idx)
    return out


def few_shot_stream(name: str, train: ImageSet, test: ImageSet, base_classes: int = 60, ways: int = 5,
                    shots: int = 5, num_sessions: Optional[int] = None, seed: int = 0,
                    class_order: Optional[Sequence[int]] = None,
                    fewshot_indices: Optional[Sequence[Sequence[int]]] = None, batch_size: int = 32,
                    eval_batch_size: int = 256, epochs: int = 1, base_epochs: Optional[int] = None,
                    train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                    shuffle_classes: bool = False, spec: Optional[Dict[str, Any]] = None) -> Stream:
    """Few-shot class-incremental: a base session (all train data of ``base_classes``), then ``ways``-way
    ``shots``-shot sessions. The few-shot samples are drawn from the seed (or given) and stored in the spec.

    The class order is the natural one (the TOPIC / CIFAR-100 FSCIL protocol: classes 0-59 base) unless
    ``class_order`` is given or ``shuffle_classes`` draws it from the seed."""
    check_int("shots", shots)
    check_int("ways", ways)
    for key, val in (("epochs", epochs), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        check_int(key, val)
    check_int("base_epochs", base_epochs, optional=True)
    order = resolve_class_order(len(train.classes), seed, class_order, shuffle=shuffle_classes)
    sessions = split_sessions(order, base_classes, ways, num_sessions)
    if fewshot_indices is not None:
        shot_idx = _check_given_shots(train, sessions, fewshot_indices, shots)
    else:
        shot_idx = [_pick_shots(train, cls, shots, seed, k) for k, cls in enumerate(sessions[1:], start=1)]
    segments: List[Segment] = []
    learned: List[Tuple[str, List[int]]] = []
    for k, classes in enumerate(sessions):
        sname = f"session-{k}"
        if k == 0:
            idx = class_indices(train, classes, train_per_class, seed, "train")
            ep = base_epochs or epochs
        else:
            idx = torch.tensor(shot_idx[k - 1], dtype=torch.long)
            ep = epochs
        segments.append(parts_segment(sname, "train", [Part(train, idx)], batch_size, role="session",
                                      meta={"session": k, "classes": classes, "epochs": ep,
                                            "shots": None if k == 0 else shots},
                                      shuffle_seed=stable_seed(seed, "shuffle", sname), epochs=ep))
        learned.append((sname, classes))
        segments.append(eval_segment(sname, test, learned, eval_batch_size, test_per_class, seed))
    full = dict(spec or {})
    full.update(name=name, base_classes=base_classes, ways=ways, shots=shots, num_sessions=len(sessions),
                seed=seed, class_order=order, sessions=sessions, fewshot_indices=shot_idx, batch_size=batch_size,
                eval_batch_size=eval_batch_size, epochs=epochs, base_epochs=base_epochs,
                train_per_class=train_per_class, test_per_class=test_per_class, shuffle_classes=shuffle_classes)
    return Stream(name=name, segments=segments, num_classes=len(train.classes),
                  setting="few_shot_class_incremental", spec=full)


# ---- domain-incremental --------------------------------------------------------------------------------------------

def corruption_transform(corruption: str, severity: int, seed: int, params: str = "cifar10") -> Optional[Transform]:
    """The on-device corruption of a domain (``clean``/``none`` is the identity)."""
    if corruption in ("clean", "none"):
        return None
    from .corruptions import CORRUPTIONS, corrupt

    CORRUPTIONS.get(corruption)  # unknown names fail now, with the valid list
    return lambda x: corrupt(x, corruption, severity, seed=seed, params=params)


def domain_incremental_stream(name: str, domains: Sequence[Tuple[str, Part, Part]], num_classes: int,
                              batch_size: int = 32, eval_batch_size: int = 256, epochs: int = 1, seed: int = 0,
                              spec: Optional[Dict[str, Any]] = None) -> Stream:
    """The same classes over a sequence of domains (name, train part, test part): train on each domain, then
    evaluate on the test data of every domain seen so far (one group per domain)."""
    check_int("epochs", epochs)
    if not domains:
        raise ConfigError("a domain-incremental stream needs at least one domain")
    names = [d[0] for d in domains]
    if len(set(names)) != len(names):
        raise ConfigError(f"domain names must be distinct, got {names}")
    segments: List[Segment] = []
    for k, (dname, tr, _) in enumerate(domains):
        segments.append(parts_segment(dname, "train", [tr], batch_size, role="session",
                                      meta={"session": k, "domain": dname, "epochs": epochs},
                                      shuffle_seed=stable_seed(seed, "shuffle", dname), epochs=epochs))
        parts = [Part(te.data, te.idx, te.transform, group=j, labels=te.labels)
                 for j, (_, _, te) in enumerate(domains[:k + 1])]
        segments.append(parts_segment(f"eval@{dname}", "eval", parts, eval_batch_size, role="probe",
                                      meta={"after": dname}, groups=names[:k + 1]))
    full = dict(spec or {})
    full.update(name=name, domains=names, batch_size=batch_size, eval_batch_size=eval_batch_size, epochs=epochs,
                seed=seed)
    return Stream(name=name, segments=segments, num_classes=num_classes, setting="domain_incremental", spec=full)


def _corruption_list(corruptions: Union[str, Sequence[str]]) -> List[str]:
    names = [c.strip() for c in corruptions.split(",") if c.strip()] if isinstance(corruptions, str) \
        else [str(c) for c in corruptions]
    if not names:
        raise ConfigError("no corruption given")
    return names


# ---- registered streams --------------------------------------------------------------------------------------------

def _ci(dataset: str, online: bool = False):
    def build(data_root: Optional[str] = None, init_classes: int = 2, increment: int = 2, seed: int = 0,
              class_order: Optional[List[int]] = None, num_sessions: Optional[int] = None,
              batch_size: int = 10 if online else 32, eval_batch_size: int = 256, epochs: int = 1,
              train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
              download: bool = False) -> Stream:
        if online and epochs != 1:
            raise ConfigError(f"an online stream shows each sample once: epochs must be 1, got {epochs!r}")
        check_int("epochs", epochs)
        # the split is checked before the data are loaded
        split_sessions(resolve_class_order(num_dataset_classes(dataset), seed, class_order), init_classes,
                       increment, num_sessions)
        train, test = load_labelled(dataset, data_root, download)
        kind = "online" if online else "ci"
        return class_incremental_stream(
            f"{dataset}_{kind}", train, test, init_classes, increment, seed, class_order, num_sessions, batch_size,
            eval_batch_size, epochs, train_per_class, test_per_class,
            setting="online_class_incremental" if online else "class_incremental",
            spec={"dataset": dataset, "data_root": str(data_root) if data_root else None, "online": online})

    build.__doc__ = (f"{'Online class-incremental' if online else 'Class-incremental'} {dataset}: seeded class "
                     f"order, sessions of classes, eval on all classes seen so far after each session.")
    return build


def _fscil(dataset: str):
    def build(data_root: Optional[str] = None, base_classes: int = 60, ways: int = 5, shots: int = 5,
              num_sessions: Optional[int] = None, seed: int = 0, class_order: Optional[List[int]] = None,
              fewshot_indices: Optional[List[List[int]]] = None, batch_size: int = 32, eval_batch_size: int = 256,
              epochs: int = 1, base_epochs: Optional[int] = None, train_per_class: Optional[int] = None,
              test_per_class: Optional[int] = None, shuffle_classes: bool = False,
              download: bool = False) -> Stream:
        check_int("shots", shots)
        check_int("epochs", epochs)
        split_sessions(resolve_class_order(num_dataset_classes(dataset), seed, class_order), base_classes, ways,
                       num_sessions)
        train, test = load_labelled(dataset, data_root, download)
        return few_shot_stream(f"{dataset}_fscil", train, test, base_classes, ways, shots, num_sessions, seed,
                               class_order, fewshot_indices, batch_size, eval_batch_size, epochs, base_epochs,
                               train_per_class, test_per_class, shuffle_classes,
                               spec={"dataset": dataset, "data_root": str(data_root) if data_root else None})

    build.__doc__ = f"Few-shot class-incremental {dataset}: a base session, then N-way K-shot sessions (seeded)."
    return build


def _di(dataset: str):
    def build(data_root: Optional[str] = None,
              corruptions: Union[str, List[str]] = "gaussian_noise,shot_noise,impulse_noise,brightness,contrast",
              severity: int = 5, seed: int = 0, batch_size: int = 32, eval_batch_size: int = 256, epochs: int = 1,
              train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
              download: bool = False) -> Stream:
        check_int("severity", severity)
        if severity > 5:
            raise ConfigError(f"severity must be an integer from 1 to 5, got {severity!r}")
        check_int("train_per_class", train_per_class, optional=True)
        check_int("test_per_class", test_per_class, optional=True)
        check_int("epochs", epochs)
        names = _corruption_list(corruptions)
        tfs = [corruption_transform(c, severity, seed) for c in names]
        train, test = load_labelled(dataset, data_root, download)
        classes = list(range(len(train.classes)))
        domains = []
        for c, tf in zip(names, tfs):
            dname = c if c in ("clean", "none") else f"{c}-{severity}"
            tr = Part(train, class_indices(train, classes, train_per_class, stable_seed(seed, c), "train"), tf)
            te = Part(test, class_indices(test, classes, test_per_class, seed, "test"), tf)
            domains.append((dname, tr, te))
        return domain_incremental_stream(
            f"{dataset}c_di" if dataset != "digits" else "digits_di", domains, len(train.classes), batch_size,
            eval_batch_size, epochs, seed,
            spec={"dataset": dataset, "data_root": str(data_root) if data_root else None, "corruptions": names,
                  "severity": severity, "train_per_class": train_per_class, "test_per_class": test_per_class})

    build.__doc__ = (f"Domain-incremental {dataset}: train on the corrupted train data of each corruption in turn, "
                     f"evaluate on the corrupted test data of all corruptions seen so far.")
    return build


for _ds in ("digits", "cifar10", "cifar100"):
    STREAMS.register(f"{_ds}_ci", _ci(_ds))
    STREAMS.register(f"{_ds}_online", _ci(_ds, online=True))
STREAMS.register("cifar100_fscil", _fscil("cifar100"))
STREAMS.register("digits_fscil", _fscil("digits"))
STREAMS.register("cifar10c_di", _di("cifar10"))
STREAMS.register("digits_di", _di("digits"))

__all__ = ["Part", "class_incremental_stream", "corruption_transform", "domain_incremental_stream",
           "few_shot_stream", "load_labelled", "parts_segment", "split_sessions"]
