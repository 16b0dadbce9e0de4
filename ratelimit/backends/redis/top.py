"""The workers' top-callers windows in Redis, for `ratelimit top`.

Each worker's last window is a string (its JSON) expiring `keep` seconds
after it is written, and an index (sorted set) holds each worker's last
publish time; both share one hash tag (one cluster slot), named by
`Keyspace`. A worker that dies stops refreshing its window and vanishes
within `keep` seconds; one that shuts down cleanly withdraws it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from .keyspace import Keyspace

__all__ = ["RedisTopStore"]

#: Index entries older than this many seconds are dropped by the next publish.
INDEX_KEEP = 300.0


class RedisClient(Protocol):
    """The redis.asyncio client methods this module calls (`Redis`, or `RedisCluster`)."""

    def time(self) -> Awaitable[Any]: ...
    def pipeline(self, transaction: bool = True) -> Any: ...


class RedisTopStore:
    """Top-callers windows of the fleet, in Redis under a backend's prefix."""

    def __init__(self, client: RedisClient, prefix: str | Keyspace) -> None:
        self.client = client
        self.keys = prefix if isinstance(prefix, Keyspace) else Keyspace(prefix)

    async def time(self) -> float:
        sec, usec = await self.client.time()
        return int(sec) + int(usec) / 1e6

    async def publish(self, worker: str, text: str, at: float, keep: float) -> None:
        """One pipeline: the window, the index entry, the index tidied and kept alive."""
        seen = self.keys.top_seen
        pipe = self.client.pipeline(transaction=False)
        try:
            pipe.set(self.keys.top_window(worker), text, px=int(keep * 1000))
            pipe.zadd(seen, {worker: at})
            pipe.zremrangebyscore(seen, "-inf", at - INDEX_KEEP)
            pipe.pexpire(seen, int(INDEX_KEEP * 1000))
            await pipe.execute()
        finally:
            await pipe.reset()

    async def withdraw(self, worker: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        try:
            pipe.delete(self.keys.top_window(worker))
            pipe.zrem(self.keys.top_seen, worker)
            await pipe.execute()
        finally:
            await pipe.reset()

    async def windows(self) -> tuple[float, list[str]]:
        """The server time and the windows still stored, in worker order (expired: left out)."""
        now = await self.time()
        pipe = self.client.pipeline(transaction=False)
        try:
            pipe.zrange(self.keys.top_seen, 0, -1)
            (listed,) = await pipe.execute()
            workers = sorted(_text(w) for w in listed)
            for w in workers:
                pipe.get(self.keys.top_window(w))
            raws = await pipe.execute() if workers else []
        finally:
            await pipe.reset()
        return now, [_text(raw) for raw in raws if raw is not None]


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
