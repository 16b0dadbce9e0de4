"""The `MemoryBackend`'s admin reads, over this process's callers.

Its override store is `stores.MemoryOverrideStore` (the fallback of every
backend); it has no top-callers windows to publish (one process: `top_app`
shows its tables).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping

from .base import StoreKey

__all__ = ["MemoryAdmin"]


#: How many live leases, or live tickets in line, a key has.
Count = Callable[[StoreKey], Awaitable[int]]


class MemoryAdmin:
    """Admin reads over a `MemoryBackend`'s keys (this process's callers): its buckets,
    the keys of its lease tables and lines, and its two counts."""

    def __init__(
        self,
        buckets: MutableMapping[StoreKey, float],
        leases: Mapping[StoreKey, object],
        lines: Mapping[StoreKey, object],
        in_use: Count,
        queue_length: Count,
    ) -> None:
        self._buckets = buckets
        self._leases = leases
        self._lines = lines
        self._in_use = in_use
        self._queue_length = queue_length

    async def in_use(self, rule: str, limit: str, shared: bool) -> int:
        return await _sum(self._leases, self._in_use, rule, limit, shared)

    async def waiting(self, rule: str, limit: str, shared: bool) -> int:
        return await _sum(self._lines, self._queue_length, rule, limit, shared)

    async def forget(self, caller: str, rule: str | None, limit: str | None) -> list[str]:
        buckets = self._buckets
        gone = [
            k
            for k in buckets
            if k.caller == caller
            and (rule is None or k.rule == rule)
            and (limit is None or k.limit == limit)
        ]
        for k in gone:
            del buckets[k]
        return sorted(str(k) for k in gone)


async def _sum(
    held: Mapping[StoreKey, object], count: Count, rule: str, limit: str, shared: bool
) -> int:
    """`count` of the shared key, or summed over the callers `held` has for the limit."""
    if shared:
        return await count(StoreKey(rule, limit, "*"))
    keys = [k for k in held if k.rule == rule and k.limit == limit]
    return sum([await count(k) for k in keys])
