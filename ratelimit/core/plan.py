"""`Plan`: a rule compiled once for the hot path, and swapped whole by an override.

A plan owns what is derived from its rule: the kind and check parameters of
each limit, the per-caller caches of store keys (or whole bucket checks), and
`derived`, where the faces keep what they compile from the rule (the
middleware's header fields). An override compiles a new plan, so nothing
derived from the old rule outlives it.

The kinds of plan are classes: `Plan`, `OneBucketPlan` (the commonest rule,
decided without lists or a loop) and `BlockedPlan` (refused without a
backend call). `reset_time` is the one formula for the headers' effective window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from .._types import Scope
from ..backends.base import BucketCheck, CheckResult, StoreKey
from ..policy import keys
from ..policy.costs import BY_REQUESTS, Cost, Counted, units
from ..policy.keys import digest
from ..policy.limits import Concurrency, Limit, TokenBucket, Window
from ..policy.overrides import Override
from ..policy.quotas import LONGEST, Quota
from ..policy.rules import Rule


class LimitState(NamedTuple):
    """How one limit of a rule stood for one request."""

    limit: Limit
    #: The policy name (header fields, metrics, problem bodies).
    name: str
    admitted: bool
    #: True when the key function returned None: this limit did not apply.
    exempt: bool = False
    #: Not decided because an earlier part of the rule already refused.
    skipped: bool = False
    #: The available quota (headers' `r`): units (free slots) left now.
    remaining: int = 0
    #: Seconds until this limit could admit the request (0 when it admitted).
    retry_after: float = 0.0
    #: The effective window (headers' `t`): seconds until the available quota grows.
    reset_after: float = 0.0


#: A limit that was not decided because an earlier part of the rule refused.
SKIPPED = CheckResult(False, 0, 0.0, 0.0)

#: Kinds of limit (`Plan.kinds`).
BUCKET, LEASE, WINDOW = 0, 1, 2
#: Steps of the per-request loop besides those (`Plan.specs`): a bucket whose check is
#: cached whole per caller (the rule's cost is a constant); a concurrency limit with a
#: waiting line or classes (its lease ids carry the class).
READY_BUCKET, QUEUED_LEASE = 3, 4

new = tuple.__new__

#: Store keys kept per limit to skip re-hashing hot callers; cleared whole when full.
_KEY_CACHE = 4096
#: Longest caller text kept in those caches (API keys, JWTs and IPs fit): a longer
#: one is hashed on each request instead, so a cache holds at most
#: _KEY_CACHE x _CACHED_KEY_CHARS characters (4 Mi) of caller text whatever callers
#: send (a server may accept 1 MB header values: 400 of them once held 385 MiB).
_CACHED_KEY_CHARS = 1024


class Plan:
    """A rule compiled for the hot path: per-limit kinds, keys and cached store keys or checks."""

    __slots__ = (
        "caches",
        "counts",
        "derived",
        "dimensional",
        "fixed",
        "kinds",
        "limits",
        "min_lease",
        "names",
        "params",
        "positions",
        "queued",
        "rule",
        "size",
        "specs",
        "static_cost",
        "static_units",
    )

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.limits = rule.limits
        self.size = len(rule.limits)
        self.names = tuple(rule.limit_names())
        #: Limit name -> index (a check's store key names its limit).
        self.positions = {name: i for i, name in enumerate(self.names)}
        self.kinds = tuple(_kind(lim) for lim in rule.limits)
        #: (interval, burst) of a bucket, (limit, lease ttl) of a concurrency limit,
        #: ((limit, period, strategy), None) of a window (a quota: its calendar unit as
        #: the strategy, its longest period).
        self.params = tuple(_params(lim) for lim in rule.limits)
        #: What each limit counts (see `policy.costs`).
        self.counts: tuple[Counted, ...] = tuple(lim.counts for lim in rule.limits)
        #: Whether a limit counts other than requests: each limit's units are then
        #: computed from the cost (see `units`); else every limit takes the int cost.
        self.dimensional = any(c is not BY_REQUESTS for c in self.counts)
        #: The rule's cost when it is a constant (an int or a mapping), and the units
        #: each limit takes of it: bucket checks are then the same for every request
        #: of one caller, and are built once and cached.
        self.static_cost: Cost | None = None if callable(rule.cost) else rule.cost
        self.static_units: tuple[int, ...] | None = (
            None if self.static_cost is None else self.units(self.static_cost)
        )
        #: Per limit, caller text -> entry (see `entry`); cleared whole when full.
        self.caches: tuple[dict[str, Any], ...] = tuple({} for _ in rule.limits)
        #: The entry of a limit on `keys.GLOBAL`, fixed once; None for per-caller limits.
        self.fixed = tuple(
            self._entry(i, StoreKey(rule.name, name, "*")) if lim.key is keys.GLOBAL else None
            for i, (lim, name) in enumerate(zip(rule.limits, self.names, strict=True))
        )
        #: Everything the per-request loop reads about limit i, in one tuple.
        self.specs: tuple[tuple[Any, ...], ...] = tuple(
            (i, self._step(i), self.fixed[i], lim.key, lim.key_is_async, self.caches[i], p1, p2)
            for i, (lim, (p1, p2)) in enumerate(zip(rule.limits, self.params, strict=True))
        )
        leases = [lim.lease for lim in rule.limits if isinstance(lim, Concurrency)]
        self.min_lease = min(leases) if leases else math.inf
        #: Whether a request of this rule may wait in a line (the middleware then
        #: watches for the client leaving while it waits).
        self.queued = any(isinstance(lim, Concurrency) and lim.queue for lim in rule.limits)
        #: What the faces compile from this plan's rule, by their own key (e.g. the
        #: middleware's header fields); dropped with the plan when an override swaps it.
        self.derived: dict[str, Any] = {}

    def units(self, cost: Cost) -> tuple[int, ...]:
        """Units each limit takes of `cost` (ValueError: a counted dimension is missing)."""
        if cost.__class__ is int and (not self.dimensional or not cost):
            return (cost,) * self.size  # (0: a peek)
        return tuple(units(c, cost) for c in self.counts)

    def _step(self, i: int) -> int:
        """What the per-request loop does for limit `i` with its entry."""
        kind = self.kinds[i]
        if kind == BUCKET and self.static_cost is not None:
            return READY_BUCKET
        limit = self.limits[i]
        if isinstance(limit, Concurrency) and limit.queued:
            return QUEUED_LEASE
        return kind

    def _entry(self, i: int, skey: StoreKey) -> Any:
        taken = self.static_units
        if taken is not None and self.kinds[i] == BUCKET:
            interval, burst = self.params[i]
            return new(BucketCheck, (skey, interval, burst, taken[i]))
        return skey

    def entry(self, i: int, text: str) -> Any:
        """What limit `i` keeps for caller `text`, cached: its store key (hashed), or
        its whole `BucketCheck` when the rule's cost is a constant (`READY_BUCKET`).

        Text longer than `_CACHED_KEY_CHARS` is not cached (see there)."""
        cache = self.caches[i]
        entry = cache.get(text)
        if entry is None:
            # Once per new caller (every request of a key flood): tuple.__new__, as in decide.
            skey = new(StoreKey, (self.rule.name, self.names[i], digest(text)))
            entry = self._entry(i, skey)
            if len(text) <= _CACHED_KEY_CHARS:
                if len(cache) >= _KEY_CACHE:
                    cache.clear()
                cache[text] = entry
        return entry

    def states(self, results: list[CheckResult | None]) -> tuple[LimitState, ...]:
        """Per-limit states from the raw results (see `Decision.states`)."""
        out = []
        for lim, name, r in zip(self.limits, self.names, results, strict=True):
            if r is None:
                out.append(LimitState(lim, name, True, exempt=True))
            elif r is SKIPPED:
                out.append(LimitState(lim, name, False, skipped=True))
            else:
                retry = retry_after(lim, r)
                reset = reset_time(lim)(r)
                out.append(
                    LimitState(lim, name, r.admitted, False, False, r.remaining, retry, reset)
                )
        return tuple(out)


class OneBucketPlan(Plan):
    """The commonest rule: one per-caller token bucket of constant cost.

    Decided without lists or a loop (see `Engine.decide`): the caller's text
    maps to its cached `BucketCheck`, which is the whole request to the backend.
    """

    __slots__ = ("cache", "key")

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule)
        #: The limit's key function and its cache (caller text -> `BucketCheck`).
        self.key: Callable[[Scope], Any] = rule.limits[0].key
        self.cache = self.caches[0]


#: Longest `Retry-After` hint of a block (seconds): an operator may lift it any time.
BLOCK_RETRY_AFTER = 60.0


class BlockedPlan(Plan):
    """A rule under a block override: every request is refused, without a backend call."""

    __slots__ = ("block",)

    def __init__(self, rule: Rule, block: Override) -> None:
        super().__init__(rule)
        self.block = block


def compile_plan(rule: Rule, block: Override | None = None) -> Plan:
    """The plan of `rule` (under `block`, if one is in force): the kind that fits it."""
    if block is not None:
        return BlockedPlan(rule, block)
    if len(rule.limits) == 1:
        limit = rule.limits[0]
        # Not a keys.GLOBAL bucket (its entry is fixed) nor an async key (awaited
        # in the loop): those take the general path.
        if (
            isinstance(limit, TokenBucket)
            and rule.cost.__class__ is int
            and limit.counts is BY_REQUESTS
            and limit.key is not keys.GLOBAL
            and not limit.key_is_async
        ):
            return OneBucketPlan(rule)
    return Plan(rule)


def _params(limit: Limit) -> tuple[Any, Any]:
    """What a check of `limit` carries besides its key, typed as the check's fields."""
    if isinstance(limit, TokenBucket):
        return (limit.interval, int(limit.burst))
    if isinstance(limit, Concurrency):
        return (int(limit.limit), limit.lease)
    if isinstance(limit, Quota):
        return ((limit.amount, LONGEST[limit.per], limit.per), None)
    assert isinstance(limit, Window)
    return ((int(limit.item.amount), float(limit.item.get_expiry()), limit.strategy), None)


def _kind(limit: Limit) -> int:
    if isinstance(limit, TokenBucket):
        return BUCKET
    if isinstance(limit, Concurrency):
        return LEASE
    return WINDOW


def retry_after(limit: Limit, r: CheckResult) -> float:
    """Seconds until `limit` could admit: exact for rates; for a full pool the engine's
    estimate (see `Engine.estimate`), or the configured hint before there is one."""
    if not r.admitted and isinstance(limit, Concurrency) and not r.retry_after:
        return limit.retry_after
    return r.retry_after


def reset_time(limit: Limit) -> Callable[[CheckResult], float]:
    """Headers' `t` for `limit`'s results, compiled once per limit: the effective
    window of draft-ietf-httpapi-ratelimit-headers-11, the seconds within which
    the caller can use no more than its available quota (`remaining`), i.e. until
    that quota next grows: a window's reset, a bucket's next unit (0 when full).
    The one formula: `LimitState.reset_after` and the `RateLimit` field both use it."""
    if not isinstance(limit, TokenBucket):
        return _reset
    burst, interval = limit.burst, limit.interval

    def bucket_reset(r: CheckResult) -> float:
        # r[3] is the time until the bucket is full; its `remaining` whole units come
        # back last, so the next unit is (burst - 1 - remaining) units before that.
        t = r[3] - (burst - 1 - r[1]) * interval
        return t if t > 0.0 else 0.0  # conditionals, not max(): cheaper than a call

    return bucket_reset


def _reset(r: CheckResult) -> float:
    return r[3]
