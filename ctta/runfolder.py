"""Run folders are never mixed, lost or silently rewritten.

* :func:`lock`: one writer per run folder. An exclusive ``fcntl.flock`` on ``<out>/.lock``, which holds the
  writer's pid, host, start time and command; held for the whole run, removed at its end. A second writer fails at
  once with :class:`RunFolderLockedError` naming the holder. The OS drops a flock with its process, so the lock of a
  process that died is free and is taken over (where flock is missing: a lock file created exclusively, taken over
  when its pid is dead on this host). Re-entrant within one process (an experiment holds its root, the engine the
  run folder, which is the same folder for a single run).
* :func:`check_start`: a folder holding a finished run (``summary.json``) or an unfinished one (a checkpoint, no
  summary) is refused unless ``resume`` (continue it; a finished run is returned as it is) or ``force``
  (overwrite it) says what to do with it.
* :func:`check_resume_config`: resume only with the config the run was started with: the resolved config must
  equal the saved ``config.yaml``, except for the keys that say how to run, not what (:data:`RESUME_IGNORED`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ctta.errors import ConfigError, RunFolderError, RunFolderLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK = ".lock"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
COMPARISON = "comparison.csv"
#: what a fresh run removes before it starts (config.yaml is rewritten right after)
OUTPUTS = ("steps.csv", "segments.csv", "groups.csv", "segment_details.jsonl", "summary.json", "domains.csv",
           "report.html", "accuracy_over_time.png", "accuracy_matrix.png", "domain_errors.png", CHECKPOINT,
           CHECKPOINT + ".tmp")
#: dotted keys of the config that may differ on resume: how to run, not what is computed
RESUME_IGNORED = ("run.resume", "run.force", "run.progress", "run.out", "run.device", "run.chunk_size",
                  "stream.workers", "run.loggers")

_HELD: Dict[str, List[Any]] = {}  # real path of a lock file -> [RunLock, depth, thread] held by this process
_HELD_GUARD = threading.Lock()


# ---------------------------------------------------------------- the lock

def _holder_text(info: Mapping[str, Any]) -> str:
    if not info.get("pid"):
        return "another process (it has not written its details yet)"
    since = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    cmd = info.get("command")
    return f"pid {info['pid']} on {info.get('host', '?')} since {when}" + (f" ({cmd})" if cmd else "")


def _read_info(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover
        return True
    return True


def _command() -> str:
    text = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
    return text if len(text) <= 300 else text[:297] + "..."


class RunLock:
    """The exclusive lock of one run folder (see the module docstring); ``with RunLock(out): ...``."""

    def __init__(self, out: str | Path, command: Optional[str] = None) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK
        self.command = command if command is not None else _command()
        self._fd: Optional[int] = None
        self._created_dir = False

    def _info(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}

    def _refuse(self, info: Mapping[str, Any]) -> RunFolderLockedError:
        return RunFolderLockedError(f"run folder {str(self.out)!r} is in use by {_holder_text(info)}; wait for that "
                                    f"run to end or choose another --out")

    def acquire(self) -> "RunLock":
        if not self.out.exists():
            self._created_dir = True
        self.out.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            try:
                return self._acquire_flock()
            except OSError as e:  # a file system without flock (some network mounts): the pid-file lock
                if isinstance(e, BlockingIOError):
                    raise
                log.debug("flock unavailable on %s (%s): using an exclusive lock file", self.path, e)
        return self._acquire_pidfile()

    def _acquire_flock(self) -> "RunLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(_read_info(self.path)) from None
            except OSError:
                os.close(fd)
                raise
            # the holder before us may have removed the file between our open and our flock: lock the one there now
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_info(self.path)
        if stale.get("pid"):
            log.warning("run folder %s: taking over the lock of %s, which has ended", self.out, _holder_text(stale))
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self._info()).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_pidfile(self) -> "RunLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read_info(self.path)
                pid = info.get("pid")
                if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
                    log.warning("run folder %s: taking over the stale lock of %s (not running)", self.out,
                                _holder_text(info))
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._refuse(info) from None
            os.write(fd, json.dumps(self._info()).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise self._refuse(_read_info(self.path))  # pragma: no cover - lost the race three times

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can take the file we remove
        finally:
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                except OSError:  # pragma: no cover
                    pass
            os.close(self._fd)
            self._fd = None
        if self._created_dir:  # a run refused before writing anything leaves no empty folder behind
            try:
                self.out.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _Held:
    """Context manager of :func:`lock`: re-entrant within this process, keyed by the folder's real path."""

    def __init__(self, out: Optional[str | Path]) -> None:
        self.out = None if out is None else Path(out)
        self.key: Optional[str] = None

    def __enter__(self) -> Optional[RunLock]:
        if self.out is None:
            return None
        key = os.path.realpath(self.out / LOCK)
        with _HELD_GUARD:
            if key in _HELD:
                held, _, thread = _HELD[key]
                if thread != threading.get_ident():  # re-entrant for the thread that holds it, not for others
                    raise RunFolderLockedError(f"run folder {str(self.out)!r} is in use by another thread of this "
                                               f"process (pid {os.getpid()}); choose another --out")
                _HELD[key][1] += 1
                self.key = key
                return held
            lk = RunLock(self.out).acquire()
            _HELD[key] = [lk, 1, threading.get_ident()]
            self.key = key
            return lk

    def __exit__(self, *exc: Any) -> None:
        if self.key is None:
            return
        with _HELD_GUARD:
            entry = _HELD[self.key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[self.key]
                entry[0].release()


def lock(out: Optional[str | Path]) -> _Held:
    """``with lock(out):`` hold the run folder ``out`` for this process (nothing when ``out`` is None)."""
    return _Held(out)


# ---------------------------------------------------------------- what a folder holds

def folder_state(out: str | Path) -> str:
    """``finished`` (summary.json), ``unfinished`` (a checkpoint, no summary) or ``empty`` (neither)."""
    out = Path(out)
    if (out / SUMMARY).is_file():
        return "finished"
    if (out / CHECKPOINT).is_file():
        return "unfinished"
    return "empty"


def _what_run(out: Path) -> str:
    """``'tent' on 'digits_c'`` from the summary or the saved config, for messages."""
    try:
        s = json.loads((out / SUMMARY).read_text())
        return f"of {s.get('strategy')!r} on {s.get('stream')!r}"
    except (OSError, ValueError):
        pass
    try:
        cfg = _load_saved(out)
    except ConfigError:  # a malformed config.yaml: the message goes without the names
        cfg = None
    if cfg:
        return f"of {(cfg.get('strategy') or {}).get('name')!r} on {(cfg.get('stream') or {}).get('name')!r}"
    return ""


def _segments_done(out: Path) -> int:
    try:
        with (out / "segments.csv").open() as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)
    except OSError:
        return 0


def check_start(out: str | Path, resume: bool, force: bool) -> str:
    """Before a run writes into ``out``: its :func:`folder_state`, or a one-line refusal when the folder holds a run
    that neither ``resume`` nor ``force`` says what to do with."""
    out = Path(out)
    if resume and force:
        raise ConfigError("--resume and --force exclude each other: resume continues the run in the folder, force "
                          "overwrites it")
    state = folder_state(out)
    if resume or force or state == "empty":
        return state
    what = _what_run(out)
    if state == "finished":
        raise RunFolderError(f"{str(out)!r} holds a finished run {what} (summary.json); --resume returns it as it "
                             f"is, --force overwrites it, or choose another --out".replace("  ", " "))
    raise RunFolderError(f"{str(out)!r} holds an unfinished run {what} ({_segments_done(out)} segment(s) done, no "
                         f"summary.json); continue it with --resume, or start over with --force".replace("  ", " "))


def check_experiment_root(out_root: str | Path, run_outs: Iterable[str | Path], resume: bool, force: bool) -> None:
    """Before an experiment of several runs starts: refuse, before any work, a root that holds an earlier
    experiment (config.yaml or comparison.csv) or a run folder that holds a run, unless ``resume`` or ``force``."""
    root = Path(out_root)
    if resume and force:
        check_start(root, resume, force)
    if resume or force:
        return
    for out in run_outs:
        check_start(out, resume, force)
    held = [n for n in (CONFIG, COMPARISON) if (root / n).is_file()]
    if held:
        raise RunFolderError(f"{str(root)!r} holds an earlier experiment ({', '.join(held)}); --resume continues "
                             f"it, --force overwrites it, or choose another --out")


def clean(out: str | Path) -> None:
    """Remove the outputs of an earlier run (a fresh run, or ``force``)."""
    for name in OUTPUTS:
        p = Path(out) / name
        if p.exists():
            p.unlink()


# ---------------------------------------------------------------- the config on resume

def _load_saved(out: Path) -> Optional[Dict[str, Any]]:
    path = Path(out) / CONFIG
    if not path.is_file():
        return None
    from ctta.config import load_yaml

    return load_yaml(path)


def comparable(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``cfg`` as its config.yaml reads back (a YAML round trip: tuples become lists, paths text)."""
    import yaml

    from ctta.config import _plain

    text = yaml.safe_dump(_plain(cfg), sort_keys=True)
    try:
        from ctta.config import yaml_load
    except ImportError:  # pragma: no cover
        yaml_load = yaml.safe_load
    return yaml_load(text) or {}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_ABSENT = "<absent>"


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = RESUME_IGNORED,
                       common_only: bool = False) -> List[Tuple[str, Any, Any]]:
    """``[(dotted key, saved value, new value)]`` where two configs differ, sorted; ``ignore``: dotted keys (and
    everything below them) left out; ``common_only``: only keys both configs have."""
    a, b = _flatten(comparable(saved)), _flatten(comparable(new))
    keys = (set(a) & set(b)) if common_only else (set(a) | set(b))
    diffs = []
    for k in sorted(keys, key=lambda k: (not k.endswith(".name"), k)):  # what is run first, then its options
        if any(k == i or k.startswith(i + ".") for i in ignore):
            continue
        old, cur = a.get(k, _ABSENT), b.get(k, _ABSENT)
        if old != cur and not (old in (None, {}, _ABSENT) and cur in (None, {}, _ABSENT)):
            diffs.append((k, old, cur))
    return diffs


def describe_differences(diffs: Sequence[Tuple[str, Any, Any]], limit: int = 6) -> str:
    """``strategy.lr 0.001 -> 0.01, strategy.name 'source' -> 'tent'`` (the first ``limit``)."""
    def show(v: Any) -> str:
        return v if v == _ABSENT else repr(v)

    text = ", ".join(f"{k} {show(o)} -> {show(n)}" for k, o, n in diffs[:limit])
    return text + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


def check_resume_config(out: str | Path, config: Mapping[str, Any], common_only: bool = False) -> None:
    """On resume: refuse, naming the keys, a resolved ``config`` that differs from ``<out>/config.yaml``."""
    out = Path(out)
    saved = _load_saved(out)
    if saved is None:
        return
    diffs = config_differences(saved, config, common_only=common_only)
    if diffs:
        how = "with what it was started with" if common_only else f"as it was started (ctta-bench --resume --out {out})"
        raise RunFolderError(f"cannot resume {str(out)!r}: the config differs from its saved config.yaml in "
                             f"{describe_differences(diffs)}; resume it {how}, start over with --force, or choose "
                             f"another --out")


def _json_plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def check_same_run(out: str | Path, strategy_name: Optional[str], stream_spec: Any, strategy: Any, stream: Any) -> None:
    """On resume: the checkpoint (or summary) must be of this strategy on this stream spec; the message says which
    differs."""
    out = Path(out)
    if strategy_name is not None and strategy_name != strategy.name:
        raise RunFolderError(f"cannot resume {str(out)!r}: it holds a run of strategy {strategy_name!r}, not "
                             f"{strategy.name!r}; choose another --out, or --force to overwrite it")
    if stream_spec is None:
        return
    saved, new = _json_plain(stream_spec), _json_plain(stream.spec)
    if saved != new:
        if isinstance(saved, dict) and isinstance(new, dict):
            diffs = [(f"stream spec {k}", saved.get(k, _ABSENT), new.get(k, _ABSENT))
                     for k in sorted(set(saved) | set(new)) if saved.get(k, _ABSENT) != new.get(k, _ABSENT)]
            what = describe_differences(diffs)
        else:
            what = f"stream spec {saved!r} -> {new!r}"
        raise RunFolderError(f"cannot resume {str(out)!r}: it holds a run on another stream ({what}); choose another "
                             f"--out, or --force to overwrite it")


# ---------------------------------------------------------------- reading a finished run, the API's config

def load_finished(out: str | Path) -> Tuple[Dict[str, Any], Any, Any, Any, Dict[str, Path]]:
    """summary, steps, segments, groups and the files of the finished run in ``out``, read as they are."""
    import pandas as pd

    from ctta.evaluation.recorder import GROUP_COLUMNS, SEGMENT_COLUMNS, STEP_COLUMNS, read_table

    out = Path(out)
    summary = json.loads((out / SUMMARY).read_text())
    tables = []
    for name, cols in (("steps.csv", STEP_COLUMNS), ("segments.csv", SEGMENT_COLUMNS), ("groups.csv", GROUP_COLUMNS)):
        p = out / name
        tables.append(read_table(p) if p.is_file() and p.stat().st_size else pd.DataFrame(columns=cols))
    names = {"steps": "steps.csv", "segments": "segments.csv", "domains": "domains.csv", "summary": SUMMARY,
             "details": "segment_details.jsonl", "plot": "accuracy_over_time.png", "groups": "groups.csv",
             "matrix_plot": "accuracy_matrix.png", "bars": "domain_errors.png", "config": CONFIG,
             "html": "report.html"}
    files = {k: out / v for k, v in names.items() if (out / v).is_file()}
    return summary, tables[0], tables[1], tables[2], files


def _plain_value(v: Any) -> bool:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain_value(x) for x in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and _plain_value(x) for k, x in v.items())
    return False


def api_config(stream: Any, strategy: Any, device: Any) -> Dict[str, Any]:
    """The config.yaml of a run started from Python (``ctta.run`` without ``config``): what the engine knows.

    The stream's name and spec, the strategy's name, seed and hyperparameters when the strategy carries them
    (``strategy.hparams``), the model's class and the device.
    """
    spec = dict(getattr(stream, "spec", None) or {})
    stream_sec = {"name": spec.pop("name", None) or stream.name, **{k: v for k, v in spec.items() if _plain_value(v)}}
    strat: Dict[str, Any] = {"name": strategy.name}
    hp = getattr(strategy, "hparams", None)
    if isinstance(hp, Mapping):
        strat.update({k: v for k, v in hp.items() if _plain_value(v)})
    if "seed" not in strat and isinstance(getattr(strategy, "seed", None), int):
        strat["seed"] = strategy.seed
    model = getattr(strategy, "model", None)
    backbone = {"class": type(model).__name__} if model is not None else {}
    return {"stream": stream_sec, "strategy": strat, "backbone": backbone,
            "run": {"device": str(device)}}


API_HEADER = ("# written by ctta.run (Python API): what the engine knows of this run, not a config to rerun it with\n"
              "# (the stream spec, the strategy's name, seed and hyperparameters when known, the model class)\n")


def write_config(out: str | Path, config: Mapping[str, Any], header: str = "") -> Path:
    """``<out>/config.yaml``: ``config`` as YAML, after the comment lines ``header``."""
    from ctta.config import dump_yaml

    path = Path(out) / CONFIG
    dump_yaml(config, path)
    if header:
        path.write_text(header + path.read_text())
    return path


__all__ = ["LOCK", "RESUME_IGNORED", "RunLock", "lock", "folder_state", "check_start", "check_experiment_root",
           "clean", "config_differences", "describe_differences", "check_resume_config", "check_same_run",
           "load_finished", "api_config", "write_config"]
