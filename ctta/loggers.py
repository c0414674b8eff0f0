"""Optional experiment trackers (TensorBoard, Weights & Biases, MLflow): thin adapters over the run folder's rows.

The run folder stays the one source of truth; a logger receives, after each finished segment, the rows the
recorder has just written (per step and per segment) and, at the end, the summary, and mirrors them where
researchers already look. Each library is imported only when its logger is asked for (install the extra:
``pip install 'ctta-bench[loggers]'``); W&B runs offline (``mode="offline"``) so no network is needed, MLflow writes
a local SQLite store. Enabled by ``--logger tensorboard,wandb`` or ``run.loggers``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import pandas as pd

from .config import flatten
from .errors import ConfigError, CttaError

LOGGERS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _scalars(summary: Mapping[str, Any]) -> Dict[str, float]:
    """The summary's numbers (nested ones flattened), for a tracker's run summary."""
    return {k: float(v) for k, v in flatten(summary).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def check_loggers(names: Union[None, str, Sequence[str]]) -> List[str]:
    """``run.loggers`` as a list of known names (a comma-separated text works); one-line error otherwise."""
    if names in (None, "", [], ()):
        return []
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
    bad = [n for n in items if n not in LOGGERS]
    if bad:
        raise ConfigError(f"unknown logger {bad[0]!r}; choose from {', '.join(LOGGERS)}")
    return items


class RunLogger:
    """Receives each finished segment's rows and the final summary; the default does nothing."""

    def segment(self, steps: pd.DataFrame, row: Mapping[str, Any]) -> None:
        """``steps``: the segment's per-step rows (steps.csv); ``row``: its segments.csv row."""

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run's summary.json, once, at the end."""


class TensorBoardLogger(RunLogger):
    """Scalars per step (online accuracy) and per segment, and the summary as text, in ``<out>/tensorboard``."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", f"```\n{json.dumps(dict(config), indent=2, default=str)}\n```")

    def segment(self, steps: pd.DataFrame, row: Mapping[str, Any]) -> None:
        for r in steps.itertuples():
            self.writer.add_scalar("online/accuracy", float(r.accuracy), int(r.step))
            self.writer.add_scalar("online/cumulative_accuracy", float(r.cumulative_accuracy), int(r.step))
        self.writer.add_scalar(f"segment/{row['kind']}/accuracy", float(row["accuracy"]), int(row["segment_index"]))

    def finish(self, summary: Mapping[str, Any]) -> None:
        for k, v in _scalars({k: summary[k] for k in ("mean_error", "online_accuracy", "forgetting_avalanche",
                                                      "backward_transfer", "last_accuracy") if k in summary}).items():
            self.writer.add_scalar(f"summary/{k}", v, 0)
        self.writer.add_text("summary", f"```\n{json.dumps(dict(summary), indent=2, default=str)[:60000]}\n```")
        self.writer.close()


class WandbLogger(RunLogger):
    """A W&B run in offline mode under ``<out>/wandb`` (sync later with ``wandb sync``); steps and summary."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        import wandb

        strategy = (config.get("strategy") or {}).get("name", "run")
        self.run = wandb.init(mode="offline", dir=str(out), config=flatten(dict(config)), name=str(strategy),
                              reinit=True)

    def segment(self, steps: pd.DataFrame, row: Mapping[str, Any]) -> None:
        for r in steps.itertuples():
            self.run.log({"online/accuracy": float(r.accuracy), "segment": str(r.segment)}, step=int(r.step))

    def finish(self, summary: Mapping[str, Any]) -> None:
        self.run.summary.update(_scalars(summary))
        self.run.finish()


class MlflowLogger(RunLogger):
    """An MLflow run in a local SQLite store ``<out>/mlflow.db`` (MLflow 3 retires the plain file store; no server
    needed: ``mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db``): config as parameters, steps, summary."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        out.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{(out / 'mlflow.db').resolve()}")
        mlflow.start_run(run_name=str((config.get("strategy") or {}).get("name", "run")))
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(dict(config)).items()})

    def segment(self, steps: pd.DataFrame, row: Mapping[str, Any]) -> None:
        for r in steps.itertuples():
            self.mlflow.log_metric("online_accuracy", float(r.accuracy), step=int(r.step))

    def finish(self, summary: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics({f"summary.{k}".replace("@", "_"): v for k, v in _scalars(summary).items()})
        self.mlflow.end_run()


_CLASSES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}


def create_loggers(names: Union[None, str, Sequence[str]], out: Optional[Path],
                   config: Mapping[str, Any]) -> List[RunLogger]:
    """The loggers named (see :data:`LOGGERS`) for a run writing ``out``; a missing library is a one-line error."""
    items = check_loggers(names)
    if items and out is None:
        raise ConfigError("loggers mirror the run folder: give one (out=... / --out)")
    made: List[RunLogger] = []
    for name in items:
        try:
            made.append(_CLASSES[name](Path(out), config))
        except ImportError:
            raise CttaError(f"logger {name!r} needs the {_PACKAGES[name]} package: pip install {_PACKAGES[name]} "
                            f"(or pip install 'ctta-bench[loggers]')") from None
    return made
