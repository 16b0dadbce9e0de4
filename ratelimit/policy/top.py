"""The heaviest callers of a key, in fixed memory, without putting keys in metrics.

    top = TopCallers(capacity=64)
    TokenBucket("5/minute", key=top.track(keys.header("x-api-key"), "api-key"))

`track` wraps a key function: every call (one per request the limit sees,
admitted or refused) counts one for the caller in a Space-Saving table of
`capacity` counters, so millions of distinct callers cannot grow it and every
caller with more than 1/capacity of the requests is in it. Callers are kept as
the same digest the backend stores (`show_keys=True` keeps the key text
instead: API keys and IPs are personal data, so that is opt-in). Nothing of it
reaches Prometheus labels; `top_app(top)` serves it as JSON at a path the app
chooses to mount (none by default).

The tables are per process: under several workers each shows its own share,
and the answering worker's pid says whose. (A fleet-wide view, e.g. workers
merging their tables into Redis for a `ratelimit top` command, is not built.)
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any

from .._errors import ConfigError
from .._types import KeyFunc, Scope
from ..algorithms.heavy_hitters import Counted, SpaceSaving
from .engine import _digest
from .limits import _is_async

__all__ = ["TopCallers"]


class TopCallers:
    """Space-Saving tables of the callers of the keys it `track`s, one per name."""

    def __init__(self, capacity: int = 64, *, show_keys: bool = False) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigError("capacity", "a positive number of counters", capacity)
        if not isinstance(show_keys, bool):
            raise ConfigError("show_keys", "true or false", show_keys)
        self.capacity = capacity
        self.show_keys = show_keys
        self.tables: dict[str, SpaceSaving] = {}

    def track(self, key: KeyFunc, name: str) -> KeyFunc:
        """`key`, counting each caller it returns in the table `name` (None is not counted)."""
        if not callable(key):
            raise ConfigError("key", "a callable (scope) -> str | None", key)
        if not isinstance(name, str) or not name:
            raise ConfigError("name", "a non-empty table name", name)
        if name in self.tables:
            raise ConfigError("name", "a name not tracked yet", name)
        table = self.tables[name] = SpaceSaving(self.capacity)
        cls = _AsyncTracked if _is_async(key) else _Tracked
        return cls(key, table, self.show_keys)

    def top(self, n: int = 10) -> dict[str, tuple[int, list[Counted]]]:
        """Per table: total requests counted, and its `n` heaviest callers."""
        return {name: (t.total, t.top(n)) for name, t in self.tables.items()}


class _Tracked:
    """A key function that counts the callers it returns."""

    __slots__ = ("key", "show_keys", "table")

    def __init__(self, key: KeyFunc, table: SpaceSaving, show_keys: bool) -> None:
        self.key = key
        self.table = table
        self.show_keys = show_keys

    @property
    def shared(self) -> bool:
        """The wrapped key's: a tracked keys.GLOBAL still refuses with 503."""
        return bool(getattr(self.key, "shared", False))

    def _count(self, text: object) -> None:
        if text is not None:
            text = str(text)
            self.table.add(text if self.show_keys else _digest(text))

    def __call__(self, scope: Scope) -> Any:
        text = self.key(scope)
        if inspect.isawaitable(text):
            return self._later(text)
        self._count(text)
        return text

    async def _later(self, pending: Awaitable[str | None]) -> str | None:
        text = await pending
        self._count(text)
        return text

    def __repr__(self) -> str:
        return f"<tracked {self.key!r}>"


class _AsyncTracked(_Tracked):
    """The same for an async key function (the engine awaits it)."""

    __slots__ = ()

    async def __call__(self, scope: Scope) -> str | None:
        pending = self.key(scope)
        text = await pending if inspect.isawaitable(pending) else pending
        self._count(text)
        return text
