"""The fleet's live overrides in Redis: a hash, a version, pub/sub, the workers' reports.

Keys (named by `Keyspace`; one hash tag, so they work on Redis Cluster too):
the overrides hash (slot -> the entry's JSON, "#version" -> a counter), the
channel announcing each new version, and the workers' reports with the time
each was last seen.

Every change is one MULTI/EXEC (under WATCH) that also drops lapsed entries
and increments the version, then a PUBLISH. Each worker subscribes and
re-reads the hash when a new version is announced (milliseconds); it also
reads the version every `resync` seconds as a safety net against a lost
message, and the whole hash when it (re)connects, so overrides survive app
restarts and Redis blips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from ..._errors import ConfigError
from ..stores import REPORTS_LIVE, Refresh, Stored, clears, lapsed
from .keyspace import Keyspace

logger = logging.getLogger("ratelimit")

__all__ = ["DEFAULT_RESYNC", "RedisOverrideStore"]

#: Seconds between version checks (the safety net under pub/sub).
DEFAULT_RESYNC = 1.0
#: Reports older than this are dropped by the next worker that reports.
REPORT_KEEP = 300.0
_VERSION = "#version"


class _PubSub(Protocol):
    async def subscribe(self, *channels: str) -> Any: ...
    async def get_message(
        self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0
    ) -> dict[str, Any] | None: ...
    async def aclose(self) -> None: ...


class RedisClient(Protocol):
    """The redis.asyncio client methods this module calls (`Redis`, or `RedisCluster`)."""

    def hgetall(self, name: str) -> Awaitable[Any]: ...
    def hget(self, name: str, key: str) -> Awaitable[Any]: ...
    def time(self) -> Awaitable[Any]: ...
    def publish(self, channel: str, message: str) -> Awaitable[Any]: ...
    def pipeline(self, transaction: bool = True) -> Any: ...
    def pubsub(self) -> Any: ...


class RedisOverrideStore:
    """The fleet's overrides in Redis (see the module docstring)."""

    shared = True

    def __init__(
        self, client: RedisClient, prefix: str | Keyspace, *, resync: float = DEFAULT_RESYNC
    ) -> None:
        keys = prefix if isinstance(prefix, Keyspace) else Keyspace(prefix)
        if not isinstance(resync, (int, float)) or isinstance(resync, bool) or not resync > 0:
            raise ConfigError("resync", "a number of seconds > 0", resync)
        self.client = client
        self.prefix = keys.prefix
        self.key = keys.overrides
        self.channel = keys.overrides_channel
        self.workers_key = keys.reports
        self.seen_key = keys.reports_seen
        self.resync = float(resync)
        #: Server clock minus ours, measured at each full read.
        self._offset = 0.0

    def now(self) -> float:
        return time.time() + self._offset

    async def sync_clock(self) -> float:
        """Read Redis's TIME and remember how far our clock is from it; return the server time."""
        before = time.time()
        sec, usec = await self.client.time()
        after = time.time()
        server = int(sec) + int(usec) / 1e6
        self._offset = server - (before + after) / 2
        return server

    async def load(self) -> Stored:
        raw = await self.client.hgetall(self.key)
        await self.sync_clock()
        entries = {_text(k): _text(v) for k, v in raw.items()}
        return Stored(entries.pop(_VERSION, None), entries)

    async def put(self, slot: str, text: str) -> str:
        version, _ = await self._change(lambda slots: ({slot: text}, []))
        assert version is not None
        return version

    async def clear(self, rule: str, limit: str | None) -> tuple[dict[str, str], str | None]:
        removed: dict[str, str] = {}

        def plan(slots: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
            removed.clear()
            removed.update({s: t for s, t in slots.items() if clears(s, rule, limit)})
            return {}, list(removed)

        version, changed = await self._change(plan)
        return (removed if changed else {}), version

    async def _change(
        self, plan: Callable[[Mapping[str, str]], tuple[dict[str, str], list[str]]]
    ) -> tuple[str | None, bool]:
        """One atomic change: WATCH, read, MULTI (set, delete, drop lapsed, bump), EXEC; PUBLISH.

        `plan(slots)` says what to set and delete given the stored JSON by slot.
        Returns the version after the change and whether anything changed.
        """
        from redis.exceptions import WatchError

        now = await self.sync_clock()
        pipe = self.client.pipeline(transaction=True)
        try:
            while True:
                try:
                    await pipe.watch(self.key)
                    raw = await pipe.hgetall(self.key)
                    slots = {_text(k): _text(v) for k, v in raw.items() if _text(k) != _VERSION}
                    sets, deletes = plan(slots)
                    gone = [s for s, v in slots.items() if s not in sets and lapsed(v, now)]
                    drop = sorted(set(deletes) | set(gone))
                    if not sets and not deletes:
                        await pipe.reset()
                        version = raw.get(_VERSION.encode(), raw.get(_VERSION))
                        if drop:  # nothing asked, but tidy up what lapsed
                            return await self._tidy(drop), False
                        return (None if version is None else _text(version)), False
                    pipe.multi()
                    if drop:
                        pipe.hdel(self.key, *drop)
                    if sets:
                        pipe.hset(self.key, mapping=sets)
                    pipe.hincrby(self.key, _VERSION, 1)
                    replies = await pipe.execute()
                    break
                except WatchError:
                    continue  # another writer got in between: read again
        finally:
            await pipe.reset()
        version = str(replies[-1])
        await self.client.publish(self.channel, version)
        return version, True

    async def _tidy(self, gone: list[str]) -> str | None:
        """Drop lapsed entries (a version bump, announced, so workers re-read)."""
        pipe = self.client.pipeline(transaction=True)
        try:
            pipe.hdel(self.key, *gone)
            pipe.hincrby(self.key, _VERSION, 1)
            replies = await pipe.execute()
        finally:
            await pipe.reset()
        version = str(replies[-1])
        await self.client.publish(self.channel, version)
        return version

    async def version(self) -> str | None:
        """The stored version alone (one HGET: the cheap periodic check)."""
        value = await self.client.hget(self.key, _VERSION)
        return None if value is None else _text(value)

    async def watch(self, refresh: Refresh) -> None:
        """Subscribe; re-read on each announcement, check the version every `resync` s.

        Reconnects after any error with a growing pause (0.1 s to 2 s), and
        re-reads everything after each (re)subscription: a change announced
        while disconnected is never missed.
        """
        pause = 0.1
        failing = False
        while True:
            pubsub: _PubSub | None = None
            try:
                pubsub = self.client.pubsub()
                await pubsub.subscribe(self.channel)
                await refresh(None)
                if failing:
                    logger.warning("ratelimit overrides: subscribed to %s again", self.channel)
                failing, pause = False, 0.1
                loop = asyncio.get_running_loop()
                next_check = loop.time() + self.resync
                while True:
                    wait = max(0.0, next_check - loop.time())
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                    if _cancel_requested():
                        # redis-py's read timeout can absorb a cancellation that lands
                        # as it expires: honour it here, or aclose() would wait forever.
                        raise asyncio.CancelledError
                    if message is not None and message.get("type") == "message":
                        await refresh(_text(message["data"]))
                    if loop.time() >= next_check:
                        version = await self.version()
                        await refresh("" if version is None else version)
                        next_check = loop.time() + self.resync
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    logger.warning(
                        "ratelimit overrides: lost %s (%s: %s); retrying",
                        self.channel,
                        type(exc).__name__,
                        exc,
                    )
                failing = True
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()

    async def report(self, worker: str, data: Mapping[str, Any]) -> None:
        now = self.now()
        pipe = self.client.pipeline(transaction=False)
        try:
            pipe.hset(self.workers_key, worker, json.dumps(data, separators=(",", ":")))
            pipe.zadd(self.seen_key, {worker: now})
            pipe.zrangebyscore(self.seen_key, "-inf", now - REPORT_KEEP)
            replies = await pipe.execute()
        finally:
            await pipe.reset()
        stale = [_text(w) for w in replies[-1]]
        if stale:
            pipe = self.client.pipeline(transaction=False)
            try:
                pipe.hdel(self.workers_key, *stale)
                pipe.zrem(self.seen_key, *stale)
                await pipe.execute()
            finally:
                await pipe.reset()

    async def reports(self, within: float = REPORTS_LIVE) -> dict[str, dict[str, Any]]:
        """Reports of the workers seen in the last `within` seconds, by worker id."""
        now = await self.sync_clock()
        pipe = self.client.pipeline(transaction=False)
        try:
            pipe.zrangebyscore(self.seen_key, now - within, "+inf")
            pipe.hgetall(self.workers_key)
            live, raw = await pipe.execute()
        finally:
            await pipe.reset()
        alive = {_text(w) for w in live}
        out: dict[str, dict[str, Any]] = {}
        for k, v in raw.items():
            worker = _text(k)
            if worker in alive:
                with contextlib.suppress(ValueError):
                    out[worker] = json.loads(v)
        return out

    async def aclose(self) -> None:
        return None  # the client belongs to the backend (or the CLI)


def _cancel_requested() -> bool:
    """Whether the running task was asked to cancel (Python 3.11+ can tell; 3.10 cannot)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling is not None and cancelling())


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
