"""The Redis backend: one Lua script call per decision and hash slot, on the server's clock.

Every state change is a script (see the `.lua` files beside this module), so
concurrent workers on many machines never read-modify-write from Python and
never disagree about time. Redis errors surface as `BackendError` with the
driver's exception as `__cause__`; deciding what to do then is the policy's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ..._errors import BackendError, ConfigError
from ..base import BucketCheck, Check, CheckResult, LeaseCheck, StoreKey, Verdict
from .keyspace import Keyspace
from .scripts import SCRIPTS, Script, ScriptSet

if TYPE_CHECKING:
    from limits.aio.storage import Storage

#: Default seconds to wait for a reply. A surge loads the workers' event loops
#: and Redis together; on a busy 2-core host the 99.9th percentile of a healthy
#: call reaches tens of ms, and a timeout there would turn load into failure
#: (fail-open admissions) exactly when limits matter. A dead Redis is caught
#: faster than any timeout: refused connections fail at once, and the circuit
#: breaker stops calling it.
DEFAULT_TIMEOUT = 0.25
#: Default seconds to open a TCP connection (loopback or LAN: 1 ms; more means trouble).
DEFAULT_CONNECT_TIMEOUT = 0.05


class RedisBackend:
    """Limiter state in Redis, shared by every worker that names the same URL and prefix.

    `url` is a redis-py URL (`redis://`, `rediss://`, `unix://`). `prefix` starts
    every key (and the `Window` storage's keys). `timeout` bounds the wait for a
    reply and `connect_timeout` a new connection, in seconds. An existing
    `redis.asyncio.Redis` may be passed as `client` (then `url`, the timeouts and
    `max_connections` are not used, and `aclose` leaves it open); the backend's own
    client never retries, so a failure is reported once, at once. `split_by_slot`
    decides each hash slot of a rule in its own script call, as Redis Cluster
    requires; on one server a rule is decided in one call, atomically.
    """

    #: The scripts this backend runs: the production clock. Tests subclass with a manual one.
    scripts: ClassVar[ScriptSet] = SCRIPTS

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "ratelimit",
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_connections: int = 64,
        client: Redis | None = None,
        split_by_slot: bool = False,
    ) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError("url", 'a Redis URL like "redis://127.0.0.1:6379/0"', url)
        self.url = url
        self.keys = Keyspace(prefix)
        self.prefix = prefix
        self.timeout = _seconds("timeout", timeout)
        self.connect_timeout = _seconds("connect_timeout", connect_timeout)
        if (
            not isinstance(max_connections, int)
            or isinstance(max_connections, bool)
            or (max_connections < 1)
        ):
            raise ConfigError("max_connections", "a positive integer", max_connections)
        self.split_by_slot = bool(split_by_slot)
        self._owns_client = client is None
        if client is None:
            client = Redis.from_url(
                url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.connect_timeout,
                max_connections=max_connections,
                retry=Retry(NoBackoff(), 0),
            )
        self.client = client
        self._storage: Storage | None = None

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r})"

    # -- the Backend protocol ---------------------------------------------------

    async def decide(self, checks: Sequence[Check]) -> Verdict:
        """All-or-nothing over `checks`: one script call per hash slot (one call on one server)."""
        if not checks:
            return Verdict(True, ())
        groups = self._groups(checks)
        if len(groups) == 1:
            keys, args = self._decide_args(checks, "1")
            verdict, results = _parse_decide(await self._eval(self.scripts.decide, keys, args))
            return Verdict(verdict, tuple(results))
        return await self._decide_slots(checks, groups)

    async def refund(self, checks: Sequence[Check]) -> None:
        """Give back what an admitted `decide` of `checks` took, one call per slot."""
        for group in self._groups(checks):
            keys, args = self._decide_args([checks[i] for i in group], "1")
            await self._eval(self.scripts.refund, keys, args)

    async def renew(self, leases: Sequence[LeaseCheck]) -> list[bool]:
        """Extend each live lease to now + its ttl, one call per slot; False for a lost lease."""
        alive = [False] * len(leases)
        for group in self._groups(leases):
            keys = [self.keys.leases(leases[i].key) for i in group]
            args: list[str] = []
            for i in group:
                args += (repr(leases[i].ttl), leases[i].lease_id)
            reply = await self._eval(self.scripts.renew, keys, args)
            for i, ok in zip(group, reply, strict=True):
                alive[i] = ok == 1
        return alive

    async def release(self, lease: LeaseCheck) -> bool:
        """Free a lease's slot; False if it was not held (released before, or expired)."""
        reply = await self._eval(
            self.scripts.release, [self.keys.leases(lease.key)], [lease.lease_id]
        )
        return bool(reply == 1)

    async def in_use(self, key: StoreKey) -> int:
        """Live leases under `key`, counted on the server's clock."""
        return int(await self._eval(self.scripts.in_use, [self.keys.leases(key)], []))

    def window_storage(self) -> Storage:
        """The `limits` async Redis storage on this backend's connections and prefix."""
        if self._storage is None:
            from limits.aio.storage import RedisStorage

            options: dict[str, Any] = {"connection_pool": self.client.connection_pool}
            self._storage = RedisStorage(
                _limits_uri(self.url),
                implementation="redispy",
                key_prefix=f"{self.prefix}:window",
                **options,
            )
        return self._storage

    async def aclose(self) -> None:
        """Close the connections this backend opened (a passed-in client stays open)."""
        if self._owns_client:
            await self.client.aclose()

    # -- internals --------------------------------------------------------------

    def _groups(self, checks: Sequence[Check]) -> list[list[int]]:
        """Indices of `checks` per script call: per hash tag when split, else all in one."""
        if not self.split_by_slot:
            return [list(range(len(checks)))]
        by_tag: dict[str, list[int]] = {}
        tag = self.keys.tag
        for i, check in enumerate(checks):
            by_tag.setdefault(tag(check.key), []).append(i)
        return list(by_tag.values())

    def _decide_args(self, checks: Sequence[Check], commit: str) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of decide.lua (and refund.lua) for `checks`."""
        keys: list[str] = []
        args = [commit]
        for check in checks:
            if isinstance(check, BucketCheck):
                keys.append(self.keys.bucket(check.key))
                args += ("t", repr(check.interval), str(check.burst), str(check.cost))
            else:
                keys.append(self.keys.leases(check.key))
                args += ("l", str(check.limit), repr(check.ttl), check.lease_id)
        return keys, args

    async def _decide_slots(self, checks: Sequence[Check], groups: list[list[int]]) -> Verdict:
        """Decide slot by slot; if one refuses, refund the slots before it.

        Not atomic across slots: between a slot's admission and its refund,
        another request may see those units taken. Every result still describes
        the untouched state of its check, as the protocol requires: slots other
        than the refusing one are re-read in a dry run.
        """
        results: list[CheckResult | None] = [None] * len(checks)
        for g, group in enumerate(groups):
            keys, args = self._decide_args([checks[i] for i in group], "1")
            verdict, group_results = _parse_decide(
                await self._eval(self.scripts.decide, keys, args)
            )
            for i, result in zip(group, group_results, strict=True):
                results[i] = result
            if verdict:
                continue
            for done in groups[:g]:
                keys, args = self._decide_args([checks[i] for i in done], "1")
                await self._eval(self.scripts.refund, keys, args)
            for other in groups[:g] + groups[g + 1 :]:
                keys, args = self._decide_args([checks[i] for i in other], "0")
                _, other_results = _parse_decide(await self._eval(self.scripts.decide, keys, args))
                for i, result in zip(other, other_results, strict=True):
                    results[i] = result
            return Verdict(False, tuple(r for r in results if r is not None))
        return Verdict(True, tuple(r for r in results if r is not None))

    async def _eval(self, script: Script, keys: list[str], args: list[str]) -> Any:
        """EVALSHA `script`; load it and retry once if the server lost it (NOSCRIPT)."""
        client = self.client
        try:
            try:
                return await client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await client.script_load(script.source)
                return await client.evalsha(script.sha, len(keys), *keys, *args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendError(f"redis {script.name}: {exc}") from exc


def _parse_decide(reply: list[Any]) -> tuple[bool, list[CheckResult]]:
    """The verdict and per-check results of a decide.lua reply."""
    return reply[0] == 1, [
        CheckResult(reply[k] == 1, int(reply[k + 1]), float(reply[k + 2]), float(reply[k + 3]))
        for k in range(1, len(reply), 4)
    ]


def _limits_uri(url: str) -> str:
    """The `limits` storage URI for a redis-py URL (`redis://...` -> `async+redis://...`)."""
    if url.startswith("unix://"):
        return "async+redis+unix://" + url.removeprefix("unix://")
    return f"async+{url}"


def _seconds(field: str, value: object) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(field, "a number of seconds > 0", value)
    return float(value)
