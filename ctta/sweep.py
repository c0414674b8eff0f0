"""Sweeps: a grid of streams x backbones x strategies x seeds, each cell one ordinary run, executed as Ray tasks.

The grid (a YAML file or a dict) expands into plain-dict configs, one per run; each run goes through the same
single-run code path as ``ctta-bench --stream ... --strategy ...`` (:func:`ctta.experiment.run_experiment` with
one strategy and one seed) and writes its own run folder ``<out>/<stream>/<backbone>/<strategy>/seed-<s>``.
A run whose ``summary.json`` exists and whose saved ``config.yaml`` matches the resolved config is skipped, one
with a checkpoint but no summary resumes, a failed run is reported and the others go on. When the grid is done,
one comparison report (mean +- std over seeds, cost columns) is written per stream and backbone.

Ray is optional (``pip install 'ctta-bench[ray]'``): without it the runs execute one after another in this
process. See docs/sweeps.md.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import yaml

from importlib import resources

from ctta.config import (SECTIONS, _parse, _plain, deep_update, load_yaml, parse_override, reject_unknown, resolve,
                         set_path, yaml_load)
from ctta.errors import ConfigError

log = logging.getLogger(__name__)

GRID_KEYS = ("streams", "strategies", "backbones", "seeds", "overrides", "out", "resources")
DEFAULT_RESOURCES: Dict[str, float] = {"num_gpus": 1, "num_cpus": 1}
# keys of the run section that do not change what a run computes (ignored when matching a finished run)
VOLATILE_RUN_KEYS = ("out", "resume", "force", "progress", "chunk_size", "loggers")
SWEEP_FILE = "sweep.json"


@dataclass
class RunSpec:
    """One cell of the grid: its id (the run folder relative to the sweep's ``out``), folder and resolved config."""

    id: str
    out: Path
    cfg: Dict[str, Any]
    group: str  # ``<stream>/<backbone>``: the runs compared in one report


@dataclass
class RunOutcome:
    """What became of one run: ``done`` (ran now), ``skipped`` (finished before), ``failed`` (with its error)."""

    id: str
    out: str
    status: str
    seconds: float = 0.0
    resumed: bool = False
    error: Optional[str] = None
    mean_error: Optional[float] = None


@dataclass
class SweepResult:
    """Every run's outcome, the comparison reports written (group -> comparison.md) and how the grid ran."""

    out: Path
    runs: List[RunOutcome]
    reports: Dict[str, Path] = field(default_factory=dict)
    backend: str = "local"
    seconds: float = 0.0

    def counts(self) -> Dict[str, int]:
        c = {"done": 0, "skipped": 0, "failed": 0}
        for r in self.runs:
            c[r.status] = c.get(r.status, 0) + 1
        return c

    @property
    def failed(self) -> List[RunOutcome]:
        return [r for r in self.runs if r.status == "failed"]


# ---------------------------------------------------------------- grid -> runs

def _label(text: str) -> str:
    """A folder-safe label: letters, digits and ``._+-=``; anything else becomes ``-``."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", str(text)).strip("-") or "x"


def _entries(grid: Mapping[str, Any], key: str, required: bool = True) -> List[Dict[str, Any]]:
    """A grid axis as a list of mappings with ``name`` (a bare string is a name); unique folder labels added."""
    raw = grid.get(key)
    if raw is None:
        if required:
            raise ConfigError(f"sweep grid has no {key!r}: give a list, e.g. {key}: [...]")
        return []
    if isinstance(raw, (str, Mapping)):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(f"sweep grid {key!r} must be a non-empty list, got {raw!r}")
    out: List[Dict[str, Any]] = []
    for item in raw:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or not item.get("name") or not isinstance(item["name"], str):
            raise ConfigError(f"sweep grid {key!r}: each entry must be a name or a mapping with 'name', got {item!r}")
        out.append(dict(item))
    seen: Dict[str, int] = {}
    for item in out:
        base = _label(item.pop("label", None) or item["name"])
        seen[base] = seen.get(base, 0) + 1
        item["_label"] = base if seen[base] == 1 else f"{base}-{seen[base]}"
    return out


def _overrides(raw: Any) -> tuple[Dict[str, Any], List[str]]:
    """Grid ``overrides``: a mapping by section ({strategy: {lr: 1e-4}}) and/or a list of ``section.key=value``."""
    if raw is None:
        return {}, []
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, (list, tuple)):
        for item in raw:
            if not isinstance(item, str):
                raise ConfigError(f"sweep overrides: list items must be 'section.key=value' text, got {item!r}")
            parse_override(item)  # one-line error now
        return {}, list(raw)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep overrides must be a mapping by section or a list of section.key=value, got {raw!r}")
    reject_unknown(raw, SECTIONS, "sweep overrides have unknown", "section")
    for sec, v in raw.items():
        if not isinstance(v, Mapping):
            raise ConfigError(f"sweep overrides section {sec!r} must be a mapping, got {v!r}")
    return {k: dict(v) for k, v in raw.items()}, []


def load_grid(grid: str | Path | Mapping[str, Any]) -> Dict[str, Any]:
    """The grid as a dict, its top-level keys checked; a path is read as YAML, and a bare name that is not a file
    (``digits_quick``) is the packaged ``configs/sweeps/<name>.yaml``."""
    if isinstance(grid, (str, Path)):
        packaged = resources.files("ctta.configs").joinpath("sweeps", f"{grid}.yaml")
        if not Path(grid).exists() and re.fullmatch(r"[A-Za-z0-9_.-]+", str(grid)) and packaged.is_file():
            data = _parse(packaged.read_text(), f"configs/sweeps/{grid}.yaml")
        else:
            data = load_yaml(grid)
    else:
        data = dict(grid)
    reject_unknown(data, GRID_KEYS, "sweep grid has unknown", "key")
    return data


def resources_of(grid: Mapping[str, Any]) -> Dict[str, float]:
    """Resources of one run (``num_gpus``, may be fractional, and ``num_cpus``); default one GPU and one CPU."""
    raw = grid.get("resources") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep resources must be a mapping like {{num_gpus: 1, num_cpus: 1}}, got {raw!r}")
    reject_unknown(raw, DEFAULT_RESOURCES, "sweep resources have unknown", "key")
    res = {**DEFAULT_RESOURCES, **raw}
    for k, v in res.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"sweep resources.{k} must be a non-negative number, got {v!r}")
    return {k: float(v) for k, v in res.items()}


def expand(grid: str | Path | Mapping[str, Any], out: Optional[str | Path] = None,
           overrides: Iterable[str] = ()) -> List[RunSpec]:
    """Every run of the grid as a resolved, plain-dict config (stream x backbone x strategy x seed, in that order).

    ``overrides`` (``section.key=value``) apply to every run after the grid's own ``overrides``. A strategy
    hyperparameter given in the grid-wide overrides applies to the strategies that have it (as when several
    strategies are compared in one run); one given in a strategy's own entry must fit that strategy.
    """
    from ctta import strategies
    from ctta.experiment import seed_list
    from ctta.streams import STREAMS

    g = load_grid(grid)
    resources_of(g)  # one-line error now, not after the runs are listed
    streams, strats = _entries(g, "streams"), _entries(g, "strategies")
    backbones = _entries(g, "backbones")
    seeds = seed_list({"run": {"seed": g.get("seeds", 1)}})
    by_section, file_items = _overrides(g.get("overrides"))
    for path, value in map(parse_override, file_items):  # the list form joins the mapping form
        set_path(by_section, path, value)
    cli_items = list(overrides)
    cli_hp: Dict[str, Any] = {}
    for path, value in map(parse_override, cli_items):
        if path[0] == "strategy":
            set_path(cli_hp, path[1:], value)
    cli_items = [i for i in cli_items if parse_override(i)[0][0] != "strategy"]
    root = Path(out or g.get("out") or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    for s in streams:
        STREAMS.get(s["name"])  # unknown names fail now, with a suggestion
    for s in strats:
        strategies.check_name(s["name"])
    # grid-wide strategy hyperparameters go to the strategies that take them
    file_hp = dict(by_section.get("strategy", {}))
    known = {s["_label"]: set(strategies.strategy_defaults(s["name"])) | {"seed"} for s in strats}
    for key in list(file_hp) + list(cli_hp):
        if key == "name" or not any(key in k for k in known.values()):
            raise ConfigError(f"sweep override strategy.{key}: none of the strategies "
                              f"{', '.join(s['name'] for s in strats)} has a hyperparameter {key!r}")
    specs: List[RunSpec] = []
    for st, bb, sg, seed in itertools.product(streams, backbones, strats, seeds):
        fits = known[sg["_label"]]
        entry = {k: v for k, v in sg.items() if k != "_label"}
        # grid overrides < the axis entries < command-line --set
        strategy = deep_update(deep_update({k: v for k, v in file_hp.items() if k in fits}, entry),
                               {k: v for k, v in cli_hp.items() if k in fits})
        experiment = {
            "stream": deep_update(by_section.get("stream", {}), {k: v for k, v in st.items() if k != "_label"}),
            "strategy": strategy,
            "backbone": deep_update(by_section.get("backbone", {}), {k: v for k, v in bb.items() if k != "_label"}),
            "run": copy.deepcopy(by_section.get("run", {})),
        }
        cfg = resolve(experiment, overrides=cli_items)
        rid = f"{st['_label']}/{bb['_label']}/{sg['_label']}/seed-{seed}"
        cfg["run"].update(seed=seed, out=str(root / rid), resume=False, progress=False)
        if len(seeds) > 1 and "seed" in cfg["stream"]:
            cfg["stream"]["seed"] = seed  # as `ctta-bench --seed 1,2,3` does
        specs.append(RunSpec(rid, root / rid, _plain(cfg), f"{st['_label']}/{bb['_label']}"))
    return specs


# ---------------------------------------------------------------- one run

def _expected_saved_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The config.yaml a run of ``cfg`` writes, minus the keys that do not change its numbers (YAML round trip)."""
    from ctta import strategies

    exp = {k: copy.deepcopy(v) for k, v in cfg.items() if k in SECTIONS}
    name = exp["strategy"]["name"]
    hp = {k: v for k, v in exp["strategy"].items() if k != "name"}
    hp.setdefault("seed", exp["run"]["seed"])
    exp["strategy"] = {"name": name, **strategies.strategy_defaults(name), **hp}
    return _comparable(exp)


def _comparable(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    c = yaml_load(yaml.safe_dump(_plain(cfg), sort_keys=True)) or {}
    c["run"] = {k: v for k, v in (c.get("run") or {}).items() if k not in VOLATILE_RUN_KEYS}
    return c


def run_state(spec_cfg: Mapping[str, Any]) -> str:
    """``finished`` (summary and a matching config), ``interrupted`` (matching config and a checkpoint) or ``new``."""
    from ctta.engine import CHECKPOINT

    out = Path(spec_cfg["run"]["out"])
    saved = out / "config.yaml"
    if not saved.is_file():
        return "new"
    try:
        matches = _comparable(yaml_load(saved.read_text()) or {}) == _expected_saved_config(spec_cfg)
    except yaml.YAMLError:
        matches = False
    if not matches:
        return "new"
    if (out / "summary.json").is_file():
        return "finished"
    return "interrupted" if (out / CHECKPOINT).is_file() else "new"


def run_one(cfg: Mapping[str, Any], num_threads: Optional[int] = None) -> Dict[str, Any]:
    """Run one cell of a grid (a plain-dict config with one strategy and one seed) unless it already finished.

    The same code path as a single ``ctta-bench`` run; never raises for a failing run: the error comes back in
    the returned dict (``status`` done / skipped / failed, ``seconds``, ``error``, ``mean_error``), so a Ray task
    and the in-process loop report alike.
    """
    import torch

    from ctta.experiment import run_experiment

    out = str(cfg["run"]["out"])
    rid = cfg.get("_id", out)
    t0 = time.perf_counter()
    try:
        state = run_state(cfg)
        if state == "finished":
            return asdict(RunOutcome(rid, out, "skipped", mean_error=_mean_error(Path(out))))
        one = {k: copy.deepcopy(v) for k, v in cfg.items() if k in SECTIONS}
        one["run"]["resume"] = state == "interrupted"
        one["run"]["force"] = state == "new" and _holds_other_run(Path(out), cfg)
        old_threads = torch.get_num_threads()
        if num_threads:
            torch.set_num_threads(num_threads)
        try:
            results = run_experiment(one, progress=False)
        finally:
            torch.set_num_threads(old_threads)
        summary = next(iter(results.values())).summary
        return asdict(RunOutcome(rid, out, "done", time.perf_counter() - t0, resumed=state == "interrupted",
                                 mean_error=summary.get("mean_error")))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a failed run is reported, the sweep goes on
        log.debug("run %s failed:\n%s", rid, traceback.format_exc())
        return asdict(RunOutcome(rid, out, "failed", time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"))


def _holds_other_run(out: Path, cfg: Mapping[str, Any]) -> bool:
    """A cell's folder that holds a run of another config (the grid changed): the grid says what the cell is, so
    that run is overwritten (force), with a warning naming what changed."""
    from ctta import runfolder

    if runfolder.folder_state(out) == "empty":
        return False
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
        changed = runfolder.describe_differences(runfolder.config_differences(
            _comparable(saved), _expected_saved_config(cfg), ignore=[f"run.{k}" for k in VOLATILE_RUN_KEYS]))
    except (OSError, yaml.YAMLError):
        changed = "no readable config.yaml"
    log.warning("sweep: %s holds a run of another config (%s): overwriting it", out, changed or "?")
    return True


def _mean_error(out: Path) -> Optional[float]:
    try:
        return json.loads((out / "summary.json").read_text()).get("mean_error")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- the sweep

class _Progress:
    """Counts of done / running / failed / pending runs, as a tqdm bar and as log lines."""

    def __init__(self, total: int, show: bool) -> None:
        from tqdm.auto import tqdm

        self.total, self.done, self.failed, self.running = total, 0, 0, 0
        self.bar = tqdm(total=total, desc="sweep", unit="run", disable=not show, dynamic_ncols=True)

    def started(self, n: int = 1) -> None:
        self.running += n
        self._show()

    def finished(self, outcome: Mapping[str, Any], running: int) -> None:
        self.running = running
        if outcome["status"] == "failed":
            self.failed += 1
            log.warning("run %s failed: %s", outcome["id"], outcome["error"])
        else:
            self.done += 1
        self.bar.update(1)
        self._show()
        log.info("sweep: %d/%d done, %d running, %d failed, %d pending  (%s %s, %.1f s)", self.done, self.total,
                 self.running, self.failed, self.total - self.done - self.failed - self.running, outcome["id"],
                 outcome["status"], outcome["seconds"])

    def _show(self) -> None:
        self.bar.set_postfix(done=self.done, running=self.running, failed=self.failed, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def sweep(grid: str | Path | Mapping[str, Any], out: Optional[str | Path] = None, overrides: Iterable[str] = (),
          backend: str = "auto", address: Optional[str] = None, resources: Optional[Mapping[str, float]] = None,
          progress: bool = True, report: bool = True) -> SweepResult:
    """Run every cell of ``grid``, skipping finished runs, then write one comparison report per stream/backbone.

    ``backend``: ``ray`` (Ray tasks; ``address`` joins an existing cluster, none starts a local one sized to this
    machine), ``local`` (one run after another in this process) or ``auto`` (Ray when installed). ``resources``
    overrides the grid's per-run ``num_gpus`` / ``num_cpus``.
    """
    if backend not in ("auto", "ray", "local"):
        raise ConfigError(f"sweep backend must be auto, ray or local, got {backend!r}")
    g = load_grid(grid)
    specs = expand(g, out, overrides)
    res = resources_of({"resources": {**(g.get("resources") or {}), **dict(resources or {})}})
    root = Path(specs[0].out).parents[3] if specs else Path(out or ".")
    if address and (backend == "local" or not ray_available()):
        raise ConfigError(f"--address {address!r} needs Ray (pip install 'ctta-bench[ray]') and the ray backend")
    if backend == "auto":
        backend = "ray" if ray_available() else "local"
        if backend == "local":
            log.warning("Ray is not installed (pip install 'ctta-bench[ray]'): running the %d runs of the sweep one "
                        "after another in this process", len(specs))
    elif backend == "ray" and not ray_available():
        raise ConfigError("sweep backend 'ray' asked for, but Ray is not installed: pip install 'ctta-bench[ray]'")
    states = {s.id: run_state(s.cfg) for s in specs}
    n_fin = sum(v == "finished" for v in states.values())
    n_int = sum(v == "interrupted" for v in states.values())
    log.info("sweep of %d runs into %s (%s backend): %d finished before (skipped), %d to resume, %d to run",
             len(specs), root, backend, n_fin, n_int, len(specs) - n_fin - n_int)
    t0 = time.perf_counter()
    cfgs = [{**s.cfg, "_id": s.id} for s in specs]
    outcomes = (_run_ray(cfgs, res, address, progress) if backend == "ray"
                else _run_local(cfgs, res, progress))
    result = SweepResult(root, [RunOutcome(**o) for o in outcomes], backend=backend,
                         seconds=time.perf_counter() - t0)
    if report:
        result.reports = write_reports(specs, result.runs)
    _write_index(result, specs)
    c = result.counts()
    log.info("sweep finished in %.1f s: %d ran, %d skipped, %d failed", result.seconds, c["done"], c["skipped"],
             c["failed"])
    return result


def _run_local(cfgs: Sequence[Dict[str, Any]], res: Mapping[str, float], show: bool) -> List[Dict[str, Any]]:
    bar = _Progress(len(cfgs), show)
    outcomes = []
    try:
        for cfg in cfgs:
            bar.started()
            outcomes.append(run_one(cfg))
            bar.finished(outcomes[-1], running=0)
    finally:
        bar.close()
    return outcomes


def _ray_task(cfg: Dict[str, Any], num_threads: int) -> Dict[str, Any]:
    """The body of one Ray task: a plain dict in, a plain dict out."""
    logging.basicConfig(level=logging.WARNING)
    return run_one(cfg, num_threads=num_threads)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line error for a ``host:port`` nobody listens on (Ray itself retries such an address for minutes)."""
    import socket

    m = re.fullmatch(r"(?:ray://)?([^:/]+):(\d+)", address.strip())
    if not m:  # "auto", "local" and other forms are Ray's to interpret
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"cannot reach a Ray cluster at {address!r}: {e.strerror or e}; start one with "
                          f"`ray start --head` there, or leave out --address for a local cluster") from None


def _run_ray(cfgs: Sequence[Dict[str, Any]], res: Mapping[str, float], address: Optional[str],
             show: bool) -> List[Dict[str, Any]]:
    import ray

    started_here = not ray.is_initialized()
    if started_here and address:
        _check_reachable(address)
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot start or join a Ray cluster at {address or 'a new local cluster'!r}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        cluster = ray.cluster_resources()
        num_gpus, num_cpus = res["num_gpus"], res["num_cpus"]
        if num_gpus > 0 and cluster.get("GPU", 0) == 0:
            log.warning("the Ray cluster has no GPU: each run gets %g CPU(s) and no GPU instead of %g GPU(s)",
                        num_cpus, num_gpus)
            num_gpus = 0.0
        if num_cpus > cluster.get("CPU", 0) or num_gpus > cluster.get("GPU", 0):
            raise ConfigError(f"a run asks for {num_cpus:g} CPU(s) and {num_gpus:g} GPU(s), more than the Ray "
                              f"cluster has ({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs)")
        slots = min(cluster.get("CPU", 0) // num_cpus if num_cpus else float("inf"),
                    cluster.get("GPU", 0) // num_gpus if num_gpus else float("inf"))
        log.info("Ray cluster: %g CPUs, %g GPUs; %g CPU + %g GPU per run, so up to %s runs at a time",
                 cluster.get("CPU", 0), cluster.get("GPU", 0), num_cpus, num_gpus,
                 "all" if slots == float("inf") else int(slots))
        task = ray.remote(_ray_task).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
        threads = max(1, int(num_cpus))
        pending = {task.remote(cfg, threads): cfg for cfg in cfgs}
        by_id: Dict[str, Dict[str, Any]] = {}
        bar = _Progress(len(cfgs), show)
        bar.started(int(min(len(cfgs), slots)))
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    cfg = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a crashed worker fails its run only
                        outcome = asdict(RunOutcome(cfg["_id"], cfg["run"]["out"], "failed",
                                                    error=f"{type(e).__name__}: {str(e).splitlines()[0]}"))
                    by_id[cfg["_id"]] = outcome
                    bar.finished(outcome, running=int(min(slots, len(pending))))
        finally:
            bar.close()
            for ref in pending:
                ray.cancel(ref, force=True)
        return [by_id[cfg["_id"]] for cfg in cfgs]
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------- reports

def write_reports(specs: Sequence[RunSpec], outcomes: Sequence[RunOutcome]) -> Dict[str, Path]:
    """One comparison report (comparison.csv/.md/.html, curves) per stream/backbone over its finished runs."""
    from ctta.evaluation import load_run, write_comparison_report

    ok = {o.id for o in outcomes if o.status != "failed"}
    groups: Dict[str, List[RunSpec]] = {}
    for s in specs:
        if s.id in ok:
            groups.setdefault(s.group, []).append(s)
    reports: Dict[str, Path] = {}
    for group, members in groups.items():
        folder = members[0].out.parents[1]
        try:
            runs = [load_run(s.out) for s in members]
            files = write_comparison_report(runs, folder, title=f"Sweep: {group}")
            reports[group] = files["markdown"]
        except (ConfigError, OSError, ValueError, KeyError) as e:
            log.warning("no comparison report for %s: %s", group, e)
    return reports


def _write_index(result: SweepResult, specs: Sequence[RunSpec]) -> None:
    """``<out>/sweep.json``: every run's status, time and error, and where the reports are."""
    result.out.mkdir(parents=True, exist_ok=True)
    data = {"backend": result.backend, "seconds": result.seconds, "counts": result.counts(),
            "reports": {k: str(v) for k, v in result.reports.items()},
            "runs": [asdict(r) for r in result.runs]}
    (result.out / SWEEP_FILE).write_text(json.dumps(data, indent=2))


def format_result(result: SweepResult) -> str:
    """A few lines for the terminal: counts, failures with their errors, the report tables."""
    c = result.counts()
    lines = [f"Sweep of {len(result.runs)} runs ({result.backend}, {result.seconds:.1f} s): {c['done']} ran, "
             f"{c['skipped']} skipped (finished before), {c['failed']} failed"]
    for r in result.failed:
        lines.append(f"  FAILED {r.id}: {r.error}")
    for group, md in result.reports.items():
        lines.append(f"\n{group}: {md.read_text().strip()}\n(report: {md.parent}/comparison.html)")
    lines.append(f"\nRun folders and {SWEEP_FILE} in {result.out}/")
    return "\n".join(lines)


__all__ = ["RunSpec", "RunOutcome", "SweepResult", "load_grid", "expand", "run_state", "run_one", "sweep",
           "write_reports", "format_result", "ray_available"]
