"""`Window` limits' storage on Redis, behind the backend's circuit breaker.

The `limits` package's async Redis storage does the work; this wrapper sends
each of its calls through the same breaker as the backend's scripts, so with
Redis dead a window costs a request microseconds (BackendUnavailable at once)
instead of a connection attempt, and its failures open the breaker too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from limits.aio.storage import MovingWindowSupport, Storage
from limits.aio.storage.base import SlidingWindowCounterSupport

T = TypeVar("T")


class Guard(Protocol):
    """What runs one call through the breaker (`RedisBackend._guard`)."""

    async def __call__(self, operation: str, call: Callable[[], Awaitable[T]]) -> T: ...


class GuardedStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport):
    """A `limits` async storage whose every call goes through `guard`."""

    STORAGE_SCHEME = None

    def __init__(self, inner: Storage, guard: Guard) -> None:
        super().__init__()
        self.inner: Any = inner
        self._guard = guard

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return self.inner.base_exceptions  # type: ignore[no-any-return]

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return await self._guard("window", lambda: self.inner.incr(key, expiry, amount))

    async def get(self, key: str) -> int:
        return await self._guard("window", lambda: self.inner.get(key))

    async def get_expiry(self, key: str) -> float:
        return await self._guard("window", lambda: self.inner.get_expiry(key))

    async def check(self) -> bool:
        return await self._guard("window", lambda: self.inner.check())

    async def reset(self) -> int | None:
        return await self._guard("window", lambda: self.inner.reset())

    async def clear(self, key: str) -> None:
        await self._guard("window", lambda: self.inner.clear(key))

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return await self._guard(
            "window", lambda: self.inner.acquire_entry(key, limit, expiry, amount)
        )

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return await self._guard("window", lambda: self.inner.get_moving_window(key, limit, expiry))

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        return await self._guard(
            "window", lambda: self.inner.acquire_sliding_window_entry(key, limit, expiry, amount)
        )

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return await self._guard("window", lambda: self.inner.get_sliding_window(key, expiry))

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        await self._guard("window", lambda: self.inner.clear_sliding_window(key, expiry))
