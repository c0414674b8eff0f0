"""From a resolved config to finished runs: build stream, backbone and strategy, run, and compare strategies."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from ctta.errors import ConfigError, DivergedError

log = logging.getLogger(__name__)


def strategy_names(cfg: Mapping[str, Any]) -> List[str]:
    """``strategy.name`` may list several strategies, comma-separated, to compare on one stream."""
    raw = cfg.get("strategy", {}).get("name")
    if not raw:
        raise ConfigError("no strategy given: use --strategy NAME (see `ctta-bench list`)")
    names = [n.strip() for n in (raw.split(",") if isinstance(raw, str) else raw) if n.strip()]
    return names


def seed_list(cfg: Mapping[str, Any]) -> List[int]:
    """``run.seed`` may be one seed or several (a list, or comma-separated text such as ``1,2,3``)."""
    raw = cfg.get("run", {}).get("seed", 1)
    if raw is None:
        raw = 1
    items = raw.split(",") if isinstance(raw, str) else (raw if isinstance(raw, (list, tuple)) else [raw])
    try:
        seeds = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ConfigError(f"seed must be an integer or comma-separated integers (e.g. 1,2,3), got {raw!r}") from None
    if not seeds:
        raise ConfigError(f"no seed given in {raw!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seed list {raw!r} repeats a seed")
    return seeds


def build_stream(cfg: Mapping[str, Any], device: Any = "cpu"):
    """The configured stream; CCC without an ``accuracy_matrix`` is calibrated with the run's backbone on ``device``."""
    from ctta import streams

    spec = dict(cfg.get("stream", {}))
    name = spec.pop("name", None)
    if not name:
        raise ConfigError("no stream given: use --stream NAME (see `ctta-bench list`)")
    if name == "ccc" and not spec.get("accuracy_matrix") and (cfg.get("backbone") or {}).get("name"):
        spec["model"] = build_model(cfg, 1000).to(device)
        spec["device"] = str(device)
    return streams.create(name, **spec)


def build_model(cfg: Mapping[str, Any], num_classes: int, output_classes: Optional[Sequence[int]] = None):
    """The configured backbone for ``num_classes`` classes; with ``output_classes`` (a stream over a subset of
    ImageNet's classes) built 1000-way, as pretrained, and cut to those outputs."""
    from ctta import backbones
    from ctta.backbones.classifier import restrict_outputs

    spec = dict(cfg.get("backbone", {}))
    name = spec.pop("name", None)
    if not name:
        raise ConfigError("no backbone given: use --backbone NAME (see `ctta-bench list`)")
    if output_classes is None:
        spec.setdefault("num_classes", num_classes)
        return backbones.create(name, **spec)
    spec.setdefault("num_classes", 1000)
    return restrict_outputs(backbones.create(name, **spec), output_classes)


def _hparams_for(name: str, hp_all: Mapping[str, Any], several: bool) -> Dict[str, Any]:
    """The hyperparameters given for ``name``: all of them for one strategy; with several strategies compared, a
    hyperparameter applies to those whose defaults have it (a PLUGIN+HOST composite: one of its parts, so e.g.
    ``strategy.source_data`` reaches both ``psmt`` and ``lsa+tent``)."""
    from ctta.strategies import strategy_defaults

    if not several:
        return dict(hp_all)
    defaults = strategy_defaults(name)
    keys = set(defaults)
    if "+" in name:
        keys |= {k for part in defaults.values() if isinstance(part, Mapping) for k in part}
    return {k: v for k, v in hp_all.items() if k in keys}


def run_experiment(cfg: Dict[str, Any], progress: Optional[bool] = None) -> Dict[str, Any]:
    """Run every strategy named in ``cfg`` for every seed of ``run.seed`` on its stream; returns {label: RunResult}.

    One seed: each strategy in ``<out>/<strategy>`` (``<out>`` itself for a single strategy), labels are the
    strategy names. Several seeds: ``<out>/<strategy>/seed-<s>``, labels ``<strategy>/seed-<s>``, and the
    comparison shows mean +- std over seeds. Several runs also save the resolved config at ``<out>/config.yaml``
    (so ``ctta-bench --resume --out <out>`` continues them). ``<out>`` is held by this process until the last run
    ends; folders holding earlier runs are refused before any work unless ``run.resume`` or ``run.force``.
    """
    from ctta import runfolder

    run_cfg = dict(cfg.get("run") or {})
    if not run_cfg.get("out"):
        name = (cfg.get("stream") or {}).get("name") or "run"
        run_cfg["out"] = str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg = {**cfg, "run": run_cfg}
    with runfolder.lock(run_cfg["out"]):
        return _run_experiment(cfg, progress)


def _run_folder(out_root: Path, name: str, seed: int, names: List[str], seeds: List[int]) -> Path:
    """Where run (``name``, ``seed``) writes: ``<out>``, ``<out>/<strategy>`` or ``<out>/<strategy>/seed-<s>``."""
    if len(seeds) > 1:
        return out_root / name / f"seed-{seed}"
    return out_root / name if len(names) > 1 else out_root


def _run_experiment(cfg: Dict[str, Any], progress: Optional[bool] = None) -> Dict[str, Any]:
    from ctta import backbones, runfolder, strategies
    from ctta.engine import check_chunk_size, check_health_options, resolve_device, run
    from ctta.loggers import check_loggers
    from ctta.realtime import check_realtime
    from ctta.evaluation.health import COLLAPSE_THRESHOLD

    names = strategy_names(cfg)
    for n in names:
        strategies.check_name(n)  # fail on an unknown or refused name before any work
    seeds = seed_list(cfg)
    run_cfg = cfg.get("run", {})
    device = resolve_device(run_cfg.get("device", "auto"))
    health = {"collapse_threshold": run_cfg.get("collapse_threshold", COLLAPSE_THRESHOLD),
              "on_diverge": run_cfg.get("on_diverge", "stop")}
    check_health_options(**health)
    chunk_size = run_cfg.get("chunk_size")
    check_chunk_size(chunk_size)
    protocol = run_cfg.get("protocol", "offline")
    check_realtime(protocol, run_cfg.get("relative_cost"), run_cfg.get("stream_rate"))
    variants = ["offline", "realtime"] if protocol == "both" else [protocol]
    realtime = {"relative_cost": run_cfg.get("relative_cost"), "rate": run_cfg.get("stream_rate")}
    check_loggers(run_cfg.get("loggers"))
    out_root = Path(run_cfg.get("out") or Path("runs") / f"{cfg['stream']['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    show = run_cfg.get("progress", True) if progress is None else progress
    results: Dict[str, Any] = {}
    diverged: Dict[str, str] = {}
    hp_all = {k: v for k, v in cfg.get("strategy", {}).items() if k != "name"}
    # cheap checks first: every hyperparameter (type, range) and the backbone, before a stream is read
    checked = {n: strategies.check_hparams(n, _hparams_for(n, hp_all, len(names) > 1)) for n in names}
    backbones.check(**cfg.get("backbone", {}))
    runs = [(n, v, f"{n}@realtime" if protocol == "both" and v == "realtime" else n) for n in names for v in variants]
    labels = [lab for _, _, lab in runs]
    many = len(labels) > 1 or len(seeds) > 1
    check_folders(cfg, out_root, [_run_folder(out_root, lab, s, labels, seeds) for s in seeds for lab in labels],
                  many)
    for seed in seeds:
        seed_cfg = {**cfg, "run": {**run_cfg, "seed": seed}}
        if len(seeds) > 1 and "seed" in cfg.get("stream", {}):
            seed_cfg["stream"] = {**cfg["stream"], "seed": seed}
        stream = build_stream(seed_cfg, device)
        for name, variant, base in runs:
            torch.manual_seed(seed)
            model = build_model(cfg, stream.num_classes, stream.output_classes)
            defaults = strategies.strategy_defaults(name)
            hp = dict(checked[name])
            if len(seeds) > 1 or "seed" not in _hparams_for(name, hp_all, len(names) > 1):
                hp["seed"] = seed
            strategy = strategies.create(name, model, **hp)
            out = _run_folder(out_root, base, seed, labels, seeds)
            label = f"{base}/seed-{seed}" if len(seeds) > 1 else base
            one_cfg = {**seed_cfg, "strategy": {"name": name, **defaults, **hp}}
            if protocol == "both":
                one_cfg["run"] = {**seed_cfg["run"], "protocol": variant}
            log.info("running %s (seed %d) on %s (%s) -> %s", name, seed, stream.name, device, out)
            # with several runs, those not started yet when the run was interrupted start fresh
            resume = bool(run_cfg.get("resume")) and (not many or runfolder.folder_state(out) != "empty")
            try:
                results[label] = run(stream, strategy, device=device, out=out, resume=resume, progress=show,
                                     config=one_cfg, force=bool(run_cfg.get("force")), chunk_size=chunk_size,
                                     realtime=realtime if variant == "realtime" else None,
                                     loggers=run_cfg.get("loggers"), **health)
            except DivergedError as e:
                if not many or e.result is None:
                    raise
                # the other runs of a comparison go on; this one is in the table, marked diverged
                log.error("%s: %s", label, e)
                results[label], diverged[label] = e.result, str(e)
    if many:
        write_comparison(results, out_root)
    if diverged:
        raise DivergedError(f"{len(diverged)} of {len(results)} runs stopped on non-finite outputs "
                            f"({', '.join(diverged)}); the others finished and the comparison in {out_root} marks "
                            f"them (run.on_diverge=mark runs them to the end)")
    return results


def check_folders(cfg: Mapping[str, Any], out_root: Path, outs: List[Path], many: bool) -> None:
    """Before any work: refuse run folders holding earlier runs (unless resume / force); with several runs, check
    a resumed root's saved config.yaml against ``cfg`` and save ``cfg`` there."""
    from ctta import runfolder

    resume, force = bool(cfg["run"].get("resume")), bool(cfg["run"].get("force"))
    if not many:
        runfolder.check_start(out_root, resume, force)  # the config itself is checked by the engine
        return
    runfolder.check_experiment_root(out_root, outs, resume, force)
    if resume:
        runfolder.check_resume_config(out_root, cfg)
    if not (resume and (out_root / runfolder.CONFIG).is_file()):
        runfolder.write_config(out_root, cfg)


def write_comparison(results: Mapping[str, Any], out_root: Path, force: bool = False) -> Dict[str, Path]:
    """The paper-style table of several runs on one stream (runs differing only in seed grouped, mean +- std) as
    CSV, Markdown and HTML, and their overlaid curves."""
    from ctta.evaluation import RunData, write_comparison_report

    runs = [RunData(r.summary, r.steps, _strategy_cfg(r), r.out) for r in results.values()]
    return write_comparison_report(runs, out_root, force=force)


def _strategy_cfg(result: Any) -> Dict[str, Any]:
    if result.out is not None and (Path(result.out) / "config.yaml").is_file():
        from ctta.config import yaml_load

        return dict((yaml_load((Path(result.out) / "config.yaml").read_text()) or {}).get("strategy") or {})
    return {"name": result.summary.get("strategy")}
