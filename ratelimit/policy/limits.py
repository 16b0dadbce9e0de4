"""The limit types a user writes in a `Rule`: TokenBucket, Concurrency, Window.

Each validates its arguments at construction (naming the bad field) and
precomputes what the engine needs per request.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from limits import RateLimitItem
from limits import parse as parse_rate

from .._errors import ConfigError
from .._types import KeyFunc, Scope
from . import keys

if TYPE_CHECKING:
    from limits.aio.strategies import RateLimiter

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_EXPECTED = (
    "a name of letters, digits, '_', '.' or '-' (at most 64, not starting with a symbol)"
)


def check_name(field: str, name: object) -> str:
    """Validate a configuration name used in storage keys and header fields."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(field, NAME_EXPECTED, name)
    return name


def parse_rate_string(field: str, rate: object) -> RateLimitItem:
    """Parse `"5/minute"` or `"100 per hour"` with the `limits` package."""
    if isinstance(rate, str):
        try:
            item = parse_rate(rate)
        except ValueError:
            pass
        else:
            if item.amount > 0:
                return item
    raise ConfigError(field, 'a rate like "10/minute" or "100 per hour"', rate)


def _check_key(key: object) -> KeyFunc:
    if not callable(key):
        raise ConfigError("key", "a callable (scope) -> str | None, e.g. keys.client_ip()", key)
    return key


def _is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - instances with an async __call__
    return inspect.iscoroutinefunction(fn) or (
        call is not None and inspect.iscoroutinefunction(call)
    )


class Limit:
    """What every limit type shares: a name, a key function and its sharedness."""

    kind: str = "limit"
    __slots__ = ("key", "key_is_async", "name", "shared")

    def __init__(self, key: KeyFunc, name: str | None, shared: bool | None) -> None:
        self.key = _check_key(key)
        self.key_is_async = _is_async(key)
        self.name = None if name is None else check_name("name", name)
        #: Refusals on a shared limit mean the service is full (503), not the caller (429).
        if shared is not None and not isinstance(shared, bool):
            raise ConfigError("shared", "true or false", shared)
        self.shared = bool(getattr(key, "shared", False)) if shared is None else shared

    def default_name(self) -> str:
        return self.kind

    def scaled(self, share: float) -> Limit:
        """A copy whose capacity is `share` of this one's (at least one unit)."""
        raise NotImplementedError


def _scaled_item(item: RateLimitItem, share: float) -> RateLimitItem:
    return type(item)(max(1, math.floor(item.amount * share)), item.multiples)


def _scale(value: int, share: float) -> int:
    return max(1, math.floor(value * share))


class TokenBucket(Limit):
    """A smooth rate with bursts (GCRA): `burst` back-to-back requests from idle.

    `rate` is the sustained rate (`"5/minute"`: one unit every 12 s); `burst`
    is how many unit-cost requests an idle caller may send at once, defaulting
    to the rate's amount (5 for `"5/minute"`).
    """

    kind = "token-bucket"
    __slots__ = ("burst", "interval", "item", "period", "rate")

    def __init__(
        self,
        rate: str,
        *,
        burst: int | None = None,
        key: KeyFunc | None = None,
        name: str | None = None,
        shared: bool | None = None,
    ) -> None:
        super().__init__(keys.client_ip() if key is None else key, name, shared)
        self.rate = rate
        self.item = parse_rate_string("rate", rate)
        self.period = float(self.item.get_expiry())
        #: Seconds per unit: the emission interval of GCRA.
        self.interval = self.period / self.item.amount
        if burst is None:
            burst = self.item.amount
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            raise ConfigError("burst", "a positive integer", burst)
        self.burst = burst

    def scaled(self, share: float) -> TokenBucket:
        clone = TokenBucket(
            self.rate, burst=_scale(self.burst, share), key=self.key, name=self.name
        )
        clone.shared = self.shared
        clone.item = _scaled_item(self.item, share)
        clone.interval = self.interval / share
        return clone

    def __repr__(self) -> str:
        return f"TokenBucket({self.rate!r}, burst={self.burst}, key={self.key!r})"


class Concurrency(Limit):
    """At most `limit` requests in flight per key, fleet-wide.

    Each admitted request holds a lease that expires `lease` seconds after its
    last renewal; running requests renew it, so only a crashed worker's
    leases ever expire. `queue` and `timeout` bound waiting for a slot (0:
    refuse at once). A refusal's `Retry-After` is `retry_after` seconds until
    a service-time estimate replaces it.
    """

    kind = "concurrency"
    __slots__ = ("lease", "limit", "priority", "queue", "retry_after", "timeout")

    def __init__(
        self,
        limit: int,
        *,
        key: KeyFunc | None = None,
        queue: int = 0,
        timeout: float = 0.0,
        priority: Callable[[Scope], Any] | None = None,
        lease: float = 30.0,
        retry_after: float = 1.0,
        name: str | None = None,
        shared: bool | None = None,
    ) -> None:
        super().__init__(keys.GLOBAL if key is None else key, name, shared)
        self.limit = _positive_int("limit", limit)
        self.queue = _non_negative_int("queue", queue)
        self.timeout = _non_negative_float("timeout", timeout)
        if priority is not None and not callable(priority):
            raise ConfigError("priority", "a callable (scope) -> class", priority)
        self.priority = priority
        self.lease = _non_negative_float("lease", lease)
        if self.lease < 1.0:
            raise ConfigError("lease", "at least 1 second (renewals run every lease/3)", lease)
        self.retry_after = _non_negative_float("retry_after", retry_after)

    def scaled(self, share: float) -> Concurrency:
        return Concurrency(
            _scale(self.limit, share),
            key=self.key,
            queue=math.floor(self.queue * share),
            timeout=self.timeout,
            priority=self.priority,
            lease=self.lease,
            retry_after=self.retry_after,
            name=self.name,
            shared=self.shared,
        )

    def __repr__(self) -> str:
        return f"Concurrency({self.limit}, key={self.key!r}, queue={self.queue})"


WindowStrategy = Literal["fixed", "moving", "sliding"]


class Window(Limit):
    """The `limits` package's window strategies: fixed, moving or sliding.

    Runs on the backend's `limits` storage. A rule holds at most one Window,
    decided after its other limits, since a window hit cannot be undone.
    """

    kind = "window"
    __slots__ = ("item", "rate", "strategy")

    def __init__(
        self,
        rate: str,
        *,
        strategy: WindowStrategy = "fixed",
        key: KeyFunc | None = None,
        name: str | None = None,
        shared: bool | None = None,
    ) -> None:
        super().__init__(keys.client_ip() if key is None else key, name, shared)
        self.rate = rate
        self.item = parse_rate_string("rate", rate)
        if strategy not in ("fixed", "moving", "sliding"):
            raise ConfigError("strategy", '"fixed", "moving" or "sliding"', strategy)
        self.strategy: WindowStrategy = strategy

    def limiter(self, storage: Any) -> RateLimiter:
        """The `limits` strategy object for this window on `storage`."""
        from limits.aio import strategies

        if self.strategy == "fixed":
            return strategies.FixedWindowRateLimiter(storage)
        if self.strategy == "moving":
            return strategies.MovingWindowRateLimiter(storage)
        return strategies.SlidingWindowCounterRateLimiter(storage)

    def scaled(self, share: float) -> Window:
        clone = Window(self.rate, strategy=self.strategy, key=self.key, name=self.name)
        clone.shared = self.shared
        clone.item = _scaled_item(self.item, share)
        return clone

    def __repr__(self) -> str:
        return f"Window({self.rate!r}, strategy={self.strategy!r}, key={self.key!r})"


def _positive_int(field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(field, "a positive integer", value)
    return value


def _non_negative_int(field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(field, "an integer >= 0", value)
    return value


def _non_negative_float(field: str, value: object) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(field, "a number of seconds >= 0", value)
    return float(value)
