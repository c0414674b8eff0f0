"""Hyperparameters declared once, in a constructor's signature (type and range), and checked before any work.

A strategy writes ``lr: Positive = 1e-3, steps: Count = 1, affinity: Literal["rbf", "knn"] = "rbf"``; the
annotation is the declaration. :func:`check_call` reads it, turns what a user wrote (``"1e-4"`` from a YAML file,
``2.0`` for an integer) into the declared type, and refuses anything else with one line naming the key, the value
and what is allowed, before a stream is read or a model built.
"""
from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, Annotated, Callable, Dict, Iterable, Literal, Mapping, Optional, Tuple, Union

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``ge``/``gt`` below, ``le``/``lt`` above (None: unbounded)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def holds(self, v: float) -> bool:
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))

    def describe(self) -> str:
        parts = [f"{op} {_num(b)}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if b is not None]
        return " and ".join(parts)


# the declarations strategies use; each reads as what the number means
Positive = Annotated[float, Range(gt=0)]            #: a learning rate, a temperature, a scale
NonNegative = Annotated[float, Range(ge=0)]         #: a weight decay, a loss weight, a margin
Unit = Annotated[float, Range(ge=0, le=1)]          #: a probability, a share, a momentum, an EMA rate
Momentum = Annotated[float, Range(ge=0, lt=1)]      #: an SGD momentum or an Adam beta (1 would never move)
Count = Annotated[int, Range(ge=1)]                 #: steps, views, a batch or buffer size
NonNegInt = Annotated[int, Range(ge=0)]             #: an offset, a count that may be zero

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class _Refused(Exception):
    """A value that does not fit a declaration; the message says what is allowed."""


def _num(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else repr(b)


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise _Refused("a number")
    if isinstance(v, (int, float)):
        out = float(v)
    elif isinstance(v, str):
        try:
            out = float(v.strip().replace("_", ""))
        except ValueError:
            raise _Refused("a number (e.g. 1e-4 or 0.001)") from None
    elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # a numpy / torch scalar
        return _to_float(v.item())
    else:
        raise _Refused("a number")
    if math.isnan(out):
        raise _Refused("a number (not NaN)")
    return out


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise _Refused("an integer")
    if isinstance(v, int):
        return v
    try:
        f = _to_float(v)
    except _Refused:
        raise _Refused("an integer") from None
    if not f.is_integer():
        raise _Refused("an integer")
    return int(f)


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise _Refused("true or false")


def _what(tp: Any) -> str:
    """What a declaration allows, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base, ranges = args[0], [m for m in args[1:] if isinstance(m, Range)]
        word = _what(base)
        return f"{word} {' and '.join(r.describe() for r in ranges)}".strip()
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is Union:
        words = [_what(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as declaration ``tp`` wants it; raises :class:`_Refused` when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if origin is Annotated:
        try:
            out = coerce(value, args[0])
        except _Refused:
            raise _Refused(_what(tp)) from None
        for r in (m for m in args[1:] if isinstance(m, Range)):
            if not r.holds(out):
                raise _Refused(_what(tp))
        return out
    if origin is Literal:
        if isinstance(value, str) and value.strip() in args:
            return value.strip()
        if value in args and not isinstance(value, bool):
            return value
        raise _Refused(_what(tp))
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(value, a)
            except _Refused:
                continue
        raise _Refused(_what(tp))
    if tp is float:
        return _to_float(value)
    if tp is int:
        return _to_int(value)
    if tp is bool:
        return _to_bool(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Refused("a string")
        return value
    if origin in (list, tuple) or tp in (list, tuple) or origin is typing.Sequence \
            or getattr(origin, "__name__", "") == "Sequence":
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise _Refused(_what(tp) if origin is None else "a list")
        inner = args[0] if args else Any
        return type(value)(coerce(v, inner) for v in value) if inner is not Any else value
    if origin in (dict, typing.Mapping) or tp is dict or getattr(origin, "__name__", "") == "Mapping":
        if not isinstance(value, Mapping):
            raise _Refused("a mapping")
        return value
    if isinstance(tp, type):
        if value is not None and not isinstance(value, tp):
            raise _Refused(_what(tp))
        return value
    return value  # a declaration we cannot check (a forward reference): passed through


def declarations(fn: Callable[..., Any], skip: Iterable[str] = ("self", "model")) -> Dict[str, Tuple[Any, Any]]:
    """``{name: (declared type, default)}`` of ``fn``'s keyword parameters, annotations resolved in its module."""
    sig = inspect.signature(fn)
    env = dict(getattr(fn, "__globals__", {}))
    env.setdefault("Annotated", Annotated)
    out = {}
    for name, p in sig.parameters.items():
        if name in set(skip) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        if isinstance(ann, str):
            try:
                ann = eval(ann, env)  # noqa: S307 - the module's own annotation text
            except Exception:  # a name the module imports only for type checkers
                ann = Any
        out[name] = (ann, p.default)
    return out


def check_call(fn: Callable[..., Any], values: Mapping[str, Any], what: str,
               skip: Iterable[str] = ("self", "model")) -> Dict[str, Any]:
    """``values`` coerced to ``fn``'s declarations; a one-line ConfigError names an unknown key or a bad value."""
    decl = declarations(fn, skip)
    unknown = sorted(set(values) - set(decl))
    if unknown:
        raise ConfigError(f"{what} has no hyperparameter {', '.join(map(repr, unknown))}; it takes: "
                          f"{', '.join(decl)}")
    out = {}
    for key, value in values.items():
        tp = decl[key][0]
        try:
            out[key] = coerce(value, tp)
        except _Refused as refused:
            raise ConfigError(f"{what}: hyperparameter {key}={value!r} is not allowed; expected {refused}") from None
    return out


def undeclared(fn: Callable[..., Any], skip: Iterable[str] = ("self", "model")) -> list[str]:
    """Keyword parameters of ``fn`` without a type declaration (a test keeps this empty for every strategy)."""
    return [k for k, (tp, _) in declarations(fn, skip).items() if tp is Any or tp is inspect.Parameter.empty]
