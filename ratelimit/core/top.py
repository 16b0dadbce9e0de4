"""The heaviest callers, fleet-wide: publishing a `TopCallers`' windows to the backend's top
store, and reading the live workers' windows back (`ratelimit top`); see `policy.top`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .._errors import ConfigError
from .._tasks import stop
from ..algorithms.heavy_hitters import Counted, SpaceSaving, Summary, merge
from ..backends.stores import TopStore
from ..policy.keys import digest as _digest
from ..policy.top import _FORMAT, DEFAULT_EVERY, TopCallers

logger = logging.getLogger("ratelimit")


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
