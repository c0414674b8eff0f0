"""Speed and memory side by side: our strategy and the reference implementation of the same method, one process each.

The reference (mariodoebler/test-time-adaptation) is not part of this repository: give its ``classification/``
folder with ``--reference`` and the stand-ins for ``autoattack`` / ``webdataset`` with ``--stand-ins`` (see
benchmarks/reference_agreement.py, whose helpers drive it here too). This script contains none of its code.

One CIFAR-10-C stream is generated once by our engine (``ctta.streams.corruption``), stored as uint8 as the
released -C files are, one ``.npz`` per domain under ``--work``. Then, per method and repeat, two fresh processes
run in alternating order (ours first on even repeats, the reference's first on odd ones), on the same model (the
shared ResNet-20 through ``ctta.backbones``), the same images in the same order, the same batches, seed and device:

* ours: the ``ctta-bench`` CLI (``ctta.cli.main`` in the child) on a ``folders`` stream of those files, until its
  run folder (rows, summary, plots, report) is written;
* the reference's: its test-time loop as ``test_time.py`` runs it: the method from its ``ADAPTATION_REGISTRY``
  with its CIFAR-10-C config, and per domain its own data path (the file read and converted as robustbench's
  ``load_cifar10c`` does, its ``CustomCifarDataset`` and a ``DataLoader`` with its ``TEST.NUM_WORKERS``), then
  its ``get_accuracy``.

Beyond that loop (the methods of issue 17), each side as its agreement harness builds it, by import:

* CMF, RoTTA: the reference's object from ``reference_agreement.build_reference`` (CMF's ``.cuda()`` made on the CPU,
  RoTTA's ``loss_calculation`` call fixed), in the same loop;
* RMT, SANTA: both sides get the same ``--source-samples`` source images from ``--data-root``'s train set (ours
  draws them in its seeded order; the reference gets those images, order and batches as its source loader,
  ``reference_agreement._reference_source_inputs``), RMT ``--warmup-samples`` warm-up samples on both; the step 0
  on source data (prototypes, RMT's warm-up: our ``ensure_ready``, the reference's constructor) is timed apart
  and is not in the loop's seconds;
* MEMO, AdaContrast, TPT, VTE: the reference's views are made in its data loader as its ``test_time.py`` makes
  them (its ``get_transform`` for MEMO / AdaContrast, with AdaContrast's model split replaced as
  ``adacontrast_reference.use_our_split`` does; ``tpt_reference.reference_views`` for TPT / VTE), ours on the
  device; TPT / VTE on the in-house CLIP (``--clip-weights``) built by ``tpt_reference``'s functions;
* NOTE (LINs-lab/ttab, ``--ttab``), T3A and SHOT (matsuolab/T3A, ``--t3a``): a per-batch step from their harnesses
  (``note_reference.note_step``, ``domainbed_tta_reference.official``) timed by :func:`run_external` over the
  same files (no DataLoader: those repositories' own scripts are not run, so their whole-run time is a bare loop
  against our whole CLI run); ours with those harnesses' hyperparameters (``ours_setup``).

Measured: (a) the whole process, from its start to its exit (what a user waits for), wall and CPU seconds and
peak RSS (``os.wait4``; on CUDA also ``torch.cuda.max_memory_allocated``); (b) the per-domain loops alone (ours:
the engine's per-segment seconds, which hold the segment's load on the device; the reference's: its
``get_accuracy`` calls, which hold its DataLoader). Images/s and ratios (ours / reference; above 1: ours faster)
are medians over ``--repeats``. On CUDA: ``--precision fp32,bf16`` (autocast) reports the error difference
bf16 - fp32 of each side, ``--channels-last`` converts both models, ``--sync-check`` counts host syncs inside
the per-domain loops (``torch.cuda.set_sync_debug_mode``).

    OMP_NUM_THREADS=2 python benchmarks/side_by_side.py --reference /tmp/refagree/classification \\
        --stand-ins /tmp/refagree/stand --weights ../shared/models/resnet20-12fca82f.th \\
        --data-root ../shared/data/cifar10 --methods source,bn,tent,cotta,lame --num-samples 2000 --repeats 3
    # and e.g. --methods source,rmt,t3a,note --ttab /tmp/ref_ttab --t3a /tmp/ref_t3a/adapt_algorithms.py
    #          --methods memo,tpt,vte --batch-size 1 --num-samples 40 --clip-weights /tmp/inhouse_clip.pt
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
CORRUPTIONS = "gaussian_noise,impulse_noise,defocus_blur,contrast,jpeg_compression"


# ----------------------------------------------------------------------------------------------- the stream

def write_domains(domains: Sequence[Tuple[str, Any, Any]], folder: Path) -> List[Tuple[str, Path]]:
    """Each (name, float images N x C x H x W in [0, 1], labels) as ``<folder>/<name>.npz`` (uint8 N x H x W x C, as
    the -C files store them); returns (name, path) in order."""
    import numpy as np
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, x, y in domains:
        u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        path = folder / f"{name}.npz"
        np.savez(path, images=u8, labels=np.asarray(y, dtype=np.int64))
        out.append((name, path))
    return out


def prepare_stream(args: argparse.Namespace) -> List[Tuple[str, Path]]:
    """The generated CIFAR-10-C domains as .npz files under ``--work`` (reused when already written)."""
    import torch

    import ctta

    key = f"c10c-s{args.severity}-n{args.num_samples}-seed{args.seed}-" + args.corruptions.replace(",", "+")
    folder = Path(args.work) / key
    names = [f"{c}-{args.severity}" for c in args.corruptions.split(",")]
    if all((folder / f"{n}.npz").is_file() for n in names):
        return [(n, folder / f"{n}.npz") for n in names]
    stream = ctta.streams.corruption("cifar10", root=args.data_root, severity=args.severity,
                                     corruptions=args.corruptions, num_samples=args.num_samples,
                                     batch_size=args.batch_size, seed=args.seed, clean_eval=False)
    domains = []
    for seg in stream.segments:
        if seg.role == "domain":
            x, y, _ = seg.materialise(torch.device("cpu"))
            domains.append((seg.name, x, y))
    return write_domains(domains, folder)


def load_domain(path: Path):
    """(uint8 N x H x W x C images, int64 labels) of one domain file."""
    import numpy as np

    with np.load(path) as d:
        return d["images"], d["labels"]


# ----------------------------------------------------------------------------------------------- the children

def experiment_config(domains: Sequence[Tuple[str, Path]], method: str, backbone: str, weights: Optional[str],
                      batch_size: int, seed: int, device: str, overrides: Optional[Dict[str, Any]] = None,
                      backbone_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Our experiment: the domain files as a ``folders`` stream in their order, the backbone (with
    ``backbone_options``, e.g. a CLIP checkpoint, instead of ``weights`` when given), the strategy."""
    bb: Dict[str, Any] = {"name": backbone, "num_classes": 10}
    if backbone_options is not None:
        bb.update(backbone_options)
    elif weights:
        bb["weights"] = str(weights)
    return {"stream": {"name": "folders", "domains": [{"name": n, "path": str(p)} for n, p in domains],
                       "batch_size": batch_size, "shuffle": False, "num_classes": 10},
            "backbone": bb, "strategy": {"name": method, **(overrides or {})},
            "run": {"device": device, "seed": seed}}


class SyncCounter:
    """Counts host syncs flagged by ``torch.cuda.set_sync_debug_mode('warn')`` between :meth:`on` and :meth:`off`,
    by the Python line that caused them (no-op off CUDA)."""

    def __init__(self, enabled: bool) -> None:
        import warnings

        self.enabled = enabled
        self.sites: Dict[str, int] = {}
        self._catcher = warnings.catch_warnings(record=True) if enabled else None
        self._records: Optional[list] = None

    def __enter__(self) -> "SyncCounter":
        import warnings

        if self._catcher is not None:
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
        return self

    def on(self) -> None:
        if self.enabled:
            import torch

            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")

    def off(self) -> None:
        if self.enabled:
            import torch

            torch.cuda.set_sync_debug_mode("default")
            for r in self._records or []:
                if "synchroniz" in str(r.message):
                    site = f"{Path(r.filename).name}:{r.lineno}"
                    self.sites[site] = self.sites.get(site, 0) + 1
            if self._records is not None:
                self._records.clear()

    def __exit__(self, *exc: Any) -> None:
        if self._catcher is not None:
            self._catcher.__exit__(*exc)

    def result(self) -> Dict[str, Any]:
        top = sorted(self.sites.items(), key=lambda kv: -kv[1])[:6]
        return {"syncs": sum(self.sites.values()), "sync_sites": dict(top)} if self.enabled else {}


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (a DataLoader's workers): the work done, which a
    loaded machine does not inflate as it does wall time."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _autocast(device: str, precision: str):
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_ours(domains: Sequence[Tuple[str, Path]], method: str, out: Path, backbone: str = "resnet20_cifar",
             weights: Optional[str] = None, batch_size: int = 200, seed: int = 1, device: str = "cpu",
             precision: str = "fp32", channels_last: bool = False, sync_check: bool = False,
             overrides: Optional[Dict[str, Any]] = None, backbone_options: Optional[Dict[str, Any]] = None
             ) -> Dict[str, Any]:
    """Our side: ``ctta-bench --config <experiment> --out <out>`` in this process; returns errors, images and the
    per-segment loop seconds read back from the run folder it wrote. A strategy with a step 0 on source data
    (``ensure_ready``: RMT's prototypes and warm-up, SANTA's prototypes) has it timed apart and taken out of the
    loop's seconds (``warmup_seconds``, ``warmup_cpu_seconds``)."""
    import pandas as pd
    import torch

    import ctta.strategies
    from ctta import cli, config, engine, experiment

    cfg_path = out.parent / f"{out.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    config.dump_yaml(experiment_config(domains, method, backbone, weights, batch_size, seed, device, overrides,
                                       backbone_options), cfg_path)
    loop_cpu = [0.0]
    warm = {"wall": 0.0, "cpu": 0.0, "wall_in_loop": 0.0}
    counter = SyncCounter(sync_check and torch.device(device).type == "cuda")
    cls = ctta.strategies.STRATEGIES.get(method)
    ready = getattr(cls, "ensure_ready", None) if method in SOURCE_DATA else None
    originals = (experiment.build_model, engine.CostMeter, engine.SegmentAccumulator)
    build, meter_cls, acc_cls = originals

    class Timed(meter_cls):  # type: ignore[misc, valid-type]  # each segment's timed span in CPU seconds too
        def start(self) -> None:
            super().start()
            self._cpu0, self._warm0 = cpu_seconds(), dict(warm)

        def stop(self, *a: Any, **k: Any) -> float:
            dt = super().stop(*a, **k)
            loop_cpu[0] += cpu_seconds() - self._cpu0 - (warm["cpu"] - self._warm0["cpu"])
            warm["wall_in_loop"] += warm["wall"] - self._warm0["wall"]
            return dt

    def timed_ready(strategy: Any, device: Any) -> None:  # step 0 (source prototypes, warm-up), timed apart
        if bool(strategy.ready):
            return
        t0, c0 = time.perf_counter(), cpu_seconds()
        ready(strategy, device)
        warm["wall"] += time.perf_counter() - t0
        warm["cpu"] += cpu_seconds() - c0

    class Counted(acc_cls):  # type: ignore[misc, valid-type]  # syncs from a segment's load to its finish
        def __init__(self) -> None:
            super().__init__()
            counter.on()

        def finish(self):
            counter.off()
            return super().finish()

    engine.CostMeter = Timed
    if counter.enabled:
        engine.SegmentAccumulator = Counted
    if channels_last:
        experiment.build_model = lambda *a, **k: build(*a, **k).to(memory_format=torch.channels_last)
    if ready is not None:
        cls.ensure_ready = timed_ready
    try:
        with counter, _autocast(device, precision):
            rc = cli.main(["--config", str(cfg_path), "--out", str(out), "--no-progress", "-q", "--force"])
    finally:
        experiment.build_model, engine.CostMeter, engine.SegmentAccumulator = originals
        if ready is not None:
            cls.ensure_ready = ready
    if rc != 0:
        raise RuntimeError(f"ctta-bench exited with {rc}")
    seg = pd.read_csv(out / "segments.csv")
    seg = seg[seg["role"] == "domain"]
    summary = json.loads((out / "summary.json").read_text())
    res = {"errors": {r.segment: int(round(r.error * r.n)) for r in seg.itertuples()},
           "images": int(seg["n"].sum()), "loop_seconds": float(seg["seconds"].sum()) - warm["wall_in_loop"],
           "loop_cpu_seconds": loop_cpu[0],
           "batches": int(sum(-(-int(n) // batch_size) for n in seg["n"])),
           "engine_peak_mb": summary.get("peak_memory_mb"), **counter.result()}
    if ready is not None:
        res.update(warmup_seconds=warm["wall"], warmup_cpu_seconds=warm["cpu"])
    if torch.device(device).type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


class _ReferenceArgs(argparse.Namespace):
    """The options benchmarks/reference_agreement.reference_cfg reads: batch size and seed set, every other one
    falsy (the reference configs' own values) unless given."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None if name == "fisher_weight" else 0


def _reference_args(batch_size: int, seed: int, **given: Any) -> argparse.Namespace:
    return _ReferenceArgs(batch_size=batch_size, seed=seed, **given)


# ------------------------------------------------------------------------- the methods beyond the plain loop

#: methods with a step 0 on source data (prototypes; RMT also its warm-up): both sides get the same source images
#: (ours: ``source_data`` drawn in its seeded order; the reference: those images as its source loader, as
#: reference_agreement.py does) and that step is timed apart from the loop
SOURCE_DATA = ("rmt", "santa")
#: the reference makes these methods' views in its data loader (a transform of its dataset), ours on the device
VIEWS_IN_LOADER = ("memo", "adacontrast", "tpt", "vte")
#: on the in-house CLIP (``--clip-weights``) instead of ``--backbone``
CLIP = ("tpt", "vte")
#: the hyperparameters of the agreement runs of the references outside mariodoebler/test-time-adaptation
NOTE_LR = 1e-3  # benchmarks/note_reference.py --lr (TTAB parameters.py)
T3A_FILTER_K = 100  # TTAB's default, ours (RESULTS.md, T3A against matsuolab/T3A)
SHOT_LR, SHOT_THETA = 1e-4, 0.1  # benchmarks/domainbed_tta_reference.py defaults (the T3A repository's SHOT)


def _harnesses_importable() -> None:
    """The agreement harnesses (benchmarks/*_reference.py) importable: this script's folder on ``sys.path``."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))


def _note_step(opts: argparse.Namespace, make_model: Callable, seed: int) -> Callable:
    """TTAB's NOTE as benchmarks/note_reference.py builds and drives it (PBRS draws from ``random``, seeded)."""
    import random

    from note_reference import Recorder, note_step, reference_note

    ref, _ = reference_note(os.path.abspath(opts.ttab), make_model(), NOTE_LR, seed)
    rec = Recorder()
    random.seed(seed)
    return lambda x, y: note_step(ref, rec, x, y)


def _domainbed_step(method: str) -> Callable:
    """matsuolab/T3A's ``T3A`` / ``SHOT`` as benchmarks/domainbed_tta_reference.py builds and calls them."""

    def build(opts: argparse.Namespace, make_model: Callable, seed: int) -> Callable:
        import domainbed_tta_reference as dtr

        algorithm = dtr.official(dtr.import_reference(os.path.abspath(opts.t3a)), method, make_model, T3A_FILTER_K,
                                 SHOT_LR, SHOT_THETA)
        return lambda x, y: algorithm(x, adapt=True)

    return build


#: references outside the doebler repository: method -> build(options, make_model, seed) -> step(x, y) -> logits,
#: the per-batch call of that method's agreement harness (timed by :func:`run_external`)
EXTERNAL: Dict[str, Callable] = {"note": _note_step, "t3a": _domainbed_step("t3a"), "shot": _domainbed_step("shot")}


def ours_setup(method: str, opts: Optional[argparse.Namespace]) -> Tuple[Optional[str], Optional[Dict[str, Any]],
                                                                           Dict[str, Any]]:
    """Our side's (backbone, backbone options, strategy overrides) for ``method`` where they differ from the
    plain run: the source data of RMT / SANTA, the agreement runs' hyperparameters of NOTE / T3A / SHOT, the
    in-house CLIP of TPT / VTE (VTE with the reference's CIFAR-10 templates, as in tpt_reference.py)."""
    if opts is None:
        return None, None, {}
    _harnesses_importable()
    if method in SOURCE_DATA:
        over: Dict[str, Any] = {"source_data": opts.data_root, "source_samples": opts.source_samples}
        if method == "rmt":
            over["warmup_samples"] = opts.warmup_samples
        return None, None, over
    if method == "note":
        return None, None, {"lr": NOTE_LR}
    if method in ("t3a", "shot"):
        import domainbed_tta_reference as dtr

        _, kwargs = dtr.ours_arguments(method, T3A_FILTER_K, SHOT_LR, SHOT_THETA, 0)
        kwargs.pop("seed", None)  # the run's seed
        return None, None, kwargs
    if method in CLIP:
        from tpt_reference import clip_templates, ours_clip_spec

        if method == "vte":  # its datasets/prompts.py (plain lists), without importing the rest of the reference
            sys.path.insert(0, os.path.abspath(opts.reference))
        return "clip", ours_clip_spec(opts.clip_weights, method, clip_templates(method)), {"n_views": 64}
    return None, None, {}


def run_external(domains: Sequence[Tuple[str, Path]], step: Callable, batch_size: int = 200,
                 device: str = "cpu") -> Dict[str, Any]:
    """A reference's loop given by a per-batch ``step(x, y) -> logits``: per domain its file read as our
    ``folders`` stream reads it (uint8 -> float / 255, NCHW) inside the timing, then its batches in order;
    errors per domain, images, batches, loop wall and CPU seconds."""
    import torch

    from ctta.strategies.common import as_float_images

    errors: Dict[str, int] = {}
    loop = loop_cpu = 0.0
    images = batches = 0
    for name, path in domains:
        t0, c0 = time.perf_counter(), cpu_seconds()
        x_np, y_np = load_domain(path)
        x_all = as_float_images(torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(), device)
        y_all = torch.from_numpy(y_np).to(device)
        wrong = 0
        for i in range(0, len(y_all), batch_size):
            x, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
            wrong += int((step(x, y).argmax(1) != y).sum())
            batches += 1
        loop += time.perf_counter() - t0
        loop_cpu += cpu_seconds() - c0
        errors[name] = wrong
        images += len(y_all)
    return {"errors": errors, "images": images, "loop_seconds": loop, "loop_cpu_seconds": loop_cpu,
            "batches": batches}


def _reference_cfg(conf: Any, ref_root: str, method: str, batch_size: int, seed: int,
                   opts: Optional[argparse.Namespace]) -> Any:
    """The reference's config of ``method``: reference_agreement.reference_cfg for the methods it knows (RMT with
    ``--warmup-samples``), else its ``cfgs/cifar10_c/<method>.yaml`` over ``conf.py`` at our batch and seed."""
    from reference_agreement import REFERENCE, reference_cfg

    if method in REFERENCE:
        given = {"rmt_warmup_samples": opts.warmup_samples} if method == "rmt" and opts is not None else {}
        return reference_cfg(conf, ref_root, method, _reference_args(batch_size, seed, **given))
    cfg = conf.cfg.clone()
    cfg.merge_from_file(os.path.join(ref_root, "cfgs", "cifar10_c", f"{method}.yaml"))
    cfg.TEST.BATCH_SIZE, cfg.RNG_SEED = batch_size, seed
    return cfg


def run_reference(domains: Sequence[Tuple[str, Path]], method: str, reference: str, stand_ins: str,
                  backbone: str = "resnet20_cifar", weights: Optional[str] = None, batch_size: int = 200,
                  seed: int = 1, device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
                  sync_check: bool = False, opts: Optional[argparse.Namespace] = None) -> Dict[str, Any]:
    """The reference's side: its method and config, per domain its data path (with the views its data loader
    makes for MEMO, AdaContrast, TPT, VTE) and ``get_accuracy`` loop; NOTE, T3A and SHOT: :func:`run_external`
    on their own repositories' code. RMT / SANTA: the constructor (prototypes, warm-up) timed apart."""
    import random
    from types import SimpleNamespace

    import numpy as np
    import torch

    _harnesses_importable()
    import ctta

    def make_model():
        return ctta.backbones.create(backbone, num_classes=10, weights=weights).eval().to(device)

    if method in EXTERNAL:
        torch.manual_seed(seed)
        return run_external(domains, EXTERNAL[method](opts, make_model, seed), batch_size, device)

    from reference_agreement import ReferenceView, _reference_source_inputs, build_reference, import_reference

    ref_root = os.path.abspath(reference)
    conf, registry = import_reference(ref_root, stand_ins)
    from robustbench.loaders import CustomCifarDataset  # the reference's copy of robustbench
    from utils.eval_utils import get_accuracy

    transform = None
    warm: Dict[str, float] = {}
    if method in CLIP:
        from tpt_reference import clip_templates, ours_clip, reference_clip_method, reference_views

        norm = ours_clip(opts.clip_weights, method, clip_templates(method)).normalize
        tta, cfg = reference_clip_method(method, opts.clip_weights, conf, registry, ref_root, 64, seed, None, norm)
        transform = reference_views(cfg.TEST.N_AUGMENTATIONS)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
    else:
        cfg = _reference_cfg(conf, ref_root, method, batch_size, seed, opts)
        torch.manual_seed(seed)
        model = make_model()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if method == "lame":
            model = ReferenceView(model, "adaptive")
        if method in SOURCE_DATA:  # the source images ours draws, in its order and batches, as its source loader
            from ctta.strategies.common.source_prototypes import seeded_source

            images, labels = seeded_source(opts.data_root, 10, opts.source_samples, seed, method)
            _reference_source_inputs(SimpleNamespace(source_batch=200, source_images=images, source_labels=labels),
                                     model, cfg, method)
        if method == "adacontrast":
            from adacontrast_reference import use_our_split

            use_our_split()
        if method in ("memo", "adacontrast"):
            from datasets.data_loading import get_transform  # the reference's

            transform = get_transform("cifar10_c", method, None, False, n_views=cfg.TEST.N_AUGMENTATIONS)
        # the reference draws from the global generators, seeded as its conf.py does
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        t0, c0 = time.perf_counter(), cpu_seconds()
        tta = build_reference(registry, method, cfg, model)
        if method in SOURCE_DATA:  # its constructor computes the prototypes (RMT: and warms up)
            warm = {"warmup_seconds": time.perf_counter() - t0, "warmup_cpu_seconds": cpu_seconds() - c0}
    counter = SyncCounter(sync_check and torch.device(device).type == "cuda")
    errors: Dict[str, int] = {}
    loop = loop_cpu = 0.0
    images = batches = 0
    with counter:
        for i, (name, path) in enumerate(domains):
            if i == 0:
                try:
                    tta.reset()
                except AttributeError:
                    pass
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), cpu_seconds()
            counter.on()
            x, y = load_domain(path)  # as load_cifar10c: NCHW float32 / 255, then back to NHWC per sample
            x = np.transpose(x, (0, 3, 1, 2)).astype(np.float32) / 255
            x = torch.tensor(x).numpy().transpose((0, 2, 3, 1))
            samples = [[x[k], y[k], name] for k in range(x.shape[0])]
            loader = torch.utils.data.DataLoader(CustomCifarDataset(samples=samples, transform=transform),
                                                 batch_size=batch_size, shuffle=False, drop_last=False,
                                                 num_workers=min(cfg.TEST.NUM_WORKERS, os.cpu_count() or 1))
            with _autocast(device, precision):
                acc, _, n = get_accuracy(tta, data_loader=loader, dataset_name="cifar10_c", domain_name=name,
                                         setting="continual", domain_dict={}, print_every=-1, device=device)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            counter.off()
            loop += time.perf_counter() - t0
            loop_cpu += cpu_seconds() - c0
            errors[name] = int(round((1 - acc) * n))
            images += n
            batches += -(-n // batch_size)
    res = {"errors": errors, "images": images, "loop_seconds": loop, "loop_cpu_seconds": loop_cpu,
           "batches": batches, **warm, **counter.result()}
    if torch.device(device).type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


def child_main(args: argparse.Namespace) -> int:
    """One process, one side: run it and write its result as JSON to ``--result``."""
    domains = [(Path(p).stem, Path(p)) for p in args.domains.split(",")]
    common = dict(backbone=args.backbone, weights=args.weights, batch_size=args.batch_size, seed=args.seed,
                  device=args.device, precision=args.precision, channels_last=args.channels_last,
                  sync_check=args.sync_check)
    if args.child == "ours":
        backbone, options, overrides = ours_setup(args.method, args)
        common["backbone"] = backbone or args.backbone
        res = run_ours(domains, args.method, Path(args.out), overrides=overrides, backbone_options=options,
                       **common)
    else:
        res = run_reference(domains, args.method, args.reference, args.stand_ins, opts=args, **common)
    Path(args.result).write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------------------------- the parent

def spawn(args: argparse.Namespace, side: str, method: str, precision: str, domains: Sequence[Tuple[str, Path]],
          tag: str) -> Dict[str, Any]:
    """Run one side in a fresh process; its result plus the whole process's wall / CPU seconds and peak RSS."""
    work = Path(args.work)
    result = work / "results" / f"{tag}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "ref" if side == "ref" else "ours",
           "--method", method,
           "--domains", ",".join(str(p) for _, p in domains), "--result", str(result),
           "--out", str(work / "runs" / tag), "--backbone", args.backbone, "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--device", args.device, "--precision", precision,
           "--reference", args.reference or "", "--stand-ins", args.stand_ins or "", "--data-root", args.data_root,
           "--source-samples", str(args.source_samples), "--warmup-samples", str(args.warmup_samples),
           "--clip-weights", args.clip_weights, "--ttab", args.ttab, "--t3a", args.t3a]
    cmd += ["--weights", args.weights] if args.weights else []
    cmd += ["--channels-last"] if args.channels_last else []
    cmd += ["--sync-check"] if args.sync_check else []
    env = dict(os.environ)
    if side == "before":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.before, env.get("PYTHONPATH", "")) if p)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{side} {method} failed (exit {proc.returncode}):\n{err[-3000:]}")
    res = json.loads(result.read_text())
    res.update(side=side, method=method, precision=precision, wall_seconds=wall,
               cpu_seconds=usage.ru_utime + usage.ru_stime, rss_peak_mb=usage.ru_maxrss / 1024)
    return res


def summarise(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (method, precision, side): medians over repeats, and the ratios of images/s to the reference's."""
    out: List[Dict[str, Any]] = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    sides = list(dict.fromkeys(r["side"] for r in rows))
    for method in methods:
        for precision in precisions:
            group = {}
            for side in sides:
                rs = [r for r in rows if (r["method"], r["precision"], r["side"]) == (method, precision, side)]
                if not rs:
                    continue
                n = rs[0]["images"]
                med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
                s = {"method": method, "precision": precision, "side": side, "runs": len(rs), "images": n,
                     "whole_s": med("wall_seconds"), "cpu_s": med("cpu_seconds"),
                     "whole_ips": n / med("wall_seconds"), "loop_ips": n / med("loop_seconds"),
                     "whole_ipc": n / med("cpu_seconds"), "loop_ipc": n / med("loop_cpu_seconds"),
                     "rss_mb": med("rss_peak_mb"), "error": 100 * sum(rs[0]["errors"].values()) / n,
                     "same_errors_each_run": all(r["errors"] == rs[0]["errors"] for r in rs)}
                if rs[0].get("cuda_peak_mb") is not None:
                    s["cuda_mb"] = med("cuda_peak_mb")
                if rs[0].get("warmup_seconds") is not None:
                    s["warmup_s"], s["warmup_cpu_s"] = med("warmup_seconds"), med("warmup_cpu_seconds")
                if "syncs" in rs[0]:
                    s["syncs_per_batch"] = rs[0]["syncs"] / max(rs[0]["batches"], 1)
                    s["sync_sites"] = rs[0]["sync_sites"]
                group[side] = s
            ref = group.get("ref")
            for side, s in group.items():
                if ref is not None and side != "ref":
                    s["whole_ratio"] = s["whole_ips"] / ref["whole_ips"]
                    s["loop_ratio"] = s["loop_ips"] / ref["loop_ips"]
                    s["whole_cpu_ratio"] = s["whole_ipc"] / ref["whole_ipc"]
                    s["loop_cpu_ratio"] = s["loop_ipc"] / ref["loop_ipc"]
                    s["error_minus_ref"] = s["error"] - ref["error"]
                out.append(s)
    fp32 = {(s["method"], s["side"]): s["error"] for s in out if s["precision"] == "fp32"}
    for s in out:
        if s["precision"] != "fp32" and (s["method"], s["side"]) in fp32:
            s["error_vs_fp32"] = s["error"] - fp32[(s["method"], s["side"])]
    return out


def table(summary: Sequence[Dict[str, Any]]) -> str:
    """The Markdown table of :func:`summarise`: one row per method, precision and side; ratios to the reference."""
    cols = [("method", "method", "%s"), ("precision", "precision", "%s"), ("side", "side", "%s"),
            ("whole run s (CPU s)", None, ""), ("whole img/s", "whole_ips", "%.3g"), ("ratio", "whole_ratio", "%.2f"),
            ("loop img/s", "loop_ips", "%.3g"), ("ratio", "loop_ratio", "%.2f"),
            ("whole img/CPU-s", "whole_ipc", "%.3g"), ("ratio", "whole_cpu_ratio", "%.2f"),
            ("loop img/CPU-s", "loop_ipc", "%.3g"), ("ratio", "loop_cpu_ratio", "%.2f"),
            ("peak RSS MB", "rss_mb", "%.0f")]
    if any("warmup_s" in s for s in summary):
        cols.insert(3, ("step 0 on source data s (CPU s), not in the loop", "warmup", ""))
    if any("cuda_mb" in s for s in summary):
        cols.append(("peak CUDA MB", "cuda_mb", "%.0f"))
    cols.append(("error %", "error", "%.2f"))
    if any("error_vs_fp32" in s for s in summary):
        cols.append(("error - fp32 (points)", "error_vs_fp32", "%+.2f"))
    if any("syncs_per_batch" in s for s in summary):
        cols.append(("host syncs / batch in the loop", "syncs_per_batch", "%.2f"))
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + " --- |" * len(cols)]
    for s in summary:
        cells = []
        for _, key, fmt in cols:
            if key is None:
                cells.append(f"{s['whole_s']:.1f} ({s['cpu_s']:.1f})")
            elif key == "warmup":
                cells.append(f"{s['warmup_s']:.1f} ({s['warmup_cpu_s']:.1f})" if "warmup_s" in s else "-")
            else:
                cells.append(fmt % s[key] if key in s else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", default="", help="the reference checkout's classification/ folder")
    ap.add_argument("--stand-ins", default="", help="folder with the autoattack.py / webdataset.py stand-ins")
    ap.add_argument("--weights", default="", help="backbone checkpoint (the shared ResNet-20)")
    ap.add_argument("--backbone", default="resnet20_cifar")
    ap.add_argument("--data-root", default="", help="CIFAR-10 folder the stream is generated from")
    ap.add_argument("--methods", default="source,bn,tent,cotta,lame")
    ap.add_argument("--sides", default="ours,ref", help="ours, ref and/or before (comma-separated)")
    ap.add_argument("--before", default="",
                    help="side 'before': ours from this PYTHONPATH (a copy of an earlier tree with ctta/ holding "
                         "streams/, strategies/, evaluation/, configs/), to measure a change")
    ap.add_argument("--corruptions", default=CORRUPTIONS)
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--num-samples", type=int, default=2000, help="images per corruption")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="fp32 and/or bf16 (CUDA autocast), comma-separated")
    ap.add_argument("--channels-last", action="store_true", help="both models in channels_last memory format")
    ap.add_argument("--sync-check", action="store_true", help="count host syncs in the loops (CUDA)")
    ap.add_argument("--repeats", type=int, default=3, help="process pairs per method (order alternates)")
    ap.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of both children (0: inherit)")
    ap.add_argument("--source-samples", type=int, default=2000,
                    help="rmt / santa: source images (from --data-root's train set), the same on both sides")
    ap.add_argument("--warmup-samples", type=int, default=2000, help="rmt: warm-up samples, both sides")
    ap.add_argument("--clip-weights", default="", help="tpt / vte: the in-house CLIP checkpoint (both sides)")
    ap.add_argument("--ttab", default="", help="note: the folder holding LINs-lab/ttab's ttab package")
    ap.add_argument("--t3a", default="", help="t3a / shot: matsuolab/T3A's domainbed/adapt_algorithms.py")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ctta_side_by_side"))
    ap.add_argument("--json", default="", help="also write every row and the summary here")
    # the child's own options
    ap.add_argument("--child", choices=("ours", "ref"), help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--domains", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        return child_main(args)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if "ref" in sides and not args.reference:
        parser().error("--reference is needed for the reference's side (or --sides ours)")
    if "before" in sides and not args.before:
        parser().error("side 'before' needs --before PATH")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if any(p != "fp32" for p in precisions) and not args.device.startswith("cuda"):
        parser().error("bf16 autocast is measured on CUDA only")
    import torch

    domains = prepare_stream(args)
    print(f"stream: {len(domains)} domains x {args.num_samples} images, severity {args.severity}, batch "
          f"{args.batch_size}, seed {args.seed}; device {args.device}; torch {torch.__version__}; threads "
          f"{args.threads or os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    rows = []
    for precision in precisions:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            for rep in range(args.repeats):
                for side in sides[rep % len(sides):] + sides[:rep % len(sides)]:  # each side in turn first
                    r = spawn(args, side, method, precision, domains, f"{method}-{precision}-{side}-{rep}")
                    rows.append(r)
                    print(f"  {method:6s} {precision} {side:4s} #{rep}: whole {r['wall_seconds']:.1f} s (CPU "
                          f"{r['cpu_seconds']:.1f} s), loop {r['images'] / r['loop_seconds']:.0f} img/s ("
                          f"{r['images'] / r['loop_cpu_seconds']:.0f} img/CPU-s), RSS "
                          f"{r['rss_peak_mb']:.0f} MB, error {100 * sum(r['errors'].values()) / r['images']:.2f} %"
                          + (f", step 0 {r['warmup_seconds']:.1f} s (CPU {r['warmup_cpu_seconds']:.1f} s)"
                             if "warmup_seconds" in r else ""), flush=True)
    summary = summarise(rows)
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
