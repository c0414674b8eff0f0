"""The one loop: every stream is segments of adapt / train / eval steps, every strategy answers the same three calls.

Per segment: load it on the device (whole, or chunk by chunk with the next chunk fetched ahead), run its steps
(no host sync inside but one finite-input check per chunk), then move the segment's predictions to the host once, append its rows to the run folder and checkpoint, so an interrupted run keeps
every finished segment and ``resume=True`` continues after the last one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ctta import runfolder
from ctta.provenance import fingerprint
from ctta.loggers import check_loggers, create_loggers
from ctta.realtime import RealtimeClock, check_realtime
from ctta.errors import ConfigError, DivergedError, NonFiniteInputError, UnsupportedError
from ctta.evaluation import (CostMeter, Recorder, RunEstimate, SegmentAccumulator, definitions_for, error_table,
                             display_table, plot_accuracy, run_metrics)
from ctta.evaluation.health import COLLAPSE_THRESHOLD, ON_DIVERGE
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
        """One-row paper-style table for display: per-domain error (%), mean, forgetting (% points) and images/s,
        rounded as every displayed table (``DISPLAY_DECIMALS``); domains.csv and summary.json keep full precision."""
        return display_table(error_table({self.summary["strategy"]: self.summary}))

    def plot(self, path: Optional[str | Path] = None) -> Path:
        """Accuracy over time with domain boundaries, written to ``path`` (default: the run folder)."""
        target = Path(path) if path else (self.out or Path(".")) / "accuracy_over_time.png"
        return plot_accuracy(self.steps, target, title=f"{self.summary['strategy']} on {self.summary['stream']}")


def check_finite_input(x: torch.Tensor, segment: str, stream: str) -> None:
    """Refuse a segment whose images hold NaN or infinite values: one reduction and one host sync per segment."""
    if x.is_floating_point() and not bool(torch.isfinite(x.sum(dtype=torch.float32))):
        bad = int((~torch.isfinite(x)).sum())  # only on the error path (a huge finite sum can overflow to inf)
        if bad:
            raise NonFiniteInputError(f"segment {segment!r} of stream {stream!r} holds {bad} non-finite pixel "
                                      f"value(s) (NaN or inf) in its images; fix the data or its transform")


def check_health_options(collapse_threshold: float, on_diverge: str) -> None:
    """One-line errors for ``run.collapse_threshold`` (a number in [0, 1]) and ``run.on_diverge`` (stop / mark)."""
    if on_diverge not in ON_DIVERGE:
        raise ConfigError(f"run.on_diverge must be one of {', '.join(ON_DIVERGE)}, got {on_diverge!r}")
    if isinstance(collapse_threshold, bool) or not isinstance(collapse_threshold, (int, float)) \
            or not 0 <= collapse_threshold <= 1:
        raise ConfigError(f"run.collapse_threshold must be a number from 0 (never mark) to 1, got "
                          f"{collapse_threshold!r}")


def check_chunk_size(chunk_size: Optional[int]) -> None:
    """``run.chunk_size`` is a positive number of images or ``None`` (automatic)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"run.chunk_size must be a positive number of images or null (automatic), got "
                          f"{chunk_size!r}")


def _save_checkpoint(out: Path, payload: Dict[str, Any]) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out / CHECKPOINT)


def run(stream: Stream, strategy: Strategy, device: str | torch.device | None = "auto",
        out: Optional[str | Path] = None, resume: bool = False, progress: bool = True,
        config: Optional[Mapping[str, Any]] = None, force: bool = False,
        collapse_threshold: float = COLLAPSE_THRESHOLD, on_diverge: str = "stop",
        chunk_size: Optional[int] = None, realtime: Optional[Mapping[str, Any]] = None,
        loggers: Optional[Sequence[str]] = None) -> RunResult:
    """Run ``strategy`` over ``stream`` on ``device``; write the run folder ``out`` as it goes when given.

    This process holds ``out`` while it writes it (a second writer is refused, naming this one; see
    :mod:`ctta.runfolder`). A folder that holds a finished or unfinished run is refused unless ``resume`` (continue
    after its last finished segment; a finished run is returned as it is, untouched) or ``force`` (overwrite it).
    On resume, ``config`` must equal the saved config.yaml but for how-to-run keys (``run.device``, ``run.out``...).
    ``config`` is saved as config.yaml; without it, what the engine knows (stream spec, strategy, device).
    Health (docs/evaluation.md): a segment whose predictions are far more concentrated than its labels is marked
    collapsed (``collapse_threshold``); non-finite logits stop the run with :class:`DivergedError` after that
    segment's rows and the summary are written (``on_diverge="stop"``), or mark it and go on (``"mark"``).
    ``chunk_size`` (images; ``None``: automatic, see :meth:`Segment.chunk_length`) bounds the memory a large segment
    takes on the device; results do not depend on it. ``realtime`` (``{"relative_cost": k}`` fixed, ``{"rate":
    images/s}`` or ``{}`` measured against a forward pass) runs the realtime protocol (:mod:`ctta.realtime`).
    ``loggers`` (``tensorboard``, ``wandb``, ``mlflow``) mirror the run folder's rows into those trackers.
    """
    check_health_options(collapse_threshold, on_diverge)
    check_chunk_size(chunk_size)
    if realtime is not None:
        check_realtime("realtime", realtime.get("relative_cost"), realtime.get("rate"))
    check_loggers(loggers)
    with runfolder.lock(out):
        return _run(stream, strategy, device, out, resume, progress, config, force,
                    collapse_threshold=collapse_threshold, on_diverge=on_diverge, chunk_size=chunk_size,
                    realtime=realtime, loggers=loggers)


def _run(stream: Stream, strategy: Strategy, device: str | torch.device | None, out: Optional[str | Path],
         resume: bool, progress: bool, config: Optional[Mapping[str, Any]], force: bool,
         collapse_threshold: float = COLLAPSE_THRESHOLD, on_diverge: str = "stop",
         chunk_size: Optional[int] = None, realtime: Optional[Mapping[str, Any]] = None,
         loggers: Optional[Sequence[str]] = None) -> RunResult:
    check_compatible(stream, strategy)
    dev = resolve_device(device)
    clock = RealtimeClock(dev, realtime.get("relative_cost"), realtime.get("rate")) if realtime is not None else None
    strategy.to(dev)
    out_path = Path(out) if out is not None else None
    recorder = Recorder(out_path, num_classes=stream.num_classes, collapse_threshold=collapse_threshold)
    first = 0
    cost_state = None  # the cost totals of the part of the run before an interruption
    if resume and out_path is None:
        raise ConfigError("nothing to resume: resume needs the run folder (out=... / --out)")
    state = runfolder.check_start(out_path, resume, force) if out_path is not None else "empty"
    if resume and state == "empty" and not (out_path / runfolder.CONFIG).is_file():
        raise ConfigError(f"nothing to resume: no {CHECKPOINT} in {str(out_path)!r}")
    if resume:  # the same run, or a one-line refusal naming what differs; nothing is written before
        if config is not None:
            runfolder.check_resume_config(out_path, config)
        else:  # Python API: the strategy keys the saved config and this strategy both have
            known = runfolder.api_config(stream, strategy, dev)
            runfolder.check_resume_config(out_path, {"strategy": known["strategy"]}, common_only=True)
    if resume and state == "finished":
        summary, steps, segments, groups, files = runfolder.load_finished(out_path)
        runfolder.check_same_run(out_path, summary.get("strategy"), summary.get("stream_spec"), strategy, stream)
        log.info("%s holds a finished run: its results are returned as they are, nothing is rerun", out_path)
        return RunResult(summary=summary, steps=steps, segments=segments, out=out_path, groups=groups, files=files)
    if resume and state == "unfinished":
        ckpt = torch.load(out_path / CHECKPOINT, map_location=dev, weights_only=False)
        runfolder.check_same_run(out_path, ckpt.get("strategy"), ckpt.get("stream_spec"), strategy, stream)
        strategy.load_checkpoint_state(ckpt["strategy_state"])
        first = int(ckpt["next_segment"])
        cost_state = ckpt.get("cost")
        if clock is not None and ckpt.get("realtime"):
            clock.load_state_dict(ckpt["realtime"])
        recorder.restore(first)
        log.info("resuming %s after segment %d of %d", out_path, first, len(stream))
    elif out_path is not None:
        if resume:
            log.info("%s: no segment had finished; starting from the first", out_path)
        elif state != "empty":
            log.warning("--force: overwriting the %s run in %s", state, out_path)
        runfolder.clean(out_path)
    if out_path is not None and not (state == "unfinished" and resume and (out_path / runfolder.CONFIG).is_file()):
        if config is not None:
            runfolder.write_config(out_path, config)
        else:
            runfolder.write_config(out_path, runfolder.api_config(stream, strategy, dev), header=runfolder.API_HEADER)

    trackers = create_loggers(loggers, out_path, config if config is not None else
                              runfolder.api_config(stream, strategy, dev))  # mirrors of the rows written below
    meter = CostMeter(dev)
    if cost_state:
        meter.load_state_dict(cost_state)  # time, images, steps and peak memory accumulate across the interruption
    estimate = RunEstimate(meter, f"{strategy.name} on {stream.name}", stream.segments[first:], log)
    calls = {"adapt": lambda x, y: strategy.adapt(x), "train": strategy.learn,
             "eval": lambda x, y: strategy.predict(x)}
    if clock is not None:  # the stream does not wait: busy batches are predicted, not adapted on
        calls["adapt"] = lambda x, y: clock.step(strategy.adapt, strategy.predict, x)
    seen_domain = any(s.role == "domain" for s in stream.segments[:first])
    stopped: Optional[tuple] = None  # (segment, message) of a divergence that stopped the run
    try:
        for index, seg in enumerate(stream.segments):
            if index < first:
                continue
            if stream.reset_each_domain and seg.role == "domain":
                if seen_domain:
                    strategy.reset()
                seen_domain = True
            bar = tqdm(total=seg.num_batches, desc=f"[{index + 1}/{len(stream)}] {seg.name}", unit="batch",
                       disable=not progress, dynamic_ncols=True, leave=False)
            acc = SegmentAccumulator()
            call = calls[seg.kind]
            chunks = seg.chunks(dev, chunk_size)  # one chunk for a small segment; the next fetched ahead otherwise
            strategy.segment_start(seg)
            meter.start()
            step = 0
            for x_all, y_all, g_all in chunks:
                check_finite_input(x_all, seg.name, stream.name)
                for i in range(0, x_all.shape[0], seg.batch_size):
                    x, y = x_all[i:i + seg.batch_size], y_all[i:i + seg.batch_size]
                    acc.update(call(x, y), y, None if g_all is None else g_all[i:i + seg.batch_size])
                    estimate.after_batch(seg, step, x.shape[0])  # times one early batch, once
                    step += 1
                    bar.update(1)
            bar.close()
            meter.note_trainable(strategy.trainable_parameters())  # before the session closes: a method may train
            strategy.segment_end(seg)  # inside the timing: end-of-session work (a retrain, an LDA solve) is cost too
            seconds = meter.stop(seg.kind, seg.num_samples, seg.num_batches)
            meter.note_trainable(strategy.trainable_parameters())  # only some sessions, or only at their ends
            rec = acc.finish()
            recorder.add_segment(index, seg.name, seg.kind, seg.role, rec, seconds, meta=seg.meta, groups=seg.groups)
            if trackers:
                seg_steps, seg_row = recorder.last_segment()
                for t in trackers:
                    t.segment(seg_steps, seg_row)
            log.info("%-24s %-5s accuracy %.2f%%  (%.1f img/s)", seg.name, seg.kind, 100 * rec.accuracy,
                     rec.n / max(seconds, 1e-12))
            if rec.nonfinite:  # the segment's rows are written; its checkpoint is not (it would hold a NaN model)
                what = (f"{strategy.name} diverged on segment {seg.name!r} of stream {stream.name!r}: "
                        f"{rec.nonfinite} of {rec.n} samples had non-finite logits (NaN or inf)")
                if on_diverge == "mark":
                    log.warning("%s; marked, the run goes on (run.on_diverge=mark)", what)
                else:
                    where = f"; the results so far are in {out_path}, marked diverged" if out_path else ""
                    stopped = (seg.name, f"{what}{where}; set run.on_diverge=mark to run on and mark it")
                    break
            if out_path is not None:
                _save_checkpoint(out_path, {"next_segment": index + 1, "strategy": strategy.name,
                                            "stream_spec": stream.spec, "cost": meter.state_dict(),
                                            "strategy_state": strategy.checkpoint_state(),
                                            "realtime": clock.state_dict() if clock is not None else None})
    except KeyboardInterrupt:
        if out_path is not None:
            log.warning("interrupted: finished segments are in %s; continue with resume (--resume)", out_path)
        raise

    segments = recorder.segments()
    summary: Dict[str, Any] = {"stream": stream.name, "strategy": strategy.name, "device": str(dev),
                               "stream_spec": stream.spec}
    summary["protocol"] = "realtime" if clock is not None else "offline"
    if clock is not None:
        summary["realtime"] = clock.summary()
    summary["data_sources"] = getattr(stream, "provenance", None) or None  # per domain: -C file or generated
    summary["fingerprint"] = fingerprint(config if config is not None else runfolder.api_config(stream, strategy, dev),
                                         summary["data_sources"] or {}, dev)  # versions, data, weights, settings
    groups = recorder.groups()
    summary.update(run_metrics(segments, groups, recorder.details, collapse_threshold=collapse_threshold))
    if stopped:
        summary["stopped_at"] = stopped[0]
    if summary.get("collapsed_segments"):
        log.warning("%s on %s: predictions collapsed in %s", strategy.name, stream.name,
                    ", ".join(summary["collapsed_segments"]))
    # cost of the whole run: a resumed run adds its part to the totals saved in the checkpoint
    summary.update(meter.summary(strategy.trainable_parameters()))
    summary["stored_elements"] = int(strategy.stored_elements())
    summary["memory_kind"] = meter.memory_kind()
    summary["definitions"] = definitions_for(summary)
    result = RunResult(summary=summary, steps=recorder.steps(), segments=segments, out=out_path, groups=groups)
    if out_path is not None:
        recorder.write_summary(summary)
        result.files = write_run_report(result, True)
    for t in trackers:
        t.finish(summary)
    if stopped:
        raise DivergedError(stopped[1], result)
    return result


def write_run_report(result: RunResult, has_config: bool = False) -> Dict[str, Path]:
    """domains.csv, the plots (accuracy over time, accuracy matrix, per-domain error) and report.html."""
    from ctta.evaluation import domain_error_figure, matrix_figure, save_figure
    from ctta.evaluation.html import run_report

    out = result.out
    assert out is not None
    s = result.summary
    table = result.table()
    error_table({s["strategy"]: s}).to_csv(out / "domains.csv", index_label="strategy")  # full precision
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
