"""From a resolved config to finished runs: build stream, backbone and strategy, run, and compare strategies."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from ctta.errors import ConfigError

log = logging.getLogger(__name__)


def strategy_names(cfg: Mapping[str, Any]) -> List[str]:
    """``strategy.name`` may list several strategies, comma-separated, to compare on one stream."""
    raw = cfg.get("strategy", {}).get("name")
    if not raw:
        raise ConfigError("no strategy given: use --strategy NAME (see `ctta-bench list`)")
    names = [n.strip() for n in (raw.split(",") if isinstance(raw, str) else raw) if n.strip()]
    return names


def build_stream(cfg: Mapping[str, Any]):
    from ctta import streams

    spec = dict(cfg.get("stream", {}))
    name = spec.pop("name", None)
    if not name:
        raise ConfigError("no stream given: use --stream NAME (see `ctta-bench list`)")
    return streams.create(name, **spec)


def build_model(cfg: Mapping[str, Any], num_classes: int):
    from ctta import backbones

    spec = dict(cfg.get("backbone", {}))
    name = spec.pop("name", None)
    if not name:
        raise ConfigError("no backbone given: use --backbone NAME (see `ctta-bench list`)")
    spec.setdefault("num_classes", num_classes)
    return backbones.create(name, **spec)


def run_experiment(cfg: Dict[str, Any], progress: Optional[bool] = None) -> Dict[str, Any]:
    """Run every strategy named in ``cfg`` on its stream; returns {strategy: RunResult}, each in its own folder."""
    from ctta import strategies
    from ctta.engine import CHECKPOINT, resolve_device, run

    names = strategy_names(cfg)
    for n in names:
        strategies.STRATEGIES.get(n)  # fail on an unknown name before any work
    run_cfg = cfg.get("run", {})
    device = resolve_device(run_cfg.get("device", "auto"))
    seed = int(run_cfg.get("seed", 1))
    out_root = Path(run_cfg.get("out") or Path("runs") / f"{cfg['stream']['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    show = run_cfg.get("progress", True) if progress is None else progress
    stream = build_stream(cfg)
    results = {}
    hp_all = {k: v for k, v in cfg.get("strategy", {}).items() if k != "name"}
    for name in names:
        torch.manual_seed(seed)
        model = build_model(cfg, stream.num_classes)
        # with several strategies, a hyperparameter applies to those that have it
        defaults = strategies.strategy_defaults(name)
        hp = dict(hp_all) if len(names) == 1 else {k: v for k, v in hp_all.items() if k in defaults}
        hp.setdefault("seed", seed)
        strategy = strategies.create(name, model, **hp)
        out = out_root / name if len(names) > 1 else out_root
        one_cfg = {**cfg, "strategy": {"name": name, **defaults, **hp}}
        log.info("running %s on %s (%s) -> %s", name, stream.name, device, out)
        # with several strategies, those not started yet when the run was interrupted start fresh
        resume = bool(run_cfg.get("resume")) and (len(names) == 1 or (out / CHECKPOINT).is_file())
        results[name] = run(stream, strategy, device=device, out=out, resume=resume, progress=show, config=one_cfg)
    if len(names) > 1:
        write_comparison(results, out_root)
    return results


def write_comparison(results: Mapping[str, Any], out_root: Path) -> Path:
    """The paper-style table of several strategies on one stream (CSV + Markdown) and their overlaid curves."""
    from ctta.evaluation import error_table, plot_accuracy

    table = error_table({k: r.summary for k, r in results.items()})
    out_root.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_root / "comparison.csv", index_label="strategy")
    (out_root / "comparison.md").write_text(table.to_markdown(floatfmt=".1f") if _has_tabulate()
                                            else table.to_string(float_format=lambda v: f"{v:.1f}"))
    first = next(iter(results.values()))
    plot_accuracy(first.steps, out_root / "accuracy_over_time.png", title=f"online accuracy on {first.summary['stream']}",
                  others={k: r.steps for k, r in results.items()})
    return out_root


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
