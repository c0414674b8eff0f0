"""One registry pattern (after timm's ``register_model``) for streams, strategies, backbones and corruptions."""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Dict, Generic, Iterator, List, Optional, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def plural(noun: str) -> str:
    """English plural of a registry kind: strategy -> strategies, corruption -> corruptions."""
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return noun[:-1] + "ies"
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def first_paragraph(text: str) -> str:
    """The first paragraph of a docstring, whitespace collapsed to single spaces (the help ``list`` shows)."""
    return " ".join(inspect.cleandoc(text).split("\n\n")[0].split())


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise an error that lists the valid ones and the closest match."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._help: Dict[str, str] = {}

    def register(self, name: str, obj: Optional[T] = None, help: str = "") -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def _add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            self._help[name] = first_paragraph(help or getattr(o, "__doc__", None) or "")
            return o

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        """The object registered as ``name``, or an :class:`UnknownNameError` with a suggestion."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._items), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {plural(self.kind)}: {', '.join(self.names())}"

    def names(self) -> List[str]:
        return sorted(self._items)

    def describe(self, name: str) -> str:
        """The first paragraph of the object's docstring (or of its registered help), on one line."""
        return self._help.get(name, "")

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
