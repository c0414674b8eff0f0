"""The one loop: every stream is segments of adapt / train / eval steps, every strategy answers the same three calls.

Per segment: materialise it on the device, run its steps (no host sync inside), then move the segment's
predictions to the host once, append its rows to the run folder and checkpoint, so an interrupted run keeps
every finished segment and ``resume=True`` continues after the last one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import pandas as pd
import torch
from tqdm.auto import tqdm

from ctta.errors import ConfigError, UnsupportedError
from ctta.evaluation import (CostMeter, Recorder, SegmentAccumulator, definitions_for, error_table, plot_accuracy,
                             run_metrics)
from ctta.streams.base import Stream
from ctta.strategies.base import Strategy

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` picks CUDA when available; anything torch cannot use is a one-line error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or auto")
    return dev


def check_compatible(stream: Stream, strategy: Strategy) -> None:
    """Refuse, before any work, a stream whose step kinds or setting the strategy does not support."""
    missing = sorted(stream.step_kinds - strategy.step_kinds)
    if missing:
        raise UnsupportedError(
            f"strategy {strategy.name!r} cannot run stream {stream.name!r}: the stream has {'/'.join(missing)} "
            f"steps, the strategy supports only {'/'.join(sorted(strategy.step_kinds))}")
    if stream.setting not in strategy.settings:
        raise UnsupportedError(
            f"strategy {strategy.name!r} is not meant for the {stream.setting!r} setting of stream {stream.name!r}; "
            f"it supports: {', '.join(sorted(strategy.settings))}")


@dataclass
class RunResult:
    """What a run produced: the per-step and per-segment tables, the summary and the run folder (if any)."""

    summary: Dict[str, Any]
    steps: pd.DataFrame
    segments: pd.DataFrame
    out: Optional[Path] = None
    groups: pd.DataFrame = field(default_factory=pd.DataFrame)
    files: Dict[str, Path] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One-row paper-style table: per-domain error (%), mean, forgetting and images/s."""
        return error_table({self.summary["strategy"]: self.summary})

    def plot(self, path: Optional[str | Path] = None) -> Path:
        """Accuracy over time with domain boundaries, written to ``path`` (default: the run folder)."""
        target = Path(path) if path else (self.out or Path(".")) / "accuracy_over_time.png"
        return plot_accuracy(self.steps, target, title=f"{self.summary['strategy']} on {self.summary['stream']}")


def _save_checkpoint(out: Path, payload: Dict[str, Any]) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out / CHECKPOINT)


def run(stream: Stream, strategy: Strategy, device: str | torch.device | None = "auto",
        out: Optional[str | Path] = None, resume: bool = False, progress: bool = True,
        config: Optional[Mapping[str, Any]] = None) -> RunResult:
    """Run ``strategy`` over ``stream`` on ``device``; write the run folder ``out`` as it goes when given."""
    check_compatible(stream, strategy)
    dev = resolve_device(device)
    strategy.to(dev)
    out_path = Path(out) if out is not None else None
    recorder = Recorder(out_path, num_classes=stream.num_classes)
    first = 0
    if resume:
        if out_path is None or not (out_path / CHECKPOINT).is_file():
            raise ConfigError(f"nothing to resume: no {CHECKPOINT} in {str(out_path)!r}")
        ckpt = torch.load(out_path / CHECKPOINT, map_location=dev, weights_only=False)
        if ckpt.get("stream_spec") != stream.spec or ckpt.get("strategy") != strategy.name:
            raise ConfigError(f"cannot resume {str(out_path)!r}: it holds a run of {ckpt.get('strategy')!r} on "
                              f"another stream spec; use a new --out folder")
        strategy.load_checkpoint_state(ckpt["strategy_state"])
        first = int(ckpt["next_segment"])
        recorder.restore(first)
        log.info("resuming %s after segment %d of %d", out_path, first, len(stream))
    elif out_path is not None:
        for name in ("steps.csv", "segments.csv", "groups.csv", "segment_details.jsonl", "summary.json", "report.html",
                     "accuracy_matrix.png", "domain_errors.png", CHECKPOINT):
            if (out_path / name).exists():
                (out_path / name).unlink()
    if config is not None and out_path is not None:
        from ctta.config import dump_yaml

        dump_yaml(config, out_path / "config.yaml")

    meter = CostMeter(dev)
    calls = {"adapt": lambda x, y: strategy.adapt(x), "train": strategy.learn,
             "eval": lambda x, y: strategy.predict(x)}
    seen_domain = any(s.role == "domain" for s in stream.segments[:first])
    try:
        for index, seg in enumerate(stream.segments):
            if index < first:
                continue
            if stream.reset_each_domain and seg.role == "domain":
                if seen_domain:
                    strategy.reset()
                seen_domain = True
            x_all, y_all, g_all = seg.materialise(dev)
            bar = tqdm(total=seg.num_batches, desc=f"[{index + 1}/{len(stream)}] {seg.name}", unit="batch",
                       disable=not progress, dynamic_ncols=True, leave=False)
            acc = SegmentAccumulator()
            call = calls[seg.kind]
            strategy.segment_start(seg)
            meter.start()
            for i in range(0, x_all.shape[0], seg.batch_size):
                x, y = x_all[i:i + seg.batch_size], y_all[i:i + seg.batch_size]
                acc.update(call(x, y), y, None if g_all is None else g_all[i:i + seg.batch_size])
                bar.update(1)
            bar.close()
            strategy.segment_end(seg)  # inside the timing: end-of-session work (a retrain, an LDA solve) is cost too
            seconds = meter.stop(seg.kind, seg.num_samples, seg.num_batches)
            rec = acc.finish()
            recorder.add_segment(index, seg.name, seg.kind, seg.role, rec, seconds, meta=seg.meta, groups=seg.groups)
            log.info("%-24s %-5s accuracy %.2f%%  (%.1f img/s)", seg.name, seg.kind, 100 * rec.accuracy,
                     rec.n / max(seconds, 1e-12))
            if out_path is not None:
                _save_checkpoint(out_path, {"next_segment": index + 1, "strategy": strategy.name,
                                            "stream_spec": stream.spec,
                                            "strategy_state": strategy.checkpoint_state()})
    except KeyboardInterrupt:
        if out_path is not None:
            log.warning("interrupted: finished segments are in %s; continue with resume (--resume)", out_path)
        raise

    segments = recorder.segments()
    summary: Dict[str, Any] = {"stream": stream.name, "strategy": strategy.name, "device": str(dev),
                               "stream_spec": stream.spec}
    groups = recorder.groups()
    summary.update(run_metrics(segments, groups, recorder.details))
    # cost of this process' part of the run (a resumed run times only the segments it ran)
    summary.update(meter.summary(strategy.trainable_parameters()))
    summary["memory_kind"] = meter.memory_kind()
    summary["definitions"] = definitions_for(summary)
    result = RunResult(summary=summary, steps=recorder.steps(), segments=segments, out=out_path, groups=groups)
    if out_path is not None:
        recorder.write_summary(summary)
        result.files = write_run_report(result, config is not None)
    return result


def write_run_report(result: RunResult, has_config: bool = False) -> Dict[str, Path]:
    """domains.csv, the plots (accuracy over time, accuracy matrix, per-domain error) and report.html."""
    from ctta.evaluation import domain_error_figure, matrix_figure, save_figure
    from ctta.evaluation.html import run_report

    out = result.out
    assert out is not None
    s = result.summary
    table = result.table()
    table.to_csv(out / "domains.csv", index_label="strategy")
    files = {"steps": out / "steps.csv", "segments": out / "segments.csv", "domains": out / "domains.csv",
             "summary": out / "summary.json", "details": out / "segment_details.jsonl", "plot": result.plot()}
    if len(result.groups):
        files["groups"] = out / "groups.csv"
    images = {"Online accuracy over time": files["plot"]}
    if s.get("accuracy_matrix"):
        m = s["accuracy_matrix"]
        fig = matrix_figure(m["values"], m["rows"], m["columns"], title=f"accuracy matrix R[i, j] (%): "
                            f"{s['strategy']} on {s['stream']}")
        files["matrix_plot"] = images["Accuracy matrix"] = save_figure(fig, out / "accuracy_matrix.png")
    if s.get("domain_error"):
        errs = pd.DataFrame([{d: 100 * e for d, e in s["domain_error"].items()}], index=[s["strategy"]])
        fig = domain_error_figure(errs, title=f"online error per domain (%): {s['strategy']} on {s['stream']}")
        files["bars"] = images["Error per domain"] = save_figure(fig, out / "domain_errors.png")
    if has_config:
        files["config"] = out / "config.yaml"
    cfg_text = (out / "config.yaml").read_text() if (out / "config.yaml").is_file() else None
    files["html"] = run_report(out, s, table, images, cfg_text)
    return files
