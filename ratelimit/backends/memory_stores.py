"""The `MemoryBackend`'s stores: overrides of this process, and its admin reads.

Nothing here is shared: a change applies before `put` returns, nobody else
writes, there are no reports and no top-callers windows to publish (one
process: `top_app` shows its tables).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._types import Clock
from .base import StoreKey
from .stores import REPORTS_LIVE, Refresh, Stored, clears, lapsed

if TYPE_CHECKING:
    from .memory import MemoryBackend

__all__ = ["MemoryAdmin", "MemoryOverrideStore"]


class MemoryOverrideStore:
    """Overrides of this process only: the `MemoryBackend`'s store."""

    shared = False

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._slots: dict[str, str] = {}
        self._version = 0

    def now(self) -> float:
        return self._clock()

    async def sync_clock(self) -> float:
        return self._clock()

    async def load(self) -> Stored:
        return Stored(str(self._version), dict(self._slots))

    async def put(self, slot: str, text: str) -> str:
        now = self.now()
        self._slots = {s: t for s, t in self._slots.items() if not lapsed(t, now)}
        self._slots[slot] = text
        self._version += 1
        return str(self._version)

    async def clear(self, rule: str, limit: str | None) -> tuple[dict[str, str], str | None]:
        gone = {s: t for s, t in self._slots.items() if clears(s, rule, limit)}
        if not gone:
            return {}, str(self._version)
        for slot in gone:
            del self._slots[slot]
        self._version += 1
        return gone, str(self._version)

    async def watch(self, refresh: Refresh) -> None:
        return None  # nobody else writes this store

    async def report(self, worker: str, data: Mapping[str, Any]) -> None:
        return None

    async def reports(self, within: float = REPORTS_LIVE) -> dict[str, dict[str, Any]]:
        return {}

    async def aclose(self) -> None:
        return None


class MemoryAdmin:
    """Admin reads over a `MemoryBackend`'s keys (this process's callers)."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend

    async def in_use(self, rule: str, limit: str, shared: bool) -> int:
        if shared:
            return await self.backend.in_use(StoreKey(rule, limit, "*"))
        keys = [k for k in self.backend._leases if k.rule == rule and k.limit == limit]
        return sum([await self.backend.in_use(k) for k in keys])

    async def waiting(self, rule: str, limit: str, shared: bool) -> int:
        if shared:
            return await self.backend.queue_length(StoreKey(rule, limit, "*"))
        keys = [k for k in self.backend._lines if k.rule == rule and k.limit == limit]
        return sum([await self.backend.queue_length(k) for k in keys])

    async def forget(self, caller: str, rule: str | None, limit: str | None) -> list[str]:
        buckets = self.backend._buckets
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
