"""`Window` state in this process: the `limits` package's memory storage, bounded by key count.

`limits`' `MemoryStorage` drops a counter only when it expires, so a flood of
distinct callers within one window period grows it without bound. This
subclass caps the keys it holds at `max_keys` (the memory backend's): past it,
the least recently written key is cleared, as the memory backend evicts its
oldest bucket (that caller's window starts afresh). Only public methods of the
storage are overridden.
"""

from __future__ import annotations

from collections import OrderedDict

from limits.aio.storage import MemoryStorage


class BoundedMemoryStorage(MemoryStorage):
    """`MemoryStorage` holding at most `max_keys` keys, evicting the least recently written."""

    def __init__(self, max_keys: int) -> None:
        super().__init__()
        self.max_keys = max_keys
        #: Keys written, least recently first. It may still name a key the storage
        #: has expired meanwhile; clearing such a key is a no-op.
        self._recent: OrderedDict[str, None] = OrderedDict()
        #: Keys cleared before they expired because of `max_keys`.
        self.evictions = 0

    def __len__(self) -> int:
        """Keys held right now (counters and moving-window event lists)."""
        return len(self.storage) + len(self.events)

    async def _written(self, key: str) -> None:
        """Note a write of `key`; make room for it first if the storage is full."""
        recent = self._recent
        if key in recent:
            recent.move_to_end(key)
            return
        while len(recent) >= self.max_keys:
            oldest = recent.popitem(last=False)[0]
            if oldest in self.storage or oldest in self.events:
                self.evictions += 1
                await super().clear(oldest)
        recent[key] = None

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        """Fixed and sliding windows write here."""
        await self._written(key)
        return await super().incr(key, expiry, amount)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """The moving window writes here."""
        await self._written(key)
        return await super().acquire_entry(key, limit, expiry, amount)

    async def clear(self, key: str) -> None:
        self._recent.pop(key, None)
        await super().clear(key)

    async def reset(self) -> int | None:
        self._recent.clear()
        return await super().reset()
