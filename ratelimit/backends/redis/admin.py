"""What the `ratelimit` command reads and resets in Redis, over every caller of a limit.

Per-caller state is found by SCAN (patterns from `Keyspace`), never KEYS: a
status read walks the keyspace in batches without blocking the server. On a
cluster, redis-py scans every primary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from redis.asyncio import Redis, RedisCluster

from ..base import StoreKey
from .keyspace import Keyspace

__all__ = ["RedisAdmin"]

#: Keys asked for per SCAN step.
_SCAN_COUNT = 1000


class Counted(Protocol):
    """What the admin reads go through: a `RedisBackend`'s keys, client and counts."""

    @property
    def keys(self) -> Keyspace: ...
    @property
    def client(self) -> Redis | RedisCluster: ...
    async def in_use(self, key: StoreKey) -> int: ...
    async def queue_length(self, key: StoreKey) -> int: ...


class RedisAdmin:
    """Admin reads over a `RedisBackend`'s keys (every caller, every worker)."""

    def __init__(self, backend: Counted) -> None:
        self.backend = backend
        self.keys = backend.keys

    async def in_use(self, rule: str, limit: str, shared: bool) -> int:
        return await self._sum(rule, limit, shared, "leases", self.backend.in_use)

    async def waiting(self, rule: str, limit: str, shared: bool) -> int:
        return await self._sum(rule, limit, shared, "line", self.backend.queue_length)

    async def forget(self, caller: str, rule: str | None, limit: str | None) -> list[str]:
        client = self.backend.client
        if rule is not None and limit is not None:
            found = [self.keys.bucket(StoreKey(rule, limit, caller))]
        else:
            found = [name async for name in self._scan(self.keys.of_caller(caller, rule, "tat"))]
        deleted = []
        for name in sorted(set(found)):
            if await client.delete(name):
                deleted.append(name)
        return deleted

    async def _sum(
        self,
        rule: str,
        limit: str,
        shared: bool,
        kind: str,
        count: Callable[[StoreKey], Awaitable[int]],
    ) -> int:
        """`count` of the shared key, or summed over every caller with a `kind` key."""
        if shared:
            return int(await count(StoreKey(rule, limit, "*")))
        total = 0
        async for name in self._scan(self.keys.callers(rule, limit, kind)):
            key = self.keys.store_key(name, kind)
            if key is not None:
                total += int(await count(key))
        return total

    async def _scan(self, pattern: str) -> AsyncIterator[str]:
        async for raw in self.backend.client.scan_iter(match=pattern, count=_SCAN_COUNT):
            yield raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
