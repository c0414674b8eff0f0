"""Custom streams from Python objects or a YAML spec: tensors, a torch Dataset, image folders (one per domain).

Each takes one domain or several (a list, or a dict name -> data); every domain becomes one segment of ``kind``
(``adapt`` by default; one kind for all, or one per domain). ``from_batches`` (in base.py) keeps a given batching.
The registered stream ``folders`` builds the same from a spec: ``{domains: [{name, path, kind}], batch_size: 64}``
where ``path`` is an ImageFolder tree or an ``.npz`` file with ``images`` (uint8 NHWC) and ``labels``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ctta.errors import ConfigError, DataNotFoundError
from ctta.seeding import stable_seed

from .base import KINDS, STREAMS, Segment, Stream
from .datasets import ImageSet, load_image_folder
from .incremental import Part, check_int, parts_segment
from .probes import check_probes, probe_count

SETTINGS = ("tta", "class_incremental", "few_shot_class_incremental", "online_class_incremental",
            "domain_incremental", "gilcd", "sfda")


def _named(data: Any, domains: Optional[Sequence[str]], what: str) -> List[Tuple[str, Any]]:
    """(name, item) per domain from one item, a list or a dict."""
    if isinstance(data, Mapping):
        items = [(str(k), v) for k, v in data.items()]
        if domains is not None:
            raise ConfigError(f"{what}: give domain names either as dict keys or as domains=, not both")
    elif isinstance(data, (list, tuple)) and not (what == "from_tensors" and data and isinstance(data[0], Tensor)
                                                    and len(data) == 2 and data[1].dim() == 1):
        items = list(data)
        names = list(domains) if domains is not None else [f"domain-{i}" for i in range(len(items))]
        if len(names) != len(items):
            raise ConfigError(f"{what}: {len(items)} domains but {len(names)} names")
        items = list(zip(map(str, names), items))
    else:
        names = list(domains) if domains is not None else ["custom"]
        if len(names) != 1:
            raise ConfigError(f"{what}: one data set but {len(names)} domain names")
        items = [(str(names[0]), data)]
    if not items:
        raise ConfigError(f"{what}: no domain given")
    if len({n for n, _ in items}) != len(items):
        raise ConfigError(f"{what}: domain names must be distinct, got {[n for n, _ in items]}")
    return items


def _kinds(kind: Union[str, Sequence[str]], n: int, what: str) -> List[str]:
    kinds = [kind] * n if isinstance(kind, str) else list(kind)
    if len(kinds) != n:
        raise ConfigError(f"{what}: {n} domains but {len(kinds)} kinds")
    for k in kinds:
        if k not in KINDS:
            raise ConfigError(f"{what}: kind must be one of {', '.join(KINDS)}, got {k!r}")
    return kinds


def from_imagesets(sets: Sequence[Tuple[str, ImageSet]], kind: Union[str, Sequence[str]] = "adapt",
                   batch_size: int = 64, num_classes: Optional[int] = None, name: str = "custom",
                   setting: str = "tta", shuffle: bool = False, seed: int = 0,
                   spec: Optional[Dict[str, Any]] = None, probes: str = "none", probe_samples: int = 64) -> Stream:
    """One segment per (domain name, :class:`ImageSet`); ``adapt``/``train`` segments are domains, ``eval`` probes.

    ``probes: seen`` / ``all`` holds ``probe_samples`` images (whole batches) of every adapt domain out of it and,
    after each adapt domain, predicts on those of the domains seen so far / of all (``all`` also before the first):
    the accuracy matrix of a test-time run (docs/streams.md, "Forgetting probes").
    """
    check_int("batch_size", batch_size)
    if setting not in SETTINGS:
        raise ConfigError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    check_probes(probes, probe_samples, allowed=("none", "seen", "all"), what="a custom stream")
    kinds = _kinds(kind, len(sets), name)
    held: Dict[str, Tuple[ImageSet, Tensor]] = {}
    if probes != "none":
        per = probe_count(probe_samples, batch_size)
        for (dname, data), k in zip(sets, kinds):
            if k == "adapt":
                if per >= len(data):
                    raise ConfigError(f"domain {dname!r}: probe_samples {probe_samples} leaves none of its "
                                      f"{len(data)} images to adapt on")
                held[dname] = (data, torch.randperm(len(data), generator=torch.Generator().manual_seed(
                    stable_seed(seed, "probes", dname)))[:per])
    order = list(held)

    def probe(after: str) -> Segment:
        names = order if probes == "all" else order[:order.index(after) + 1]
        parts = [Part(held[d][0], held[d][1], group=j) for j, d in enumerate(names)]
        return parts_segment(f"probes@{after or 'start'}", "eval", parts, batch_size, role="probe", groups=names,
                             meta={"after": after, "probes": probes} if after else {"probes": probes},
                             keep_order=True)

    segments: List[Segment] = [probe("")] if probes == "all" else []
    max_label = -1
    for (dname, data), k in zip(sets, kinds):
        if len(data) == 0:
            raise ConfigError(f"domain {dname!r} holds no samples")
        max_label = max(max_label, int(data.labels.max()))
        idx = torch.arange(len(data))
        if dname in held:
            keep = torch.ones(len(data), dtype=torch.bool)
            keep[held[dname][1]] = False
            idx = idx[keep]
        segments.append(parts_segment(dname, k, [Part(data, idx)], batch_size,
                                      role="probe" if k == "eval" else "domain", meta={"domain": dname},
                                      shuffle_seed=stable_seed(seed, "shuffle", dname) if shuffle else None))
        if dname in held:
            segments.append(probe(dname))
    n_cls = num_classes if num_classes is not None else max(max_label + 1, max(len(d.classes) for _, d in sets))
    full: Dict[str, Any] = dict(name=name, kind=kinds, domains=[n for n, _ in sets], batch_size=batch_size,
                                setting=setting, shuffle=shuffle, seed=seed, custom=True)
    if probes != "none":
        full.update(probes=probes, probe_samples=probe_samples)
    full.update(spec or {})  # a caller's spec (e.g. the folders' paths) describes the domains better
    return Stream(name=name, segments=segments, num_classes=n_cls, setting=setting, spec=full)


def _as_imageset(x: Tensor, y: Optional[Tensor], what: str) -> ImageSet:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ConfigError(f"{what}: images must be an N x C x H x W tensor, got "
                          f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if y is None:
        y = torch.full((x.shape[0],), -1, dtype=torch.long)  # unlabelled: accuracy is not defined
    y = torch.as_tensor(y).long().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ConfigError(f"{what}: {x.shape[0]} images but {y.shape[0]} labels")
    n_cls = int(y.max()) + 1 if y.numel() and int(y.max()) >= 0 else 1
    return ImageSet(images=x, labels=y, classes=[str(i) for i in range(n_cls)])


def from_tensors(images: Any, labels: Any = None, kind: Union[str, Sequence[str]] = "adapt",
                 domains: Optional[Sequence[str]] = None, batch_size: int = 64, num_classes: Optional[int] = None,
                 name: str = "custom", setting: str = "tta", shuffle: bool = False, seed: int = 0,
                 probes: str = "none", probe_samples: int = 64) -> Stream:
    """A stream from tensors: ``from_tensors(x, y)`` (one domain), ``from_tensors([x1, x2], [y1, y2],
    domains=["a", "b"])`` or ``from_tensors({"a": (x1, y1), "b": (x2, y2)})``. Images uint8 or float in [0, 1]."""
    if isinstance(images, Mapping):
        items = [(str(k), v if isinstance(v, (tuple, list)) else (v, None)) for k, v in images.items()]
    elif isinstance(images, (list, tuple)):
        ys = list(labels) if labels is not None else [None] * len(images)
        if len(ys) != len(images):
            raise ConfigError(f"from_tensors: {len(images)} image tensors but {len(ys)} label tensors")
        names = list(domains) if domains is not None else [f"domain-{i}" for i in range(len(images))]
        if len(names) != len(images):
            raise ConfigError(f"from_tensors: {len(images)} domains but {len(names)} names")
        items = list(zip(map(str, names), zip(images, ys)))
    else:
        items = [(str(domains[0]) if domains else name, (images, labels))]
    sets = [(n, _as_imageset(x, y, f"domain {n!r}")) for n, (x, y) in items]
    return from_imagesets(sets, kind, batch_size, num_classes, name, setting, shuffle, seed, probes=probes,
                          probe_samples=probe_samples)


def _read_dataset(ds: Any, what: str, batch_size: int = 256) -> ImageSet:
    """Every (image, label, ...) item of a map-style or iterable torch Dataset, stacked (images must be tensors)."""
    from torch.utils.data import DataLoader

    try:
        n = len(ds)
    except TypeError:
        n = None
    if n == 0:
        raise ConfigError(f"{what}: the dataset is empty")
    xs, ys = [], []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[0], Tensor):
            raise ConfigError(f"{what}: items must be (image tensor, label, ...); add a ToTensor transform")
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]).long())
    if not xs:
        raise ConfigError(f"{what}: the dataset is empty")
    return _as_imageset(torch.cat(xs), torch.cat(ys), what)


def from_dataset(dataset: Any, kind: Union[str, Sequence[str]] = "adapt", domains: Optional[Sequence[str]] = None,
                 batch_size: int = 64, num_classes: Optional[int] = None, name: str = "custom",
                 setting: str = "tta", shuffle: bool = False, seed: int = 0) -> Stream:
    """A stream from a torch Dataset yielding (image tensor, label) (or a list / dict of them, one per domain);
    the items are read once into memory."""
    items = _named(dataset, domains, "from_dataset")
    sets = [(n, _read_dataset(d, f"domain {n!r}")) for n, d in items]
    return from_imagesets(sets, kind, batch_size, num_classes, name, setting, shuffle, seed)


def _load_path(path: Union[str, Path], classes: Optional[Sequence[str]], image_size: Optional[int],
               max_per_class: Optional[int], seed: int) -> ImageSet:
    p = Path(path).expanduser()
    if p.suffix == ".npz":
        if not p.is_file():
            raise DataNotFoundError(f"domain file {p} does not exist")
        try:
            with np.load(p, allow_pickle=False) as data:
                x, y = data["images"], data["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{p}: needs arrays 'images' (uint8 N x H x W x 3) and 'labels' ({e})") from None
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ConfigError(f"{p}: 'images' must be N x H x W x 3, got shape {x.shape}")
        return _as_imageset(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                            torch.from_numpy(np.asarray(y).astype(np.int64)), str(p))
    return load_image_folder(p, classes=classes, size=image_size, max_per_class=max_per_class, seed=seed)


def from_folders(folders: Any, kind: Union[str, Sequence[str]] = "adapt", domains: Optional[Sequence[str]] = None,
                 batch_size: int = 64, image_size: Optional[int] = None, classes: Optional[Sequence[str]] = None,
                 max_per_class: Optional[int] = None, num_classes: Optional[int] = None, name: str = "folders",
                 setting: str = "tta", shuffle: bool = True, seed: int = 0, probes: str = "none",
                 probe_samples: int = 64) -> Stream:
    """A stream from ImageFolder trees (``<path>/<class>/<image>``) or .npz files, one per domain.

    All domains share one label space: ``classes`` if given, else the sorted union of the class folder names.
    Every folder is checked (exists, holds images) before any image is decoded.
    """
    items = _named(folders, domains, "from_folders")
    kinds = _kinds(kind, len(items), name)
    check_int("max_per_class", max_per_class, optional=True)
    check_int("image_size", image_size, optional=True)
    folder_classes: set = set()
    for dname, path in items:
        p = Path(path).expanduser()
        if p.suffix == ".npz":
            if not p.is_file():
                raise DataNotFoundError(f"domain {dname!r}: file {p} does not exist")
            continue
        if not p.is_dir():
            raise DataNotFoundError(f"domain {dname!r}: folder {p} does not exist")
        subs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if not any(f.is_file() for d in subs for f in d.rglob("*")):
            raise DataNotFoundError(f"domain {dname!r}: folder {p} holds no images (expected <class>/<image>)")
        folder_classes |= {d.name for d in subs}
    names = list(classes) if classes is not None else sorted(folder_classes)
    sets = [(n, _load_path(p, names if names else None, image_size, max_per_class, seed)) for n, p in items]
    spec = {"domains": [{"name": n, "path": str(p), "kind": k} for (n, p), k in zip(items, kinds)],
            "image_size": image_size, "classes": names or None, "max_per_class": max_per_class}
    n_cls = num_classes if num_classes is not None else (len(names) if names else None)
    return from_imagesets(sets, kinds, batch_size, n_cls, name, setting, shuffle, seed, spec=spec, probes=probes,
                          probe_samples=probe_samples)


def folders(domains: List[Dict[str, Any]], batch_size: int = 64, image_size: Optional[int] = None,
            classes: Optional[List[str]] = None, max_per_class: Optional[int] = None,
            num_classes: Optional[int] = None, setting: str = "tta", shuffle: bool = True, seed: int = 0,
            probes: str = "none", probe_samples: int = 64) -> Stream:
    """Image folders or .npz files per domain from a spec: ``domains: [{name, path, kind}]`` (kind: adapt default)."""
    if not isinstance(domains, list) or not domains:
        raise ConfigError("stream 'folders' needs domains: a list of {name, path, kind} entries")
    names, paths, kinds = [], [], []
    for i, d in enumerate(domains):
        if isinstance(d, str):
            d = {"path": d}
        if not isinstance(d, Mapping) or "path" not in d:
            raise ConfigError(f"domains[{i}] must be a mapping with a 'path' (and optional name, kind), got {d!r}")
        extra = set(d) - {"name", "path", "kind"}
        if extra:
            raise ConfigError(f"domains[{i}] has unknown keys {sorted(extra)}; it takes name, path, kind")
        names.append(str(d.get("name") or Path(str(d["path"])).name))
        paths.append(d["path"])
        kinds.append(d.get("kind", "adapt"))
    return from_folders(paths, kinds, names, batch_size, image_size, classes, max_per_class, num_classes,
                        "folders", setting, shuffle, seed, probes=probes, probe_samples=probe_samples)


STREAMS.register("folders", folders)

__all__ = ["folders", "from_dataset", "from_folders", "from_imagesets", "from_tensors"]
