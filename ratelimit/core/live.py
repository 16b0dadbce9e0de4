"""Live overrides in a running app: how every worker applies them.

`LiveOverrides` is a middleware's `overrides`: `set`, `clear` and `list`
overrides from Python; each change is checked against the app's rules first
(a malformed or ill-fitting override never reaches the store), then stored,
then applied. Applying means handing the effective rules (`Resolution`) to a
callback, which swaps the engine's compiled plans: nothing is looked up per
request. Overrides lapse by themselves at `expires_at` (a timer re-applies),
and the store's clock decides when, not each worker's.

The store is the backend's (`backends.stores.OverrideStore`, from
`backend.override_store()`): the `MemoryBackend`'s holds this process's
overrides, the `RedisBackend`'s the fleet's, announcing each change to every
worker. This module never talks to Redis: it reads and writes override
entries (JSON text by slot) through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from .._errors import ConfigError
from .._tasks import stop
from ..policy.effective import Effective, Resolution, check_override, describe_limit, resolve
from ..policy.effective import next_expiry as _next_expiry
from ..policy.overrides import Override
from ..policy.rules import Rule

if TYPE_CHECKING:
    from ..backends.stores import OverrideStore, Stored

logger = logging.getLogger("ratelimit")

__all__ = ["LiveOverrides", "Snapshot", "snapshot"]

#: Seconds between a worker's reports (what it applied) to a shared store.
REPORT_EVERY = 5.0
#: Seconds `start` waits for the first read of the store before serving on the configuration.
START_TIMEOUT = 2.0


class Snapshot(NamedTuple):
    """What a store holds at one moment: its version, overrides, and entries it could not read."""

    version: str | None
    overrides: tuple[Override, ...]
    #: (slot, error) of stored entries that are not valid overrides (ignored).
    unreadable: tuple[tuple[str, ConfigError], ...] = ()


#: A list of overrides (an alias: `LiveOverrides.list` shadows the builtin in its class).
Overrides: TypeAlias = "list[Override]"


def snapshot(stored: Stored) -> Snapshot:
    """Read a store's entries as overrides (sorted by slot), setting aside the unreadable."""
    found: list[Override] = []
    bad: list[tuple[str, ConfigError]] = []
    for slot, text in stored.entries.items():
        try:
            override = Override.from_json(text)
        except ConfigError as exc:
            bad.append((slot, exc))
            continue
        if override.slot != slot:
            expected = f"the override's own slot {override.slot!r}"
            bad.append((slot, ConfigError("slot", expected, slot)))
            continue
        found.append(override)
    found.sort(key=lambda o: o.slot)
    return Snapshot(stored.version, tuple(found), tuple(bad))


def removed(entries: Mapping[str, str]) -> Overrides:
    """The readable overrides among entries a store removed."""
    out = []
    for text in entries.values():
        with contextlib.suppress(ConfigError):
            out.append(Override.from_json(text))
    return out


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

    def add(self, rule: Rule) -> None:
        """Add `rule` after the others, before `start` (the engine adds it too)."""
        if self._started:
            raise ConfigError("rule", "a rule added before the overrides start", rule.name)
        self.rules = (*self.rules, rule)
        self.resolution = resolve(self.rules, (), 0.0)
        self._applied_key = (*self._applied_key, ())

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
        await self.store.put(override.slot, override.to_json())
        await self.refresh(None)
        return override

    async def clear(self, rule: str, limit: str | None = None) -> Overrides:
        """Remove the overrides of `rule` (or of its limit `limit`); return those removed."""
        if not isinstance(rule, str):
            raise ConfigError("rule", "a rule name", rule)
        gone, _ = await self.store.clear(rule, limit)
        await self.refresh(None)
        return removed(gone)

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
            read = snapshot(await self.store.load())
            for slot, exc in read.unreadable:
                self._warn_once(slot, f"stored override {slot} is unreadable, ignored: {exc}")
            self._overrides = read.overrides
            self.version = read.version
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
                await stop(task)
        self._task = self._reporter = None
        for pending in list(self._pending):
            await stop(pending)
        await self.store.aclose()
