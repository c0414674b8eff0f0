"""Configuration at the edge: YAML defaults per strategy and stream, experiment files, ``--set key=value`` overrides.

The resolved config is a plain nested dict with four sections, saved with every run:
``stream`` (name + stream spec), ``strategy`` (name + hyperparameters), ``backbone`` and ``run``.
"""
from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import yaml

from .errors import ConfigError

SECTIONS = ("stream", "strategy", "backbone", "run")

RUN_DEFAULTS: Dict[str, Any] = {"device": "auto", "seed": 1, "out": None, "resume": False, "force": False,
                                "progress": True, "collapse_threshold": 0.5, "on_diverge": "stop",
                                "chunk_size": None, "protocol": "offline", "relative_cost": None, "stream_rate": None,
                                "loggers": None}


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 does: ``1e-4`` and ``1E5`` are floats, not strings."""


# YAML 1.1 (PyYAML) wants a dot in a float, so ``lr: 1e-4`` would arrive as the string "1e-4"
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text with :class:`YamlLoader` (every config, override and grid in the project goes through it)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _packaged_yaml(kind: str, name: str) -> Dict[str, Any]:
    """The YAML ``configs/<kind>/<name>.yaml`` shipped in the package, or {} when there is none."""
    try:
        f = resources.files("ctta.configs").joinpath(kind, f"{name}.yaml")
        if not f.is_file():
            return {}
        return _parse(f.read_text(), f"configs/{kind}/{name}.yaml")
    except ModuleNotFoundError:  # pragma: no cover - configs missing from a broken install
        return {}


def _parse(text: str, where: str) -> Dict[str, Any]:
    try:
        data = yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """Read a YAML mapping from ``path`` with one-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    return _parse(p.read_text(), str(p))


def strategy_defaults(name: str) -> Dict[str, Any]:
    """The paper's hyperparameters of strategy ``name`` (``configs/strategies/<name>.yaml``, key ``hparams``).

    A composite ``PLUGIN+HOST`` (e.g. ``lsa+tent``) has each part's defaults under the part's name,
    ``{"lsa": {...}, "tent": {...}}``, addressed as ``--set strategy.lsa.ema=0.9`` / ``strategy.tent.lr=1e-4``.
    """
    if "+" in name:
        return {part: strategy_defaults(part) for part in (p.strip() for p in name.split("+")) if part}
    return dict(_packaged_yaml("strategies", name).get("hparams") or {})


def stream_defaults(name: str) -> Dict[str, Any]:
    """Default spec of stream ``name`` (``configs/streams/<name>.yaml``, key ``spec``)."""
    return dict(_packaged_yaml("streams", name).get("spec") or {})


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` to (["a", "b"], parsed value); the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. strategy.lr=1e-4)")
    key, raw = item.split("=", 1)
    path = [k for k in key.strip().split(".") if k]
    if len(path) < 2 or path[0] not in SECTIONS:
        raise ConfigError(f"override {item!r}: the key must start with one of {', '.join(SECTIONS)} "
                          f"and name a field, e.g. strategy.lr=1e-4")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def deep_update(base: Dict[str, Any], other: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursively merge ``other`` into a copy of ``base``; ``None`` values in ``other`` are skipped."""
    out = copy.deepcopy(base)
    for k, v in other.items():
        if v is None:
            continue
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def reject_unknown(given: Iterable[str], valid: Iterable[str], subject: str, noun: str) -> None:
    """One-line ConfigError when ``given`` holds names outside ``valid``: "<subject> <noun>(s) 'a', 'b'; valid
    <noun>s: ..." (``subject`` e.g. "config has unknown")."""
    valid = list(valid)
    bad = sorted(set(given) - set(valid))
    if bad:
        raise ConfigError(f"{subject} {noun}(s) {', '.join(map(repr, bad))}; valid {noun}s: {', '.join(valid)}")


def set_path(target: Dict[str, Any], path: Sequence[str], value: Any) -> None:
    """``target[path[0]]...[path[-1]] = value``, creating sections; a one-line error where a step is not a section."""
    cursor = target
    for k in path[:-1]:
        cursor = cursor.setdefault(k, {})
        if not isinstance(cursor, dict):
            raise ConfigError(f"override {'.'.join(path)}: {k!r} is not a section")
    cursor[path[-1]] = value


def resolve(experiment: Optional[Mapping[str, Any]] = None, cli: Optional[Mapping[str, Any]] = None,
            overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Defaults < experiment file < CLI flags < ``--set`` overrides, with the strategy's and stream's YAML defaults."""
    experiment = dict(experiment or {})
    reject_unknown(experiment, SECTIONS, "config has unknown", "section")
    for sec in SECTIONS:
        if sec in experiment and not isinstance(experiment[sec], Mapping):
            raise ConfigError(f"config section {sec!r} must be a mapping, got {type(experiment[sec]).__name__}")
    merged: Dict[str, Any] = {"stream": {}, "strategy": {}, "backbone": {}, "run": dict(RUN_DEFAULTS)}
    merged = deep_update(merged, experiment)
    merged = deep_update(merged, cli or {})
    for path, value in [parse_override(o) for o in overrides]:
        set_path(merged, path, value)
    # fill in packaged defaults under what the user gave
    if merged["stream"].get("name"):
        merged["stream"] = deep_update(stream_defaults(merged["stream"]["name"]), merged["stream"])
    if merged["strategy"].get("name"):
        merged["strategy"] = deep_update(strategy_defaults(merged["strategy"]["name"]), merged["strategy"])
    return merged


def dump_yaml(cfg: Mapping[str, Any], path: str | Path) -> None:
    """Write ``cfg`` as YAML (the resolved config of a run)."""
    Path(path).write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def check_options(fn: Any, options: Mapping[str, Any], what: str, noun: str, skip: Iterable[str] = ()) -> None:
    """Raise a one-line ConfigError when ``options`` holds a keyword that ``fn`` does not take.

    ``what`` names the thing (e.g. "strategy 'tent'"), ``noun`` the kind of keyword ("hyperparameter", "option").
    """
    import inspect

    accepted = [p for p in inspect.signature(fn).parameters if p not in set(skip)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"{what} has no {noun} {', '.join(map(repr, unknown))}; it takes: {', '.join(accepted)}")


def flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested mapping as ``{"section.key": value}`` (leaves only), e.g. for trackers' parameters and fingerprints."""
    if isinstance(d, Mapping):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}
