"""The limit types a user writes in a `Rule`: TokenBucket, Concurrency, Window.

Each validates its arguments at construction (naming the bad field) and
precomputes what the engine needs per request.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from limits import RateLimitItem
from limits import parse_many as parse_rates

from .._errors import ConfigError
from .._types import KeyFunc, Scope
from ..algorithms.queue import RANK_MAX
from . import keys
from .costs import Counted, counted

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_EXPECTED = (
    "a name of letters, digits, '_', '.' or '-' (at most 64, not starting with a symbol)"
)


def check_name(field: str, name: object) -> str:
    """Validate a configuration name used in storage keys and header fields."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(field, NAME_EXPECTED, name)
    return name


#: A period of zero units ("10/0 seconds"), which `limits` reads as one unit.
_ZERO_PERIOD = re.compile(r"(?:/|\bper\b)\s*0+\s*[a-z]", re.IGNORECASE)

#: Longest lease (seconds): a lease held by a crashed worker is capacity lost until it
#: expires, and past the store's time range (1e16 s) one is never given back.
MAX_LEASE = 86400.0

#: Longest span a rate may cover (seconds, 100 years): a rate's period, and the time a
#: bucket takes to refill its whole burst. Past the store's time range Redis refuses the
#: script's numbers, a backend failure that `fail="open"` would turn into free admissions.
MAX_SPAN = 100 * 365.25 * 86400.0


def parse_rate_string(field: str, rate: object) -> RateLimitItem:
    """Parse `"5/minute"` or `"100 per hour"` with the `limits` package.

    One rate, a positive amount, a positive period: `limits` would read
    `"10/0 seconds"` as 10 per second, and keep only the first of several.
    """
    if isinstance(rate, str):
        if _ZERO_PERIOD.search(rate):
            raise ConfigError(field, "a rate over a period longer than 0", rate)
        try:
            items = parse_rates(rate)
        except ValueError:
            pass
        else:
            if len(items) > 1:
                raise ConfigError(field, "one rate (use one limit per rate)", rate)
            if items and items[0].amount > 0:
                if items[0].get_expiry() > MAX_SPAN:
                    raise ConfigError(field, "a rate over a period of at most 100 years", rate)
                return items[0]
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
    #: Whether a refused client may retry after `Retry-After` (False: a spent budget,
    #: `x-should-retry: false`; see `Quota`).
    should_retry: bool = True
    __slots__ = ("counts", "key", "key_is_async", "name", "shared")

    def __init__(
        self, key: KeyFunc, name: str | None, shared: bool | None, counts: object = None
    ) -> None:
        self.key = _check_key(key)
        #: The dimensions this limit counts, weighted (see `policy.costs`).
        self.counts: Counted = counted("counts", counts)
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


class _Rated(Limit):
    """A limit of a rate (`"5/minute"`, parsed by `limits`): a bucket or a window."""

    __slots__ = ("item", "rate")

    def __init__(
        self,
        rate: str,
        key: KeyFunc | None,
        name: str | None,
        shared: bool | None,
        counts: str | Mapping[str, int] | None,
    ) -> None:
        super().__init__(keys.client_ip() if key is None else key, name, shared, counts)
        self.rate = rate
        self.item = parse_rate_string("rate", rate)


class TokenBucket(_Rated):
    """A smooth rate with bursts (GCRA): `burst` back-to-back requests from idle.

    `rate` is the sustained rate (`"5/minute"`: one unit every 12 s); `burst`
    is how many unit-cost requests an idle caller may send at once, defaulting
    to the rate's amount (5 for `"5/minute"`).
    """

    kind = "token-bucket"
    __slots__ = ("burst", "interval", "period")

    def __init__(
        self,
        rate: str,
        *,
        burst: int | None = None,
        key: KeyFunc | None = None,
        name: str | None = None,
        shared: bool | None = None,
        counts: str | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(rate, key, name, shared, counts)
        self.period = float(self.item.get_expiry())
        #: Seconds per unit: the emission interval of GCRA.
        self.interval = self.period / self.item.amount
        if burst is None:
            burst = self.item.amount
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            raise ConfigError("burst", "a positive integer", burst)
        if burst * self.interval > MAX_SPAN:
            raise ConfigError(
                "burst", "at most 100 years of the rate (burst x seconds per unit)", burst
            )
        self.burst = burst

    def scaled(self, share: float) -> TokenBucket:
        clone = TokenBucket(
            self.rate, burst=_scale(self.burst, share), key=self.key, name=self.name
        )
        clone.counts = self.counts
        clone.shared = self.shared
        clone.item = _scaled_item(self.item, share)
        clone.interval = self.interval / share
        return clone

    def __repr__(self) -> str:
        return f"TokenBucket({self.rate!r}, burst={self.burst}, key={self.key!r})"


#: Headers a client states how long it waits for an answer in (seconds), read by default:
#: the generic one, and the one the openai and anthropic SDKs send (their read timeout).
DEADLINE_HEADERS = ("x-request-timeout", "x-stainless-read-timeout")


class Concurrency(Limit):
    """At most `limit` requests in flight per key, fleet-wide, with an optional waiting line.

    Each admitted request holds a lease that expires `lease` seconds after its
    last renewal; running requests renew it, so only a crashed worker's
    leases ever expire. When every slot is taken, up to `queue` requests wait
    up to `timeout` seconds for one (0 refuses at once), or less when the
    client says it gives up sooner: `deadline_header` names the request
    headers read for that, in seconds (default `x-request-timeout` and the
    openai and anthropic SDKs' `x-stainless-read-timeout`; the shortest counts).

    Waiting order: `priority(scope)` gives a request's class, either an int
    (higher first) or a name listed in `classes` (first listed first), or
    None (no class: last among names, as 0 among ints). Any other value, e.g.
    a name not listed, makes the request unratable (see `CallableError`).
    `shares` maps classes to fractions of `limit` each is guaranteed when it
    needs them (idle slots are borrowed by any class); for named classes,
    `classes` defaults to the order of `shares`.
    `fair_key(scope)` (e.g. the API key) orders each caller's n-th waiting
    request after every other caller's earlier ones; without it, FIFO.

    A refusal's `Retry-After` estimates when a slot frees from the observed
    service time; before any is observed it is `retry_after` seconds.
    """

    kind = "concurrency"
    __slots__ = (
        "classes",
        "deadline_header",
        "fair_key",
        "guaranteed",
        "lease",
        "limit",
        "priority",
        "queue",
        "retry_after",
        "shares",
        "timeout",
        "weighted",
    )

    def __init__(
        self,
        limit: int,
        *,
        key: KeyFunc | None = None,
        queue: int = 0,
        timeout: float = 0.0,
        priority: Callable[[Scope], Any] | None = None,
        classes: Sequence[str] | None = None,
        shares: Mapping[Any, float] | None = None,
        fair_key: KeyFunc | None = None,
        deadline_header: str | Sequence[str] | None = DEADLINE_HEADERS,
        lease: float = 30.0,
        retry_after: float = 1.0,
        name: str | None = None,
        shared: bool | None = None,
        counts: str | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(keys.GLOBAL if key is None else key, name, shared, counts)
        #: Whether a request holds as many slots as it costs in `counts` (else one).
        self.weighted = counts is not None
        self.limit = _positive_int("limit", limit)
        self.queue = _non_negative_int("queue", queue)
        self.timeout = _non_negative_float("timeout", timeout)
        if self.queue and not self.timeout:
            raise ConfigError("timeout", "seconds > 0 that a request may wait (queue > 0)", timeout)
        if priority is not None and not callable(priority):
            raise ConfigError("priority", "a callable (scope) -> class", priority)
        self.priority = priority
        if fair_key is not None and not callable(fair_key):
            raise ConfigError("fair_key", "a callable (scope) -> str | None", fair_key)
        self.fair_key = fair_key
        names = (deadline_header,) if isinstance(deadline_header, str) else deadline_header
        try:
            #: Read the client's own limits on its wait, in seconds (the shortest counts).
            self.deadline_header = tuple(keys.header(name) for name in names or ())
        except (ConfigError, TypeError):
            raise ConfigError(
                "deadline_header", "a header name, a list of them, or None", deadline_header
            ) from None
        self.shares = dict(_check_shares(shares))
        self.classes = _check_classes(classes, self.shares)
        if self.shares and priority is None:
            raise ConfigError(
                "shares",
                "a priority= function as well (without one every request is in one class)",
                self.shares,
            )
        for cls, fraction in self.shares.items():
            if math.floor(self.limit * fraction) < 1:
                raise ConfigError(
                    f"shares.{cls}",
                    f"a fraction worth at least one of the {self.limit} slots "
                    f"(>= 1/{self.limit}; less guarantees nothing)",
                    fraction,
                )
        #: (rank, slots) guaranteed per class.
        self.guaranteed = tuple(
            sorted((self.rank(cls), math.floor(self.limit * f)) for cls, f in self.shares.items())
        )
        self.lease = _non_negative_float("lease", lease)
        if self.lease < 1.0:
            raise ConfigError("lease", "at least 1 second (renewals run every lease/3)", lease)
        if self.lease > MAX_LEASE:
            raise ConfigError(
                "lease",
                "at most 86400 seconds (1 day: a crashed worker's slots stay taken that long)",
                lease,
            )
        self.retry_after = _non_negative_float("retry_after", retry_after)

    @property
    def queued(self) -> bool:
        """Whether requests may wait, or be told apart by class (leases then carry it)."""
        return bool(self.queue or self.guaranteed)

    def rank(self, cls: object) -> int:
        """The place of a priority class in line: 0 first (see `algorithms.queue`).

        A class is a name listed in `classes`, an int, or None (no class: after
        every named class, or as the int 0). Anything else raises ValueError: an
        unknown name may be a typo or a forged header, and must not jump the line.
        """
        if isinstance(cls, str):
            classes = self.classes
            if cls in classes:
                return classes.index(cls)
            raise ValueError(f"not one of the classes {list(classes)}")
        if isinstance(cls, int) and not isinstance(cls, bool):
            return min(RANK_MAX, max(0, _INT_RANK_ORIGIN - cls))
        if cls is None:
            return len(self.classes) if self.classes else _INT_RANK_ORIGIN
        raise ValueError("not a class name, an int or None")

    def scaled(self, share: float) -> Concurrency:
        clone = copy.copy(self)
        clone.limit = _scale(self.limit, share)
        clone.queue = math.floor(self.queue * share)
        clone.guaranteed = tuple(
            (rank, math.floor(clone.limit * self.shares[cls]))
            for cls in self.shares
            for rank in (self.rank(cls),)
        )
        return clone

    def __repr__(self) -> str:
        return f"Concurrency({self.limit}, key={self.key!r}, queue={self.queue})"


#: An int priority p ranks RANK_ORIGIN - p: higher ints first.
_INT_RANK_ORIGIN = 5000


def _check_shares(shares: object) -> Mapping[Any, float]:
    if shares is None:
        return {}
    if not isinstance(shares, Mapping):
        raise ConfigError("shares", 'a mapping of class -> fraction, e.g. {"paid": 0.75}', shares)
    total = 0.0
    for cls, fraction in shares.items():
        if not isinstance(cls, (str, int)) or isinstance(cls, bool):
            raise ConfigError("shares", "class names (str) or int priorities as keys", cls)
        if (
            not isinstance(fraction, (int, float))
            or isinstance(fraction, bool)
            or not 0 < fraction <= 1
        ):
            raise ConfigError(f"shares.{cls}", "a fraction in (0, 1]", fraction)
        total += fraction
    if total > 1 + 1e-9:
        raise ConfigError("shares", "fractions adding up to at most 1", dict(shares))
    return shares


def _check_classes(classes: object, shares: Mapping[Any, float]) -> tuple[str, ...]:
    if classes is None:
        return tuple(cls for cls in shares if isinstance(cls, str))
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ConfigError("classes", "a list of class names, first served first", classes)
    for cls in classes:
        if not isinstance(cls, str):
            raise ConfigError("classes", "class names (str)", cls)
    if len(set(classes)) != len(classes):
        raise ConfigError("classes", "distinct class names", list(classes))
    for cls in shares:
        if isinstance(cls, str) and cls not in classes:
            raise ConfigError(f"shares.{cls}", f"a class listed in classes {list(classes)}", cls)
    return tuple(classes)


WindowStrategy = Literal["fixed", "moving", "sliding"]


class Window(_Rated):
    """At most `rate`'s amount per period, counted as the `limits` package's strategies do.

    "fixed": a window that opens at the first hit and resets one period later;
    "sliding": the sliding window counter (this window's count plus the
    previous one's, weighted by how much of it the period still covers);
    "moving": the exact count over the last period. A native check (see
    `algorithms.window`): decided with the rule's other limits, all or nothing,
    refundable. `rate` is parsed by `limits`; nothing else of it is used.
    """

    kind = "window"
    __slots__ = ("strategy",)

    def __init__(
        self,
        rate: str,
        *,
        strategy: WindowStrategy = "fixed",
        key: KeyFunc | None = None,
        name: str | None = None,
        shared: bool | None = None,
        counts: str | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(rate, key, name, shared, counts)
        if strategy not in ("fixed", "moving", "sliding"):
            raise ConfigError("strategy", '"fixed", "moving" or "sliding"', strategy)
        self.strategy: WindowStrategy = strategy

    def scaled(self, share: float) -> Window:
        clone = Window(self.rate, strategy=self.strategy, key=self.key, name=self.name)
        clone.counts = self.counts
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
