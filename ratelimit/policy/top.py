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
`RateLimitMiddleware(..., top=top)` starts a `TopPublisher` at lifespan
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

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .._errors import ConfigError
from .._tasks import stop
from .._types import KeyFunc, Scope
from ..algorithms.heavy_hitters import Counted, SpaceSaving, Summary, merge
from .keys import digest as _digest
from .limits import _is_async

if TYPE_CHECKING:
    from ..backends.stores import TopStore

logger = logging.getLogger("ratelimit")

__all__ = [
    "FleetTable",
    "FleetTop",
    "TopCallers",
    "TopPublisher",
    "merge_windows",
    "publisher_for",
    "read_fleet",
]

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
        self.publisher: TopPublisher | None = None

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


# -- fleet-wide: publishing windows to the backend's top store, reading them back -----------


def _positive(field: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1e9:
        raise ConfigError(field, "a number of seconds > 0", value)
    return float(value)


class TopPublisher:
    """Publishes a `TopCallers`' windows to a top store every `every` seconds (see the module).

    `k` is how many callers per tracked name each publish keeps (default: the
    capacity, i.e. the whole table); `keep` how long a published window
    outlives its worker (default 3 x `every`). Creating it starts the
    `TopCallers`' windows; `start` publishes in the background, `publish`
    once now (tests, scripts); `aclose` stops and removes this worker's window.
    """

    def __init__(
        self,
        top: TopCallers,
        store: TopStore,
        *,
        worker: str | None = None,
        every: float = DEFAULT_EVERY,
        k: int | None = None,
        keep: float | None = None,
    ) -> None:
        if not isinstance(top, TopCallers):
            raise ConfigError("top", "a TopCallers", top)
        if top.publisher is not None:
            raise ConfigError("top", "a TopCallers no other publisher takes windows from", top)
        self.every = _positive("every", every)
        self.keep = 3 * self.every if keep is None else _positive("keep", keep)
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ConfigError("k", "a positive number of callers per name", k)
        self.k = top.capacity if k is None else min(k, top.capacity)
        self.top = top
        self.store = store
        #: This process's name: the live overrides' worker id when the middleware makes it.
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        #: Server time of the last publish: where the current window began (None: not yet).
        self.since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        top.publisher = self
        top.take_window()

    def record(self, window: Mapping[str, SpaceSaving], start: float | None, end: float) -> Any:
        """One window as the JSON-able record the store keeps."""
        tables = {}
        for name, table in window.items():
            s = table.summary(self.k)
            tables[name] = {
                "total": s.total,
                "floor": s.floor,
                "callers": [[c.item, c.estimate, c.error] for c in s.counted],
            }
        return {
            "v": _FORMAT,
            "worker": self.worker,
            "pid": os.getpid(),
            "every": self.every,
            "start": start,
            "end": end,
            "keys_shown": self.top.show_keys,
            "tables": tables,
        }

    async def publish(self) -> None:
        """End the current window now (on the store's clock) and hand it to the store."""
        now = await self.store.time()
        window = self.top.take_window()
        start, self.since = self.since, now
        text = json.dumps(self.record(window, start, now), separators=(",", ":"))
        await self.store.publish(self.worker, text, now, self.keep)

    async def start(self) -> None:
        """Publish every `every` seconds in a background task until `aclose` (once; on a loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.publish()
            except Exception as exc:  # for people only: never let it fail the app
                if not self._failing:
                    logger.warning(
                        "ratelimit top: could not publish (%s: %s); retrying",
                        type(exc).__name__,
                        exc,
                    )
                self._failing = True
            else:
                self._failing = False

    async def aclose(self) -> None:
        """Stop publishing and remove this worker's window (it no longer serves)."""
        if self._task is not None:
            await stop(self._task)
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.withdraw(self.worker), 1.0)


def publisher_for(
    top: TopCallers,
    store: TopStore | None,
    *,
    worker: str | None = None,
    every: float = DEFAULT_EVERY,
) -> TopPublisher | None:
    """A publisher to the backend's top store, or None when it has none (one process)."""
    return None if store is None else TopPublisher(top, store, worker=worker, every=every)


class FleetTable(NamedTuple):
    """One tracked name, merged over the live workers that track it."""

    #: Requests counted in the workers' windows.
    total: int
    #: How many workers' windows were merged.
    workers: int
    #: Whether callers are key text (every one of those workers opted in) or digests.
    keys_shown: bool
    #: The heaviest callers, heaviest first: count >= true count >= count - error.
    callers: list[Counted]


class FleetTop(NamedTuple):
    """What `read_fleet` found: the server time, the live workers' windows, merged tables."""

    time: float
    #: Per live worker: id, pid, every, start and end of its window (server time).
    workers: list[dict[str, Any]]
    tables: dict[str, FleetTable]


async def read_fleet(store: TopStore, *, name: str | None = None, n: int | None = None) -> FleetTop:
    """Read the live workers' last windows from `store` and merge them (see `merge_windows`)."""
    now, windows = await store.windows()
    return merge_windows(now, windows, name=name, n=n)


def merge_windows(
    now: float, windows: Sequence[str], *, name: str | None = None, n: int | None = None
) -> FleetTop:
    """Merge the workers' windows (JSON texts; every tracked name, or `name`); `n` callers each.

    Space-Saving tables merge by summing (see `heavy_hitters.merge`): a caller's
    count is the sum of its counts, its error the sum of its errors, and a
    worker whose table left the caller out adds its floor to both. If some of
    the workers tracking a name show key text and others digests, the text is
    digested here so the same caller merges (and its key is not shown).
    """
    records: list[dict[str, Any]] = []
    for raw in windows:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            record = json.loads(raw)
            if record.get("v") == _FORMAT and isinstance(record.get("tables"), dict):
                records.append(record)
    by_name: dict[str, list[tuple[bool, Summary]]] = {}
    for record in records:
        for table_name, t in record["tables"].items():
            if name is not None and table_name != name:
                continue
            with contextlib.suppress(ValueError, TypeError, KeyError):
                summary = Summary(
                    int(t["total"]),
                    int(t["floor"]),
                    tuple(Counted(str(i), int(c), int(e)) for i, c, e in t["callers"]),
                )
                by_name.setdefault(table_name, []).append(
                    (record.get("keys_shown") is True, summary)
                )
    tables: dict[str, FleetTable] = {}
    for table_name, shown in sorted(by_name.items()):
        keys_shown = all(s for s, _ in shown)
        summaries = [s if keys_shown or not text else _digested(s) for text, s in shown]
        total, merged = merge(summaries)
        tables[table_name] = FleetTable(
            total, len(summaries), keys_shown, merged if n is None else merged[:n]
        )
    described = [{k: r.get(k) for k in ("worker", "pid", "every", "start", "end")} for r in records]
    return FleetTop(now, described, tables)


def _digested(summary: Summary) -> Summary:
    """The same summary with key text replaced by the backend's digests."""
    return summary._replace(
        counted=tuple(c._replace(item=_digest(c.item)) for c in summary.counted)
    )
