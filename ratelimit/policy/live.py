"""Live overrides in a running app: where they are stored, and how every worker applies them.

`LiveOverrides` is a middleware's `overrides`: `set`, `clear` and `list`
overrides from Python; each change is checked against the app's rules first
(a malformed or ill-fitting override never reaches the store), then stored,
then applied. Applying means handing the effective rules (`Resolution`) to a
callback, which swaps the engine's compiled plans: nothing is looked up per
request. Overrides lapse by themselves at `expires_at` (a timer re-applies),
and the store's clock decides when, not each worker's.

Two stores:

- `MemoryOverrideStore`: this process only (the `MemoryBackend`'s): a change
  applies before `set` returns.
- `RedisOverrideStore`: the fleet's (the `RedisBackend`'s), in Redis under
  the backend's prefix::

      <prefix>:{overrides}          hash: slot ("rule/limit", "rule/*", "rule/!")
                                    -> the override's JSON; "#version" -> a counter
      <prefix>:overrides            pub/sub channel: the new version, after each change
      <prefix>:{overrides}:workers  hash: worker id -> what it applied, and when
      <prefix>:{overrides}:seen     sorted set: worker id -> last report (server time)

  Every change is one MULTI/EXEC (under WATCH) that also drops lapsed entries
  and increments the version, then a PUBLISH. Each worker subscribes and
  re-reads the hash when a new version is announced (milliseconds); it also
  reads the version every `resync` seconds as a safety net against a lost
  message, and the whole hash when it (re)connects, so overrides survive app
  restarts and Redis blips. The three keys share one hash tag, so they work
  on Redis Cluster too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias

from .._errors import ConfigError
from .._types import Clock
from .overrides import Effective, Override, Resolution, check_override, describe_limit, resolve
from .overrides import next_expiry as _next_expiry
from .rules import Rule

logger = logging.getLogger("ratelimit")

__all__ = [
    "LiveOverrides",
    "MemoryOverrideStore",
    "OverrideStore",
    "RedisOverrideStore",
    "Snapshot",
    "store_for",
]

#: Seconds between version checks of a Redis store (the safety net under pub/sub).
DEFAULT_RESYNC = 1.0
#: Seconds between a worker's reports (what it applied) in a Redis store.
REPORT_EVERY = 5.0
#: Reports older than this are dropped by the next worker that reports.
REPORT_KEEP = 300.0
#: Seconds `start` waits for the first read of the store before serving on the configuration.
START_TIMEOUT = 2.0
_VERSION = "#version"


class Snapshot(NamedTuple):
    """What a store holds at one moment: its version, overrides, and entries it could not read."""

    version: str | None
    overrides: tuple[Override, ...]
    #: (slot, error) of stored entries that are not valid overrides (ignored).
    unreadable: tuple[tuple[str, ConfigError], ...] = ()


#: A list of overrides (an alias: `LiveOverrides.list` shadows the builtin in its class).
Overrides: TypeAlias = "list[Override]"

#: Called with an announced version (None: re-read whatever it is).
Refresh = Callable[[str | None], Awaitable[object]]


class OverrideStore(Protocol):
    """Where overrides are kept. `shared`: other processes see and change them too."""

    shared: bool

    def now(self) -> float:
        """The store's clock, in seconds since the epoch: what `expires_at` is measured on."""
        ...

    async def load(self) -> Snapshot:
        """Everything stored now (lapsed entries may still be there; readers filter them)."""
        ...

    async def put(self, override: Override) -> str:
        """Store `override` in its slot (replacing what was there); return the new version."""
        ...

    async def clear(self, rule: str, limit: str | None) -> tuple[list[Override], str | None]:
        """Remove the rule's overrides (`limit`: only that limit's); return them and the version."""
        ...

    async def watch(self, refresh: Refresh) -> None:
        """Call `refresh` whenever another process may have changed the store (until cancelled)."""
        ...

    async def report(self, worker: str, data: Mapping[str, Any]) -> None:
        """Publish what this worker applied (for `ratelimit status`); a no-op when not shared."""
        ...

    async def aclose(self) -> None:
        """Release what the store opened."""
        ...


class MemoryOverrideStore:
    """Overrides of this process only: the `MemoryBackend`'s store."""

    shared = False

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._slots: dict[str, Override] = {}
        self._version = 0

    def now(self) -> float:
        return self._clock()

    async def load(self) -> Snapshot:
        return Snapshot(str(self._version), tuple(self._slots.values()))

    async def put(self, override: Override) -> str:
        now = self.now()
        self._slots = {s: o for s, o in self._slots.items() if not o.expired(now)}
        self._slots[override.slot] = override
        self._version += 1
        return str(self._version)

    async def clear(self, rule: str, limit: str | None) -> tuple[list[Override], str | None]:
        gone = [o for o in self._slots.values() if _clears(o.slot, rule, limit)]
        if not gone:
            return [], str(self._version)
        for o in gone:
            del self._slots[o.slot]
        self._version += 1
        return gone, str(self._version)

    async def watch(self, refresh: Refresh) -> None:
        return None  # nobody else writes this store

    async def report(self, worker: str, data: Mapping[str, Any]) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _clears(slot: str, rule: str, limit: str | None) -> bool:
    """Whether clearing `rule` (and `limit`) removes the entry in `slot`."""
    name, _, target = slot.partition("/")
    return name == rule and (limit is None or target == limit)


class _Pipeline(Protocol):
    """The redis-py pipeline methods this module calls."""

    async def watch(self, *names: str) -> Any: ...
    async def hgetall(self, name: str) -> Any: ...  # immediate mode, after watch
    def multi(self) -> None: ...
    async def execute(self) -> list[Any]: ...
    async def reset(self) -> None: ...


class _PubSub(Protocol):
    async def subscribe(self, *channels: str) -> Any: ...
    async def get_message(
        self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0
    ) -> dict[str, Any] | None: ...
    async def aclose(self) -> None: ...


class RedisClient(Protocol):
    """The redis.asyncio client methods this module calls (`Redis`, or `RedisCluster`)."""

    async def hgetall(self, name: str) -> Any: ...
    async def hget(self, name: str, key: str) -> Any: ...
    async def time(self) -> Any: ...
    async def publish(self, channel: str, message: str) -> Any: ...
    def pipeline(self, transaction: bool = True) -> Any: ...
    def pubsub(self) -> Any: ...


class RedisOverrideStore:
    """The fleet's overrides in Redis: a hash, a version, pub/sub (see the module docstring)."""

    shared = True

    def __init__(self, client: RedisClient, prefix: str, *, resync: float = DEFAULT_RESYNC) -> None:
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ConfigError("prefix", "a key prefix without braces", prefix)
        if not isinstance(resync, (int, float)) or isinstance(resync, bool) or not resync > 0:
            raise ConfigError("resync", "a number of seconds > 0", resync)
        self.client = client
        self.prefix = prefix
        self.key = f"{prefix}:{{overrides}}"
        self.channel = f"{prefix}:overrides"
        self.workers_key = f"{prefix}:{{overrides}}:workers"
        self.seen_key = f"{prefix}:{{overrides}}:seen"
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

    async def load(self) -> Snapshot:
        raw = await self.client.hgetall(self.key)
        await self.sync_clock()
        return _parse(raw)

    async def put(self, override: Override) -> str:
        text = override.to_json()
        version, _ = await self._change(lambda slots: ({override.slot: text}, []))
        assert version is not None
        return version

    async def clear(self, rule: str, limit: str | None) -> tuple[list[Override], str | None]:
        removed: list[Override] = []

        def plan(slots: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
            removed.clear()
            gone = [s for s in slots if _clears(s, rule, limit)]
            for s in gone:
                with contextlib.suppress(ConfigError):
                    removed.append(Override.from_json(slots[s]))
            return {}, gone

        version, changed = await self._change(plan)
        return (removed if changed else []), version

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
                    lapsed = [s for s, v in slots.items() if s not in sets and _lapsed(v, now)]
                    drop = sorted(set(deletes) | set(lapsed))
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

    async def _tidy(self, lapsed: list[str]) -> str | None:
        """Drop lapsed entries (a version bump, announced, so workers re-read)."""
        pipe = self.client.pipeline(transaction=True)
        try:
            pipe.hdel(self.key, *lapsed)
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

    async def reports(self, within: float = 3 * REPORT_EVERY) -> dict[str, dict[str, Any]]:
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


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for it to end, cancelling again if a cancellation was absorbed."""
    for _ in range(20):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
            return
    logger.warning("ratelimit overrides: a background task did not stop: %r", task)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _lapsed(text: str, now: float) -> bool:
    """Whether the stored JSON `text` is an override that has lapsed at `now`."""
    try:
        expires = json.loads(text).get("expires_at")
    except (ValueError, AttributeError):
        return False  # not ours to judge: leave it for a person to look at
    return isinstance(expires, (int, float)) and now >= expires


def _parse(raw: Mapping[Any, Any]) -> Snapshot:
    version: str | None = None
    found: list[Override] = []
    bad: list[tuple[str, ConfigError]] = []
    for k, v in raw.items():
        slot = _text(k)
        if slot == _VERSION:
            version = _text(v)
            continue
        try:
            override = Override.from_json(_text(v))
        except ConfigError as exc:
            bad.append((slot, exc))
            continue
        if override.slot != slot:
            expected = f"the override's own slot {override.slot!r}"
            bad.append((slot, ConfigError("slot", expected, slot)))
            continue
        found.append(override)
    found.sort(key=lambda o: o.slot)
    return Snapshot(version, tuple(found), tuple(bad))


class _RedisBacked(Protocol):
    client: Any
    prefix: str


def store_for(backend: object) -> OverrideStore:
    """The override store that matches a backend: its Redis (and prefix), or this process."""
    client = getattr(backend, "client", None)
    prefix = getattr(backend, "prefix", None)
    if client is not None and hasattr(client, "pubsub") and isinstance(prefix, str):
        return RedisOverrideStore(client, prefix)
    return MemoryOverrideStore()


#: Receives the effective rules each time they change (the middleware swaps its plans).
ApplyHook = Callable[[Resolution], None]


class LiveOverrides:
    """The overrides of one app: set, clear and list them; every change re-applies the rules.

    `rules` are the configured rules; `apply` receives the effective ones
    whenever they change (a set or clear here or in another worker, a lapse).
    With a shared store, `start()` reads the store and starts watching it; the
    middleware calls it at start-up (lifespan) or on the first request.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        store: OverrideStore,
        apply: ApplyHook,
        *,
        worker: str | None = None,
    ) -> None:
        self.rules = tuple(rules)
        self.store = store
        self._apply = apply
        #: This process's name in the store's reports: host, pid and a random tag.
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._overrides: tuple[Override, ...] = ()
        #: The store version applied last (None: not read yet).
        self.version: str | None = None
        self.resolution = resolve(self.rules, (), 0.0)
        self._applied_key: tuple[tuple[Override, ...], ...] = tuple(() for _ in self.rules)
        #: `time.time()` when the rules last changed by an override (None: never): for
        #: measuring how fast a change reaches every worker.
        self.applied_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._started = False
        self._lock: asyncio.Lock | None = None
        self._warned: set[tuple[str, str]] = set()
        self._pending: set[asyncio.Task[None]] = set()

    # -- reading ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether `start` ran (a shared store is then watched)."""
        return self._started

    def effective(self, rule: str) -> Effective:
        """How the rule named `rule` stands now (KeyError for an unknown name)."""
        return self.resolution.by_name()[rule]

    def list(self) -> Overrides:
        """The overrides in force now, as this process last read them from the store."""
        now = self.store.now()
        return [o for o in self._overrides if not o.expired(now)]

    # -- changing -----------------------------------------------------------------

    async def set(
        self,
        rule: str,
        limit: str | None = None,
        *,
        rate: str | None = None,
        burst: int | None = None,
        slots: int | None = None,
        queue: int | None = None,
        timeout: float | None = None,
        factor: float | None = None,
        block: bool = False,
        message: str | None = None,
        shadow: bool | None = None,
        expires_in: float | None = None,
        expires_at: float | None = None,
        until_cleared: bool = False,
        reason: str | None = None,
    ) -> Override:
        """Override `rule` (or one of its limits) now; return the override as stored.

        Exactly one of `expires_in` (seconds from now, on the store's clock),
        `expires_at` (epoch seconds) or `until_cleared=True` must be given: a
        temporary change is never made permanent by omission.
        """
        given = (("expires_in", expires_in), ("expires_at", expires_at))
        when = [name for name, value in given if value is not None]
        if until_cleared:
            when.append("until_cleared")
        if len(when) != 1:
            raise ConfigError(
                "expires_in",
                "exactly one of expires_in=seconds, expires_at=epoch seconds or until_cleared=True",
                when or None,
            )
        now = self.store.now()
        if expires_in is not None:
            if (
                not isinstance(expires_in, (int, float))
                or isinstance(expires_in, bool)
                or not 0 < expires_in < float("inf")
            ):
                raise ConfigError("expires_in", "a number of seconds > 0", expires_in)
            expires_at = now + float(expires_in)
        override = Override(
            rule,
            limit,
            rate=rate,
            burst=burst,
            slots=slots,
            queue=queue,
            timeout=timeout,
            factor=factor,
            block=block,
            message=message,
            shadow=shadow,
            expires_at=expires_at,
            reason=reason,
            created_at=now,
            created_by=f"python@{self.worker}",
        )
        return await self.put(override)

    async def put(self, override: Override) -> Override:
        """Store and apply a ready-made `Override`, after checking it fits the rules.

        `ConfigError` (naming the field) if it does not fit or has already lapsed;
        nothing is stored then.
        """
        if not isinstance(override, Override):
            raise ConfigError("override", "an Override", override)
        check_override(override, self.rules)
        if override.expired(self.store.now()):
            raise ConfigError("expires_at", "a time in the future", override.expires_at)
        await self.store.put(override)
        await self.refresh(None)
        return override

    async def clear(self, rule: str, limit: str | None = None) -> Overrides:
        """Remove the overrides of `rule` (or of its limit `limit`); return those removed."""
        if not isinstance(rule, str):
            raise ConfigError("rule", "a rule name", rule)
        removed, _ = await self.store.clear(rule, limit)
        await self.refresh(None)
        return removed

    # -- keeping current ----------------------------------------------------------

    async def refresh(self, announced: str | None = None) -> bool:
        """Re-read the store unless `announced` is the version already applied.

        Returns whether the effective rules changed. The store's watcher calls
        it on each announcement and periodically; `set` and `clear` after writing.
        """
        if announced is not None and announced == (self.version or ""):
            return False
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            snapshot = await self.store.load()
            for slot, exc in snapshot.unreadable:
                self._warn_once(slot, f"stored override {slot} is unreadable, ignored: {exc}")
            self._overrides = snapshot.overrides
            self.version = snapshot.version
            return self._reapply()

    def _reapply(self) -> bool:
        """Resolve the overrides against the rules at the store's now; apply if anything changed."""
        now = self.store.now()
        resolution = resolve(self.rules, self._overrides, now)
        for o, exc in resolution.problems:
            self._warn_once(o.slot, f"override {o.slot} ({o.describe()}) ignored: {exc}")
        key = tuple(e.overrides for e in resolution.rules)
        changed = key != self._applied_key
        if changed:
            self._apply(resolution)
            self.resolution = resolution
            self._applied_key = key
            self.applied_at = time.time()
            for e in resolution.rules:
                if e.changed:
                    logger.info(
                        "ratelimit overrides: rule %s now %s",
                        e.rule.name,
                        "; ".join(f"{o.slot} {o.describe()}" for o in e.overrides),
                    )
            self._report_soon()
        self._schedule(now)
        return changed

    def _schedule(self, now: float) -> None:
        """Re-apply when the next override in force lapses (no store read needed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = _next_expiry(self._overrides, now)
        if at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - refresh always runs on a loop
            return
        self._timer = loop.call_later(max(0.0, at - now) + 0.001, self._lapse)

    def _lapse(self) -> None:
        self._timer = None
        try:
            self._reapply()
        except Exception:  # a timer callback must not die silently
            logger.exception("ratelimit overrides: could not re-apply after a lapse")

    def _warn_once(self, slot: str, text: str) -> None:
        if (slot, text) not in self._warned:
            self._warned.add((slot, text))
            logger.warning("ratelimit overrides: %s", text)

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Read the store (at most `timeout` s) and, if it is shared, start watching it.

        Called once, on the running loop; later calls return at once. If the
        store cannot be read in time the app starts on its configuration and
        the watcher keeps trying in the background.
        """
        if self._started:
            return
        self._started = True
        if not self.store.shared:
            return
        try:
            await asyncio.wait_for(self.refresh(None), timeout)
        except Exception as exc:
            logger.warning(
                "ratelimit overrides: could not read the store at start-up (%s: %s); "
                "serving on the configuration until it answers",
                type(exc).__name__,
                exc,
            )
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self.store.watch(self.refresh))
        self._reporter = loop.create_task(self._report_loop())

    def _report_soon(self) -> None:
        if self.store.shared and self._started:
            with contextlib.suppress(RuntimeError):
                task = asyncio.get_running_loop().create_task(self._report())
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    async def _report_loop(self) -> None:
        while True:
            await self._report()
            await asyncio.sleep(REPORT_EVERY)

    async def _report(self) -> None:
        try:
            await self.store.report(self.worker, self.describe())
        except Exception as exc:  # reports are for people; never let them fail the app
            logger.debug("ratelimit overrides: report failed (%s)", exc)

    def describe(self) -> dict[str, Any]:
        """What this process enforces now, as plain data (its report, and `status --json`)."""
        rules: dict[str, Any] = {}
        for e in self.resolution.rules:
            names = e.configured.limit_names()
            limits = {}
            for name, conf, eff, shaper in zip(
                names, e.configured.limits, e.rule.limits, e.by_limit, strict=True
            ):
                limits[name] = {
                    "configured": describe_limit(conf),
                    "effective": describe_limit(eff),
                    "override": None if shaper is None else shaper.slot,
                }
            cost = e.rule.cost
            rules[e.rule.name] = {
                "path": e.rule.path,
                "cost": cost if isinstance(cost, int) else None,
                "shadow": e.rule.shadow,
                "blocked": e.block is not None,
                "limits": limits,
            }
        return {
            "worker": self.worker,
            "pid": os.getpid(),
            "version": self.version,
            "applied_at": self.applied_at,
            "rules": rules,
        }

    async def aclose(self) -> None:
        """Stop watching and cancel the lapse timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in (self._task, self._reporter):
            if task is not None and not task.done():
                await _stop(task)
        self._task = self._reporter = None
        for pending in list(self._pending):
            await _stop(pending)
        await self.store.aclose()
