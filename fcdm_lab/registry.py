"""Registries of named components, timm style: model presets, block families, channel mixers,
datasets (`fcdm_lab.data`).

One `Registry` per component kind. Components register with a decorator; a second registration of
the same name is an error, and an unknown name raises a `UserError` that lists the valid names.
Tests loop the registries, so a new entry is tested without writing a test.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Tuple

from .errors import UserError, choices


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Any] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[Any], Any]:
        """Decorator: `@REG.register("name", key=value)`; the object is returned unchanged."""

        def deco(obj: Any) -> Any:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"{self.kind}: cannot register an unnamed object")
            if key in self._entries:
                raise ValueError(f"duplicate {self.kind} name {key!r}")
            self._entries[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return deco

    def unregister(self, name: str) -> Any:
        """Remove `name` and return its object (for a throwaway entry, e.g. one a test registers)."""
        obj = self.get(name)
        del self._entries[name], self._meta[name]
        return obj

    @contextlib.contextmanager
    def registered(self, name: str, obj: Any, **meta: Any) -> Iterator[Any]:
        """`with REG.registered("name", obj): ...`: an entry that exists only inside the block
        (a test's or a plugin's temporary component), removed on the way out even on error."""
        self.register(name, **meta)(obj)
        try:
            yield obj
        finally:
            self.unregister(name)

    def get(self, name: str) -> Any:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; valid: {choices(self.names())}") from None

    def meta(self, name: str) -> Dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> Iterator[Tuple[str, Any]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


__all__ = ["Registry"]
