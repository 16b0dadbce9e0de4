"""The heaviest callers of a key, in fixed memory, without putting keys in metrics.

    top = TopCallers(capacity=64)
    TokenBucket("5/minute", key=top.track(keys.header("x-api-key"), "api-key"))

`track` wraps a key function: every call (one per request the limit sees,
admitted or refused) counts one for the caller in a Space-Saving table of
`capacity` counters, so millions of distinct callers cannot grow it and every
caller with more than 1/capacity of the requests is in it. Callers are kept as
the same digest the backend stores (`show_keys=True` keeps the key text
instead, the first 64 characters and a digest of text over 256: API keys and
IPs are personal data, so that is opt-in). Nothing of it
reaches Prometheus labels; `top_app(top)` serves it as JSON at a path the app
chooses to mount (none by default).

The tables of `top_app` are per process and count since start-up: under
several workers each shows its own share, and the answering worker's pid says
whose. The fleet-wide view is `ratelimit top`: with a `RedisBackend`,
`RateLimitMiddleware(..., top=top)` starts a `core.top.TopPublisher` at lifespan
start-up (beside the live overrides, under the same worker id) that every
`every` seconds (default 5) hands the backend's top store
(`backends.stores.TopStore`), off the request path, the callers this worker
counted *since its previous publish* (a tumbling window, separate from the
since-start tables), its `k` heaviest per tracked name. The store keeps each
worker's last window for `keep` s (default 3 x every): a worker that dies
vanishes within `keep` seconds; one that shuts down cleanly withdraws it.
`read_fleet` (the command's reader) merges the live windows: "right now" is
each live worker's last complete window, i.e. the `every` seconds ending at
most `every` seconds ago. The memory backend has no top store (one process:
`top_app` suffices).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable
from typing import Any

from .._errors import ConfigError
from .._types import KeyFunc, Scope
from ..algorithms.heavy_hitters import Counted, SpaceSaving
from .keys import digest as _digest
from .limits import _is_async

logger = logging.getLogger("ratelimit")

__all__ = ["TopCallers"]

#: Seconds between a worker's publishes (the length of its window).
DEFAULT_EVERY = 5.0
#: Version of the published JSON (a reader skips versions it does not know).
_FORMAT = 1
#: With `show_keys`, longer caller text is shown as its first `_SHOWN_PREFIX`
#: characters and its digest: a table holds `capacity` callers, but a caller's
#: text may be a 1 MB header value.
_SHOWN_CHARS = 256
_SHOWN_PREFIX = 64


class TopCallers:
    """Space-Saving tables of the callers of the keys it `track`s, one per name."""

    def __init__(self, capacity: int = 64, *, show_keys: bool = False) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigError("capacity", "a positive number of counters", capacity)
        if not isinstance(show_keys, bool):
            raise ConfigError("show_keys", "true or false", show_keys)
        self.capacity = capacity
        self.show_keys = show_keys
        #: Per tracked name: callers counted since start-up (what `top_app` shows).
        self.tables: dict[str, SpaceSaving] = {}
        #: Per tracked name: callers counted in the current window (None: no windows kept).
        self._window: dict[str, SpaceSaving] | None = None
        #: The publisher that takes the windows (at most one: a window is taken once).
        self.publisher: object | None = None  # a core.top.TopPublisher

    def track(self, key: KeyFunc, name: str) -> KeyFunc:
        """`key`, counting each caller it returns in the table `name` (None is not counted)."""
        if not callable(key):
            raise ConfigError("key", "a callable (scope) -> str | None", key)
        if not isinstance(name, str) or not name:
            raise ConfigError("name", "a non-empty table name", name)
        if name in self.tables:
            raise ConfigError("name", "a name not tracked yet", name)
        self.tables[name] = SpaceSaving(self.capacity)
        if self._window is not None:
            self._window[name] = SpaceSaving(self.capacity)
        cls = _AsyncTracked if _is_async(key) else _Tracked
        return cls(key, self, name)

    def top(self, n: int = 10) -> dict[str, tuple[int, list[Counted]]]:
        """Per table: total requests counted, and its `n` heaviest callers."""
        return {name: (t.total, t.top(n)) for name, t in self.tables.items()}

    def take_window(self) -> dict[str, SpaceSaving]:
        """The tables of the callers counted since the previous call; start new ones.

        The first call starts keeping windows (and returns empty tables): until
        then each request is counted once, in `tables`, and afterwards twice.
        """
        taken = self._window
        self._window = {name: SpaceSaving(self.capacity) for name in self.tables}
        if taken is None:
            return {name: SpaceSaving(self.capacity) for name in self.tables}
        return taken

    def _count(self, name: str, text: object) -> None:
        if text is not None:
            text = str(text)
            if not self.show_keys:
                item = _digest(text)
            elif len(text) <= _SHOWN_CHARS:
                item = text
            else:
                item = f"{text[:_SHOWN_PREFIX]}...{_digest(text)}"
            self.tables[name].add(item)
            window = self._window
            if window is not None:
                window[name].add(item)


class _Tracked:
    """A key function that counts the callers it returns."""

    __slots__ = ("key", "name", "owner")

    def __init__(self, key: KeyFunc, owner: TopCallers, name: str) -> None:
        self.key = key
        self.owner = owner
        self.name = name

    @property
    def shared(self) -> bool:
        """The wrapped key's: a tracked keys.GLOBAL still refuses with 503."""
        return bool(getattr(self.key, "shared", False))

    def _count(self, text: object) -> None:
        self.owner._count(self.name, text)

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
