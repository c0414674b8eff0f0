"""Corruption benchmarks (CIFAR-10-C style): a clean test set met under a sequence of corruptions, one per domain.

Each domain is the (seeded, shuffled) clean test set under one corruption at one severity: read from the
original -C files when present, otherwise generated on the device by :mod:`.corruptions` (``generate_missing:
false`` forbids that). Optional clean ``eval`` probes before and after the stream measure forgetting of the
source domain. A folder holding only the released -C files runs too: the labels come from ``labels.npy``, and
what needs clean images (the probes, generated corruptions, ``interleave_clean``, ``clean_ratio``) is skipped
with a warning (the probes) or refused with a one-line error. ``Stream.provenance`` says per domain where its
images came from (``{"source": "files", "path": ...}`` or ``{"source": "generated", ...}``).
"""
from __future__ import annotations

import logging

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ctta.errors import ConfigError, CttaError, DataNotFoundError
from ctta.seeding import stable_seed

from .base import STREAMS, Segment, Stream
from .corruptions import CORRUPTION_ORDER, CORRUPTIONS, corrupt, generated_corruptions
from .corruptions.digital import jpeg_compression
from .gather import Block, gathered_segment
from .probes import PROBES, check_probes, probe_count  # noqa: F401  (PROBES: the modes, re-exported)
from .datasets import (_C_FOLDER, ImageSet, c_release_folder, corrupted_file, default_data_root, load_c_labels,
                       load_corrupted, load_cifar)
from .label_shift import check_label_shift, dirichlet_order, prior_counts, select_counts
from .orders import ORDERS, check_clean_ratio, check_rounds, clean_mix_slots, severity_schedule

log = logging.getLogger(__name__)

Key = Optional[Tuple[str, int]]  # (corruption, severity) of a source; None = the clean set


@dataclass
class StreamOptions:
    """The validated order and label-shift options of a corruption stream."""

    rounds: int
    clean_per_batch: int
    label_shift: List[Dict[str, Any]]

    @property
    def dirichlet(self) -> Optional[Dict[str, Any]]:
        return next((d for d in self.label_shift if d["kind"] == "dirichlet"), None)

    @property
    def prior(self) -> Optional[Dict[str, Any]]:
        return next((d for d in self.label_shift if d["kind"] in ("longtail", "zipf")), None)


def check_stream_options(severity: int, batch_size: int, num_samples: Optional[int], order: str,
                         rounds: Optional[int] = None, interleave_clean: bool = False, clean_ratio: float = 0.0,
                         label_shift: Any = None) -> StreamOptions:
    """Validate a corruption stream's spec before any data is read; one-line ConfigError on bad input."""
    if not isinstance(severity, int) or isinstance(severity, bool) or not 1 <= severity <= 5:
        raise ConfigError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                    or num_samples < 1):
        raise ConfigError(f"num_samples must be a positive integer or omitted, got {num_samples!r}")
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if not isinstance(interleave_clean, bool):
        raise ConfigError(f"interleave_clean must be true or false, got {interleave_clean!r}")
    return StreamOptions(rounds=check_rounds(order, rounds), clean_per_batch=check_clean_ratio(clean_ratio, batch_size),
                         label_shift=check_label_shift(label_shift))


def _corruption_list(corruptions: Union[str, Sequence[str]]) -> List[str]:
    if corruptions in ("all", None):
        return list(CORRUPTION_ORDER)
    names = [c.strip() for c in corruptions.split(",")] if isinstance(corruptions, str) else list(corruptions)
    for c in names:
        CORRUPTIONS.get(c)  # unknown names fail here with the valid list
    if not names:
        raise ConfigError("no corruption given")
    return names


@dataclass
class _Part:
    """A block of one segment: the clean-set indices ``index`` seen through source ``key``, in group ``group``."""

    key: Key
    index: Tensor
    group: int
    noise_seed: int


@dataclass
class _Source:
    images: Tensor  # uint8 N x C x H x W on the host (a -C file compacted to the used images, or the clean set)
    labels: Tensor
    position: Optional[Tensor]  # clean index -> row of ``images`` (None: identity)
    generated: bool
    path: Optional[str] = None  # the file the images were read from (a -C file)


class _Planner:
    """Draws the clean-set indices of every block: seeded, without repeats within a draw while the set lasts."""

    def __init__(self, labels: Tensor, seed: int, n: int, options: StreamOptions, pool: Optional[Tensor] = None):
        self.labels, self.seed, self.n, self.options = labels, seed, n, options
        self.pool = pool  # the indices it may draw (None: all); held-out probe images are outside it
        self.n_total = int(labels.shape[0]) if pool is None else int(pool.shape[0])
        pooled = labels if pool is None else labels[pool]
        self.classes = torch.unique(pooled).tolist()
        self.counts: Optional[List[int]] = None
        if options.prior is not None:
            avail = [int((pooled == c).sum()) for c in self.classes]
            self.counts = prior_counts(options.prior, avail, n, stable_seed(seed, "prior"))

    def _perms(self, *tag: object) -> Iterator[Tensor]:
        k = 0
        while True:
            parts = tag if k == 0 else (*tag, "more", k)
            perm = torch.randperm(self.n_total, generator=torch.Generator().manual_seed(stable_seed(self.seed, *parts)))
            yield perm if self.pool is None else self.pool[perm]
            k += 1

    def draw(self, steps: int, *tag: object, count: Optional[int] = None, prior: bool = True) -> List[Tensor]:
        """``steps`` disjoint blocks of ``count`` (default n) indices, or of the label-shift class counts."""
        counts = self.counts if prior and count is None else None
        want = self.n if count is None else count
        perms = self._perms(*tag)
        remaining = next(perms)
        out: List[Tensor] = []
        for _ in range(steps):
            if counts is None and want > self.n_total:  # more than the set holds: whole passes, repeats unavoidable
                take = torch.cat([remaining] + [next(perms) for _ in range(want // self.n_total)])[:want]
                out.append(take)
                remaining = next(perms)
                continue
            if not self._enough(remaining, counts, want):
                fresh = next(perms)
                used = torch.zeros(int(self.labels.shape[0]), dtype=torch.bool)
                used[remaining] = True
                remaining = torch.cat([remaining, fresh[~used[fresh]]])
            if counts is None:
                take, remaining = remaining[:want], remaining[want:]
            else:
                pos = select_counts(self.labels[remaining], self.classes, counts)
                keep = torch.ones(len(remaining), dtype=torch.bool)
                keep[pos] = False
                take, remaining = remaining[pos], remaining[keep]
            out.append(take)
        return out

    def _enough(self, remaining: Tensor, counts: Optional[List[int]], want: int) -> bool:
        if counts is None:
            return len(remaining) >= want
        y = self.labels[remaining]
        return all(int((y == c).sum()) >= k for c, k in zip(self.classes, counts))

    def reorder(self, index: Tensor, *tag: object) -> Tensor:
        """``index`` in Dirichlet order when the spec asks for temporally correlated classes, else as is."""
        d = self.options.dirichlet
        if d is None:
            return index
        return index[dirichlet_order(self.labels[index], d["delta"], stable_seed(self.seed, "dirichlet", *tag))]


def _planned_segment(name: str, parts: List[_Part], perm: Optional[Tensor], groups: Optional[List[str]],
                     sources: Dict[Key, _Source], batch_size: int, params: str, meta: Dict[str, Any],
                     jpeg_quality: Optional[int] = None) -> Segment:
    """A segment that gathers its parts from the sources chunk by chunk (corrupting generated ones on the device,
    then saving them as JPEG at ``jpeg_quality`` when given, as the released ImageNet-C files were saved)."""
    gathered = [_source_block(sources[p.key], p.index, p.key, p.noise_seed, p.group, params, jpeg_quality)
                for p in parts]
    return gathered_segment(name, "adapt", gathered, batch_size, order=perm, groups=groups, meta=meta)


def _source_block(src: _Source, index: Tensor, key: Key, noise_seed: int, group: int, params: str,
                  jpeg_quality: Optional[int]) -> Block:
    """Clean-set indices ``index`` seen through ``src``: the rows of its -C file, or the clean rows corrupted on the
    device with ``noise_seed`` (then JPEG at ``jpeg_quality`` when given)."""
    rows = index if src.position is None else src.position[index]
    transform = None
    if src.generated:
        def transform(x: Tensor) -> Tensor:
            out = corrupt(x, key[0], key[1], seed=noise_seed, params=params)
            return out if jpeg_quality is None else jpeg_compression(out, jpeg_quality, None)
    return Block(src.images, rows, src.labels[rows], group, transform)


def _sources(keys: List[Key], clean: ImageSet, used: Dict[Key, List[Tensor]],
             files: Optional[Callable[[str, int], Optional[ImageSet]]], generate_missing: bool = True,
             clean_missing: Optional[str] = None) -> Dict[Key, _Source]:
    """One source per (corruption, severity): its -C file cut down to the images the stream uses, or generated."""
    out: Dict[Key, _Source] = {}
    if clean_missing is None:
        out[None] = _Source(clean.images, clean.labels, None, generated=False)
    generated: List[str] = []
    for key in keys:
        c, s = key
        pre = files(c, s) if files is not None else None
        if pre is None:
            if files is not None and not generate_missing:
                raise DataNotFoundError(f"generate_missing is false but there is no -C file of {c} (severity {s}); "
                                        f"add {c}.npy or set generate_missing: true")
            if clean_missing is not None:
                raise DataNotFoundError(f"generating {c} needs the clean test set: {clean_missing}")
            if c not in generated_corruptions():
                raise CttaError(f"corruption {c!r} cannot be generated yet (generated: "
                                f"{', '.join(generated_corruptions())}); put the -C files ({c}.npy, labels.npy) "
                                f"under --data-root or choose other --corruptions")
            out[key] = _Source(clean.images, clean.labels, None, generated=True)
            if c not in generated:
                generated.append(c)
            continue
        if len(pre) != len(clean) or not torch.equal(pre.labels.long(), clean.labels.long()):
            raise ConfigError(f"the -C file of {c} (severity {s}) holds {len(pre)} images whose labels do not "
                              f"match the {len(clean)} clean test images; use the matching -C release")
        if not isinstance(pre.images, Tensor):  # files decoded on demand (ImageNet-C): nothing to compact
            out[key] = _Source(pre.images, pre.labels, None, generated=False, path=pre.source)
            continue
        rows = torch.unique(torch.cat(used[key]))  # sorted
        position = torch.full((len(clean),), -1, dtype=torch.long)
        position[rows] = torch.arange(len(rows))
        out[key] = _Source(pre.images[rows].clone(), pre.labels[rows].clone(), position, generated=False,
                           path=pre.source)
    if generated and files is not None:  # a -C folder without these files: say so (generate_missing: false forbids it)
        log.info("no -C files for %s: generating %s on the device from the clean test set", ", ".join(generated),
                 "it" if len(generated) == 1 else "them")
    elif generated:
        log.info("generating %s on the device from the clean test set", ", ".join(generated))
    return out


def _provenance(sources: Dict[Key, _Source], params: str) -> Dict[str, Dict[str, Any]]:
    """Where every domain's images came from, by ``<corruption>-<severity>``: a file, or the corruption engine."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, src in sources.items():
        if key is None:
            continue
        c, s = key
        if src.generated:
            out[f"{c}-{s}"] = {"source": "generated", "engine": "ctta.streams.corruptions", "params": params,
                               "corruption": c, "severity": s}
        else:
            out[f"{c}-{s}"] = {"source": "files", "path": src.path, "corruption": c, "severity": s}
    return out


def _probe_segment(after: str, domains: List[Tuple[str, Key]], held: Tensor, clean: ImageSet,
                   sources: Dict[Key, _Source], seed: int, batch_size: int, params: str,
                   jpeg_quality: Optional[int], probes: str) -> Segment:
    """``probes@<after>``: the held-out images clean and under each domain's corruption, one group each, in whole
    batches per group; the same images and noise at every probe, so R[i, j] compares like with like."""
    blocks = [Block(clean.images, held, clean.labels[held], group=0)]
    blocks += [_source_block(sources[key], held, key, stable_seed(seed, "probe", key[0], key[1]), k + 1, params,
                             jpeg_quality) for k, (_, key) in enumerate(domains)]
    name = f"probes@{after}" if after else "probes@start"
    meta = {"after": after, "probes": probes} if after else {"probes": probes}
    return gathered_segment(name, "eval", blocks, batch_size, groups=["clean"] + [d for d, _ in domains],
                            role="probe", meta=meta)


def corruption_stream(name: str, clean: ImageSet, corruptions: Union[str, Sequence[str]] = "all",
                      severity: int = 5, batch_size: int = 200, num_samples: Optional[int] = None,
                      order: str = "continual", seed: int = 1, clean_eval: bool = True,
                      params: str = "cifar10",
                      files: Optional[Callable[[str, int], Optional[ImageSet]]] = None,
                      spec: Optional[dict] = None, rounds: Optional[int] = None, interleave_clean: bool = False,
                      clean_ratio: float = 0.0, label_shift: Any = None, generate_missing: bool = True,
                      clean_missing: Optional[str] = None, jpeg_quality: Optional[int] = None,
                      probes: Optional[str] = None, probe_samples: int = 200) -> Stream:
    """Build a corruption stream over ``clean``; ``files(corruption, severity)`` may supply precomputed -C images.

    ``order`` (see :mod:`.orders`), ``rounds``, ``interleave_clean`` (a clean adapt domain after every shifted
    one but the last), ``clean_ratio`` (that share of every batch is clean, groups shifted/clean) and
    ``label_shift`` (see :mod:`.label_shift`) shape the stream; ``num_samples`` counts samples per domain (per
    severity step for the gradual orders). The same arguments give the same stream. ``generate_missing=False``
    makes a corruption that ``files`` does not supply an error instead of generating it. ``clean_missing`` (why
    there are no clean images) means ``clean`` carries only the labels of the -C files (see
    :func:`.datasets.load_c_labels`): the clean probes are skipped with a warning, and ``interleave_clean``,
    ``clean_ratio`` or a corruption to generate are one-line errors.

    ``probes`` (:data:`PROBES`; ``None``: ``clean`` when ``clean_eval`` else ``none``) adds, for ``seen`` / ``all``,
    an ``eval`` segment after every corruption domain over ``probe_samples`` held-out images (never adapted on)
    of the clean set and of every domain seen so far / of the stream, for the accuracy matrix (docs/streams.md).
    """
    opts = check_stream_options(severity, batch_size, num_samples, order, rounds, interleave_clean, clean_ratio,
                                label_shift)
    probes = check_probes(probes, probe_samples, clean_eval, order, opts.rounds)
    clean_eval = probes != "none"
    if probes in ("seen", "all") and clean_missing is not None:
        raise DataNotFoundError(f"probes: {probes} needs the clean test set (its clean probe): {clean_missing}")
    if not isinstance(generate_missing, bool):
        raise ConfigError(f"generate_missing must be true or false, got {generate_missing!r}")
    if clean_missing is not None:
        if interleave_clean:
            raise DataNotFoundError(f"interleave_clean needs the clean test set: {clean_missing}")
        if opts.clean_per_batch:
            raise DataNotFoundError(f"clean_ratio {clean_ratio} needs the clean test set: {clean_missing}")
        if clean_eval:
            log.warning("clean probes (clean@start, clean@end) skipped: %s", clean_missing)
            clean_eval = False
    names = _corruption_list(corruptions)
    if order == "random":
        perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(stable_seed(seed, "order")))
        names = [names[i] for i in perm.tolist()]
    n_total = len(clean)
    held, pool = None, None
    if probes in ("seen", "all"):  # held-out probe images, outside everything the strategy adapts on
        per_probe = probe_count(probe_samples, batch_size)
        if per_probe >= n_total:
            raise ConfigError(f"probe_samples {probe_samples} leaves no images to adapt on ({n_total} in the set)")
        order_all = torch.randperm(n_total, generator=torch.Generator().manual_seed(stable_seed(seed, "probes")))
        held, pool = order_all[:per_probe], torch.sort(order_all[per_probe:]).values
    n_pool = n_total if pool is None else len(pool)
    n = min(num_samples or n_pool, n_pool)
    plan = _Planner(clean.labels, seed, n, opts, pool)
    rounds_n = opts.rounds

    def pick(tag: str) -> torch.Tensor:
        if held is not None:
            return held
        g = torch.Generator().manual_seed(stable_seed(seed, tag))
        return torch.randperm(n_total, generator=g)[:n]

    # 1) plan every adapt segment as parts over sources (no image is read yet)
    planned: List[Tuple[str, List[_Part], Optional[Tensor], Optional[List[str]], Dict[str, Any]]] = []
    used: Dict[Key, List[Tensor]] = {}
    for r in range(rounds_n):
        tag = r if order == "recurring" else 0  # other orders repeat their first round verbatim
        suffix = f"#{r + 1}" if rounds_n > 1 else ""
        occurrences: Dict[Key, int] = {}

        def noise_seed(key: Key) -> int:
            k = occurrences.get(key, 0)
            occurrences[key] = k + 1
            return seed if (tag == 0 and k == 0) else stable_seed(seed, "noise", key[0], key[1], tag, k)

        def domain_tag(c: str) -> tuple:
            return (c,) if tag == 0 else (c, "round", tag)

        round_segments = []
        if order == "mixed":
            parts = []
            for gi, c in enumerate(names):
                idx = plan.draw(1, *domain_tag(c))[0]
                parts.append(_Part((c, severity), idx, gi, noise_seed((c, severity))))
            labels = plan.labels[torch.cat([p.index for p in parts])]
            if opts.dirichlet is not None:
                mix = dirichlet_order(labels, opts.dirichlet["delta"], stable_seed(seed, "dirichlet", "mixed", tag))
            else:
                mix = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
                    stable_seed(seed, "mixed", tag)))
            round_segments.append((f"mixed{suffix}", parts, mix, [f"{c}-{severity}" for c in names],
                                   {"corruptions": list(names), "severity": severity, "round": r + 1}))
        else:
            for i, c in enumerate(names):
                sevs = severity_schedule(order, i, severity)
                blocks = plan.draw(len(sevs), *domain_tag(c))
                parts = []
                for j, (s, idx) in enumerate(zip(sevs, blocks)):
                    idx = plan.reorder(idx, c, s, j, tag)
                    group = sorted(set(sevs)).index(s)
                    parts.append(_Part((c, s), idx, group, noise_seed((c, s))))
                gradual = len(sevs) > 1
                seg_name = f"{c}-gradual{suffix}" if gradual else f"{c}-{severity}{suffix}"
                groups = [f"{c}-{s}" for s in sorted(set(sevs))] if gradual else None
                meta = {"corruption": c, "severity": severity, "round": r + 1}
                if gradual:
                    meta["severities"] = list(sevs)
                round_segments.append((seg_name, parts, None, groups, meta))
        planned.extend(round_segments)
    # 2) interleave clean domains, mix clean samples into batches
    segs_plan: List[Tuple[str, List[_Part], Optional[Tensor], Optional[List[str]], Dict[str, Any]]] = []
    for k, (seg_name, parts, perm, groups, meta) in enumerate(planned):
        for p in parts:
            used.setdefault(p.key, []).append(p.index)
        if opts.clean_per_batch:
            m = sum(len(p.index) for p in parts)
            slots = clean_mix_slots(m, batch_size, opts.clean_per_batch, stable_seed(seed, "slots", seg_name))
            nc = int(slots.sum())
            groups = list(groups or ["shifted"])
            clean_idx = plan.draw(1, "clean-mix", seg_name, count=nc, prior=False)[0]
            parts = parts + [_Part(None, clean_idx, len(groups), seed)]
            groups.append("clean")
            final = torch.empty(m + nc, dtype=torch.long)
            final[~slots] = perm if perm is not None else torch.arange(m)
            final[slots] = m + torch.arange(nc)
            perm = final
            meta = {**meta, "clean_per_batch": opts.clean_per_batch}
        segs_plan.append((seg_name, parts, perm, groups, meta))
        if interleave_clean and k < len(planned) - 1:
            idx = plan.reorder(plan.draw(1, "interleave", k)[0], "interleave", k)
            segs_plan.append((f"clean-after-{seg_name}", [_Part(None, idx, 0, seed)], None, None,
                              {"clean": True, "interleaved": True}))
    # the corruption domains, each with the source its probe images are seen through
    domains = [(seg_name, (meta["corruption"], meta["severity"])) for seg_name, _, _, _, meta in segs_plan
               if "corruption" in meta]
    if held is not None:
        for _, key in domains:
            used.setdefault(key, []).append(held)
    # 3) read the -C files (only the images used) and build the segments
    keys = sorted(k for k in used if k is not None)
    sources = _sources(keys, clean, used, files, generate_missing, clean_missing)
    segments: List[Segment] = []
    probe_idx = pick("clean")

    def probe(probe_name: str) -> Segment:
        return gathered_segment(probe_name, "eval", [Block(clean.images, probe_idx, clean.labels[probe_idx])],
                                batch_size, role="probe")

    if clean_eval:
        segments.append(probe("clean@start"))
    if probes == "all":  # the source model on every domain: the baseline of forward transfer
        segments.append(_probe_segment("", domains, held, clean, sources, seed, batch_size, params, jpeg_quality,
                                       probes))
    for seg_name, parts, perm, groups, meta in segs_plan:
        kinds = {sources[p.key].generated for p in parts if p.key is not None}
        if kinds:
            meta = {**meta, "source": "generated" if kinds == {True} else ("files" if kinds == {False} else "mixed")}
        if opts.label_shift:
            meta = {**meta, "label_shift": [d["kind"] for d in opts.label_shift]}
        segments.append(_planned_segment(seg_name, parts, perm, groups, sources, batch_size, params, meta,
                                         jpeg_quality))
        if held is not None and "corruption" in meta:
            upto = [d[0] for d in domains].index(seg_name) + 1
            segments.append(_probe_segment(seg_name, domains[:upto] if probes == "seen" else domains, held, clean, sources,
                                           seed, batch_size, params, jpeg_quality, probes))
    if clean_eval:
        segments.append(probe("clean@end"))
    full_spec = dict(spec or {})
    full_spec.update(name=name, corruptions=names, severity=severity, batch_size=batch_size, num_samples=n,
                     order=order, seed=seed, clean_eval=clean_eval, params=params, rounds=rounds_n,
                     interleave_clean=interleave_clean, clean_ratio=float(clean_ratio),
                     label_shift=opts.label_shift or None)
    if plan.counts is not None:
        full_spec["class_counts"] = list(plan.counts)
    if generate_missing is False:
        full_spec["generate_missing"] = False
    if jpeg_quality is not None:
        full_spec["jpeg_quality"] = jpeg_quality
    if held is not None:
        full_spec.update(probes=probes, probe_samples=int(len(held)))
    return Stream(name=name, segments=segments, num_classes=len(clean.classes), setting="tta", spec=full_spec,
                  reset_each_domain=(order == "reset"), provenance=_provenance(sources, params))


_HOW_TO_GET_CLEAN = ("pass --download when online, or put the clean test set (test.npz or a torchvision CIFAR "
                     "folder) beside {folder}/ and point --data-root at the folder holding both")


def _cifar_c(dataset: str):
    def build(data_root: Optional[str] = None, corruptions: Union[str, Sequence[str]] = "all", severity: int = 5,
              batch_size: int = 200, num_samples: Optional[int] = None, order: str = "continual", seed: int = 1,
              clean_eval: bool = True, download: bool = False, rounds: Optional[int] = None,
              interleave_clean: bool = False, clean_ratio: float = 0.0, label_shift: Any = None,
              generate_missing: bool = True, probes: Optional[str] = None, probe_samples: int = 200) -> Stream:
        opts = check_stream_options(severity, batch_size, num_samples, order, rounds, interleave_clean, clean_ratio,
                                    label_shift)
        check_probes(probes, probe_samples, clean_eval, order, opts.rounds)
        if not isinstance(generate_missing, bool):
            raise ConfigError(f"generate_missing must be true or false, got {generate_missing!r}")
        names = _corruption_list(corruptions)
        root = Path(data_root).expanduser() if data_root else default_data_root()
        found = {c: corrupted_file(dataset, root, c) for c in names}
        missing = [c for c in names if found[c] is None]
        c_name = _C_FOLDER[dataset]
        release = c_release_folder(dataset, root)
        if missing and not generate_missing:
            where = release if release is not None else root
            one = len(missing) == 1
            raise DataNotFoundError(f"generate_missing is false but {len(missing)} of the {len(names)} corruptions "
                                    f"{'has' if one else 'have'} no {c_name} file in {where}: missing "
                                    f"{', '.join(c + '.npy' for c in missing)}; add {'it' if one else 'them'} or "
                                    f"set generate_missing: true (or choose other --corruptions)")
        clean_missing = None
        try:
            clean = load_cifar(dataset, data_root, train=False, download=download)
        except DataNotFoundError:
            if download or release is None:
                raise
            clean_missing = (f"only the {c_name} files were found in {release}, no clean {dataset} test set; "
                             + _HOW_TO_GET_CLEAN.format(folder=c_name))
            if missing:
                present = [c for c in names if found[c] is not None]
                raise DataNotFoundError(
                    f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in {release} and generating "
                    f"{'it' if len(missing) == 1 else 'them'} needs the clean {dataset} test set: "
                    f"{_HOW_TO_GET_CLEAN.format(folder=c_name)}; or run only the corruptions found "
                    f"(--corruptions {','.join(present) or '...'})") from None
            clean = load_c_labels(dataset, root, names[0])
            log.info("running %sc from the %s files alone in %s: labels from %s; no clean %s test set",
                     dataset, c_name, release, clean.source, dataset)
        spec = {"dataset": dataset, "data_root": str(data_root) if data_root else None,
                "generate_missing": generate_missing}
        return corruption_stream(
            f"{dataset}c", clean, names, severity, batch_size, num_samples, order, seed, clean_eval,
            params="cifar10", files=lambda c, s: load_corrupted(dataset, root, c, s), spec=spec, rounds=rounds,
            interleave_clean=interleave_clean, clean_ratio=clean_ratio, label_shift=label_shift,
            generate_missing=generate_missing, clean_missing=clean_missing, probes=probes,
            probe_samples=probe_samples)

    build.__doc__ = (f"{dataset.upper()}-C: the {dataset} test set under the 15 corruptions (files or generated; "
                     f"from the {_C_FOLDER[dataset]} files alone when there is no clean set).")
    return build


def digits_c(corruptions: Union[str, Sequence[str]] = "gaussian_noise,shot_noise,impulse_noise,brightness,contrast",
             severity: int = 5, batch_size: int = 64, num_samples: Optional[int] = None, order: str = "continual",
             seed: int = 1, clean_eval: bool = True, data_root: Optional[str] = None, rounds: Optional[int] = None,
             interleave_clean: bool = False, clean_ratio: float = 0.0, label_shift: Any = None,
             probes: Optional[str] = None, probe_samples: int = 64) -> Stream:
    """Offline default: scikit-learn's digits test split under corruptions (no download needed)."""
    from .digits import load_digits

    opts = check_stream_options(severity, batch_size, num_samples, order, rounds, interleave_clean, clean_ratio,
                                label_shift)
    check_probes(probes, probe_samples, clean_eval, order, opts.rounds)
    return corruption_stream("digits_c", load_digits(train=False), corruptions, severity, batch_size, num_samples,
                             order, seed, clean_eval, params="cifar10", spec={"dataset": "digits"}, rounds=rounds,
                             interleave_clean=interleave_clean, clean_ratio=clean_ratio, label_shift=label_shift,
                             probes=probes, probe_samples=probe_samples)


STREAMS.register("cifar10c", _cifar_c("cifar10"))
STREAMS.register("cifar100c", _cifar_c("cifar100"))
STREAMS.register("digits_c", digits_c)
