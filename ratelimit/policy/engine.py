"""The engine: turns a matched rule and a request scope into a `Decision`.

It computes keys and cost, asks the backend for all of the rule's limits in
one call (all or nothing: buckets, windows and concurrency leases alike), and
keeps the leases of running requests alive
with one background renewal loop. Live overrides recompile the rules they
change (`swap_rules`), so a request never looks one up; a blocked rule is
refused without a backend call.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import logging
import math
import os
import reprlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

from .._errors import CallableError, ConfigError, LeaseError
from .._types import Scope
from ..algorithms import queue
from ..backends.base import (
    Backend,
    BucketCheck,
    Check,
    CheckResult,
    LeaseCheck,
    QueueBackend,
    QueueCheck,
    StoreKey,
    WindowCheck,
    nowait_method,
)
from . import keys
from .limits import Concurrency, Limit, TokenBucket, Window
from .overrides import Override, Resolution
from .paths import route_path
from .rules import MAX_COST, Rule, routed_methods

logger = logging.getLogger("ratelimit")


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
    remaining: int = 0
    #: Seconds until this limit could admit the request (0 when it admitted).
    retry_after: float = 0.0
    #: Seconds until the quota resets (headers' `t`).
    reset_after: float = 0.0


@dataclass(slots=True)
class Grant:
    """The concurrency leases an admitted request holds; released exactly once."""

    leases: tuple[LeaseCheck, ...]
    released: bool = False
    #: When the slots were taken (monotonic), for the service-time estimate.
    started: float = 0.0
    #: The plan whose limits the leases belong to.
    plan: Plan | None = None


#: Reasons a request that tried the waiting line was refused (`Decision.reason`).
QUEUE_FULL, TOO_LONG, QUEUE_TIMEOUT, SHED, ABANDONED = (
    "queue_full",
    "too_long",
    "queue_timeout",
    "shed",
    "abandoned",
)

#: Called with nothing; completes when the client has gone away (see `Engine.decide`).
Abandon = Callable[[], Awaitable[object]]


class Given(NamedTuple):
    """What a caller without a request gives `Engine.decide` instead of a scope's answers
    (see `core.Limiter`): the key functions, cost, priority and deadline are not asked.
    """

    #: Caller text per limit of the rule (None: exempt). A `keys.GLOBAL` limit keeps
    #: its one key; its text is the fair key of its line, if the limit has `fair_key`.
    keys: tuple[str | None, ...]
    #: Units taken from each token bucket and window.
    cost: int
    #: The class in each waiting line (see `Concurrency.rank`); None: no class.
    priority: object = None
    #: Seconds to wait in line at most (the limit's `timeout` if shorter); None: that.
    timeout: float | None = None


class Decision:
    """The answer for one request: admitted or refused, and why.

    Per-limit `states` are built on first use: the admitted hot path only
    needs the raw backend results, which the header fields read directly.
    """

    __slots__ = (
        "_plan",
        "_states",
        "allowed",
        "checks",
        "grant",
        "line",
        "reason",
        "results",
        "retry_after",
        "rule",
        "status",
        "waited",
    )

    def __init__(
        self,
        rule: Rule,
        allowed: bool,
        status: int,
        retry_after: float,
        plan: Plan,
        results: list[CheckResult | None],
        grant: Grant | None = None,
        checks: Sequence[Check] = (),
    ) -> None:
        self.rule = rule
        self.allowed = allowed
        #: 200 when allowed; 429 (the caller's own quota) or 503 (shared capacity) when refused.
        self.status = status
        #: Seconds to wait before retrying (0 when allowed).
        self.retry_after = retry_after
        self.grant = grant
        #: What an admitted decision took from the backend (see `Engine.refund`).
        self.checks = checks
        #: The backend's answer per limit of the rule; None: exempt; SKIPPED: not decided.
        self.results = results
        self._plan = plan
        self._states: tuple[LimitState, ...] | None = None
        #: Seconds spent in a waiting line; None if the request never waited.
        self.waited: float | None = None
        #: The name of the limit whose line the request joined; None if it joined none.
        self.line: str | None = None
        #: Why a request that went for the line was refused (QUEUE_FULL, TOO_LONG,
        #: QUEUE_TIMEOUT, SHED, ABANDONED); None otherwise.
        self.reason: str | None = None

    @property
    def states(self) -> tuple[LimitState, ...]:
        """How each limit of the rule stood, in the rule's order."""
        if self._states is None:
            self._states = self._plan.states(self.results)
        return self._states

    @property
    def names(self) -> tuple[str, ...]:
        """The policy name of each limit of the rule."""
        return self._plan.names

    @property
    def violated(self) -> list[str]:
        """Names of the limits that refused."""
        return [s.name for s in self.states if not s.admitted and not s.exempt and not s.skipped]

    def __repr__(self) -> str:
        return (
            f"Decision(rule={self.rule.name!r}, allowed={self.allowed}, status={self.status}, "
            f"retry_after={self.retry_after:.3f})"
        )


#: A limit that was not decided because an earlier part of the rule refused.
SKIPPED = CheckResult(False, 0, 0.0, 0.0)

_BUCKET, _LEASE, _WINDOW = 0, 1, 2
#: A bucket whose check is cached whole per caller (the rule's cost is a constant).
_READY_BUCKET = 3
#: A concurrency limit with a waiting line or classes: its lease ids carry the class.
_QUEUED_LEASE = 4

_new = tuple.__new__

#: Store keys kept per limit to skip re-hashing hot callers; cleared whole when full.
_KEY_CACHE = 4096
#: Longest caller text kept in those caches (API keys, JWTs and IPs fit): a longer
#: one is hashed on each request instead, so a cache holds at most
#: _KEY_CACHE x _CACHED_KEY_CHARS characters (4 Mi) of caller text whatever callers
#: send (a server may accept 1 MB header values: 400 of them once held 385 MiB).
_CACHED_KEY_CHARS = 1024


def _digest(text: str) -> str:
    """The stored form of a caller key: fixed size, no raw request bytes."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class Plan:
    """A rule compiled for the hot path: per-limit kinds, keys and cached store keys or checks."""

    __slots__ = (
        "caches",
        "fixed",
        "kinds",
        "limits",
        "min_lease",
        "names",
        "params",
        "queued",
        "rule",
        "single",
        "size",
        "specs",
        "static_cost",
    )

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.limits = rule.limits
        self.size = len(rule.limits)
        self.names = tuple(rule.limit_names())
        self.kinds = tuple(_kind(lim) for lim in rule.limits)
        #: (interval, burst) of a bucket, (limit, lease ttl) of a concurrency limit,
        #: ((limit, period, strategy), None) of a window.
        self.params = tuple(_params(lim) for lim in rule.limits)
        #: The rule's cost when it is a constant: bucket checks are then the same for
        #: every request of one caller, and are built once and cached.
        self.static_cost = rule.cost if rule.cost.__class__ is int else None
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
        #: The commonest rule, one per-caller bucket of constant cost with a sync key:
        #: (key function, cache) for `Engine.decide`'s short path; None otherwise.
        self.single: tuple[Callable[[Scope], Any], dict[str, Any]] | None = None
        if len(self.specs) == 1 and self.specs[0][1] == _READY_BUCKET:
            _, _, fixed, key_func, key_async, cache, _, _ = self.specs[0]
            if fixed is None and not key_async:
                self.single = (key_func, cache)

    def _step(self, i: int) -> int:
        """What the per-request loop does for limit `i` with its entry."""
        kind = self.kinds[i]
        if kind == _BUCKET and self.static_cost is not None:
            return _READY_BUCKET
        limit = self.limits[i]
        if isinstance(limit, Concurrency) and limit.queued:
            return _QUEUED_LEASE
        return kind

    def _entry(self, i: int, skey: StoreKey) -> Any:
        cost = self.static_cost
        if cost is not None and self.kinds[i] == _BUCKET:
            interval, burst = self.params[i]
            return _new(BucketCheck, (skey, interval, burst, cost))
        return skey

    def entry(self, i: int, text: str) -> Any:
        """What limit `i` keeps for caller `text`, cached: its store key (hashed), or
        its whole `BucketCheck` when the rule's cost is a constant (`_READY_BUCKET`).

        Text longer than `_CACHED_KEY_CHARS` is not cached (see there)."""
        cache = self.caches[i]
        entry = cache.get(text)
        if entry is None:
            # Once per new caller (every request of a key flood): tuple.__new__, as in decide.
            skey = _new(StoreKey, (self.rule.name, self.names[i], _digest(text)))
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
                reset = reset_after(lim, r)
                out.append(
                    LimitState(lim, name, r.admitted, False, False, r.remaining, retry, reset)
                )
        return tuple(out)


#: Longest `Retry-After` hint of a block (seconds): an operator may lift it any time.
BLOCK_RETRY_AFTER = 60.0


class BlockedPlan(Plan):
    """A rule under a block override: every request is refused, without a backend call."""

    __slots__ = ("block",)

    def __init__(self, rule: Rule, block: Override) -> None:
        super().__init__(rule)
        self.block = block


class BlockedDecision(Decision):
    """A refusal by an operator's block: 503, the operator's `message`, no limit consulted.

    Its `Retry-After` is the time until the block lapses, at most
    `BLOCK_RETRY_AFTER` (a block "until cleared" says that much).
    """

    __slots__ = ("block", "message")

    def __init__(self, plan: BlockedPlan) -> None:
        block = plan.block
        wait = BLOCK_RETRY_AFTER
        if block.expires_at is not None:
            # A hint on this process's clock; the store's decides when the block lapses.
            wait = min(wait, max(1.0, block.expires_at - time.time()))
        super().__init__(plan.rule, False, 503, wait, plan, [SKIPPED] * plan.size)
        self.block = block
        #: What the refused caller reads (None: the standard text).
        self.message = block.message


def _params(limit: Limit) -> tuple[Any, Any]:
    """What a check of `limit` carries besides its key, typed as the check's fields."""
    if isinstance(limit, TokenBucket):
        return (limit.interval, int(limit.burst))
    if isinstance(limit, Concurrency):
        return (int(limit.limit), limit.lease)
    assert isinstance(limit, Window)
    return ((int(limit.item.amount), float(limit.item.get_expiry()), limit.strategy), None)


def _kind(limit: Limit) -> int:
    if isinstance(limit, TokenBucket):
        return _BUCKET
    if isinstance(limit, Concurrency):
        return _LEASE
    return _WINDOW


def retry_after(limit: Limit, r: CheckResult) -> float:
    """Seconds until `limit` could admit: exact for rates; for a full pool the engine's
    estimate (see `Engine.estimate`), or the configured hint before there is one."""
    if not r.admitted and isinstance(limit, Concurrency) and not r.retry_after:
        return limit.retry_after
    return r.retry_after


def reset_after(limit: Limit, r: CheckResult) -> float:
    """Headers' `t`: time until the quota is back, or until the next unit when none is left."""
    if r.remaining or not isinstance(limit, TokenBucket):
        return r.reset_after
    if not r.admitted:
        return r.retry_after
    return max(0.0, r.reset_after - (limit.burst - 1) * limit.interval)


def _raised(role: str, func: object, plan: Plan, i: int, exc: Exception) -> CallableError:
    """The error for limit `i`'s `role` callable having raised `exc` (its cause)."""
    name = plan.names[i]
    return CallableError(role, func, plan.rule.name, name, f"raised {type(exc).__name__}")


async def _ask(role: str, func: Callable[[Scope], Any], plan: Plan, i: int, scope: Scope) -> Any:
    """Limit `i`'s `role` callable (sync or async) asked for `scope`."""
    try:
        value = func(scope)
        if inspect.isawaitable(value):
            value = await value
    except Exception as exc:
        raise _raised(role, func, plan, i, exc) from exc
    return value


async def _rank(plan: Plan, i: int, scope: Scope) -> int:
    """The request's class in limit `i`'s line (0 without a priority function)."""
    limit = plan.limits[i]
    assert isinstance(limit, Concurrency)
    if limit.priority is None:
        return 0
    value = await _ask("priority", limit.priority, plan, i, scope)
    try:
        return limit.rank(value)
    except ValueError as exc:
        problem = f"returned {reprlib.repr(value)}, {exc}"
        raise CallableError(
            "priority", limit.priority, plan.rule.name, plan.names[i], problem
        ) from None


async def _fair_text(plan: Plan, i: int, scope: Scope) -> str | None:
    """Limit `i`'s fair key for `scope` as text; None without one (or when it says None)."""
    limit = plan.limits[i]
    assert isinstance(limit, Concurrency)
    if limit.fair_key is None:
        return None
    value = await _ask("fair_key", limit.fair_key, plan, i, scope)
    try:
        return None if value is None else str(value)
    except Exception as exc:
        raise _raised("fair_key", limit.fair_key, plan, i, exc) from exc


def _client_timeout(scope: Scope, header: keys.header | None) -> float | None:
    """Seconds the client says it will wait (`deadline_header`), or None if absent or unreadable."""
    text = None if header is None else header(scope)
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _cancelling() -> bool:
    """Whether the current task has been asked to cancel (Python 3.11+; False before)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("ratelimit background cleanup failed: %r", task.exception())


def _release_failed(lease: LeaseCheck) -> None:
    # Never fail the response: the backend retries a release that got no answer
    # (Redis: once it answers again), and a lease expires by itself within its ttl.
    logger.warning(
        "could not release lease %s now; it is retried, or expires within %ss", lease.key, lease.ttl
    )


class EngineObserver(Protocol):
    """What an engine tells its observer (see `core.Observer`, which extends it)."""

    def on_release(self, grant: Grant) -> None:
        """`grant`'s slots were released (metrics count the slots in flight)."""
        ...

    def on_queue(self, rule: str, limit: str, delta: int) -> None:
        """A request joined (+1) or left (-1) the line of `limit` of `rule`."""
        ...


def _matchers(
    plans: Sequence[Plan],
) -> tuple[tuple[Callable[[str], bool], frozenset[str] | None, Rule], ...]:
    """(path matcher, methods, rule) per plan, in order, for `Engine.match`."""
    return tuple((p.rule.pattern.matches, routed_methods(p.rule.methods), p.rule) for p in plans)


class Engine:
    """Decides requests for a list of rules against one backend."""

    def __init__(
        self, rules: Sequence[Rule], backend: Backend, observer: EngineObserver | None = None
    ) -> None:
        if isinstance(rules, Rule) or not isinstance(rules, Sequence):
            raise ConfigError("rules", "a list of Rule", rules)
        seen: dict[str, int] = {}
        plans = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise ConfigError(f"rules[{i}]", "a Rule", rule)
            if rule.name in seen:
                raise ConfigError(
                    f"rules[{i}].name",
                    f"a name unused by rules[{seen[rule.name]}] (give one rule a name=)",
                    rule.name,
                )
            seen[rule.name] = i
            plans.append(Plan(rule))
        self.rules = tuple(rules)
        self.backend = backend
        self._plans = tuple(plans)
        self._by_rule = {p.rule.name: p for p in plans}
        self._matchers = _matchers(plans)
        #: The backend's synchronous twins of decide/release, if it has them (NowaitBackend).
        self._decide_nowait = nowait_method(backend, "decide")
        self._release_nowait = nowait_method(backend, "release")
        #: Or its way of sending a release without awaiting the answer (PostingBackend).
        self._release_post = nowait_method(backend, "release", "post_release")
        self._lease_ids = itertools.count()
        self._lease_prefix = os.urandom(6).hex() + "-"
        self._held: dict[str, LeaseCheck] = {}
        self._renew_every = min((p.min_lease for p in plans), default=math.inf) / 3
        self._renewer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        #: Told of each release and each join or leave of a line (metrics), or None.
        self.observer = observer
        #: (rule, limit index) -> moving average of how long a slot is held, in seconds.
        self._service: dict[tuple[str, int], float] = {}
        if any(p.queued for p in plans) and not isinstance(backend, QueueBackend):
            raise ConfigError(
                "backend", "a backend with waiting lines (queue=), e.g. MemoryBackend()", backend
            )

    def match(self, scope: Scope) -> Rule | None:
        """The first rule whose path and methods match, or None (the request passes).

        The path is the one the wrapped app routes: relative to `root_path`.
        """
        path = scope["path"]
        root = scope.get("root_path")
        if root:
            path = route_path(path, root)
        method = scope.get("method")
        for matches, methods, rule in self._matchers:
            if matches(path) and (methods is None or (method is not None and method in methods)):
                return rule
        return None

    def plan(self, rule: Rule) -> Plan:
        """The compiled plan of `rule`."""
        return self._by_rule[rule.name]

    async def decide(
        self,
        rule: Rule,
        scope: Scope,
        abandon: Abandon | None = None,
        given: Given | None = None,
    ) -> Decision:
        """Decide `scope` against `rule`: all of its limits admit and consume, or none.

        If the rule's only refusal is a full concurrency limit with a `queue`, the
        request waits in line (its other limits consumed meanwhile, refunded if it
        is refused in the end). `abandon()`, if given, is awaited alongside: when
        it completes (the client went away) the request leaves the line at once.
        With `given`, keys, cost, priority and deadline come from it, not `scope`.
        """
        plan = self._by_rule[rule.name]
        if plan.__class__ is BlockedPlan:
            return self._blocked(plan)
        single = plan.single
        if single is not None and given is None:
            # One bucket: no lists, no loop; no await either when decided in this process.
            try:
                key = single[0](scope)
                if key is not None and key.__class__ is not str:
                    # As in the loop below: a key function may still return an awaitable.
                    if inspect.isawaitable(key):
                        key = await key
                    key = None if key is None else str(key)
            except Exception as exc:
                raise _raised("key", single[0], plan, 0, exc) from exc
            if key is None:
                return Decision(rule, True, 200, 0.0, plan, [None])
            one = (single[1].get(key) or plan.entry(0, key),)
            nowait = self._decide_nowait
            verdict = nowait(one) if nowait is not None else await self.backend.decide(one)
            result = verdict.results[0]
            if verdict.admitted:
                return Decision(rule, True, 200, 0.0, plan, [result], None, one)
            status = 503 if plan.limits[0].shared else 429
            return Decision(rule, False, status, result.retry_after, plan, [result])
        cost = rule.cost
        #: A given cost other than the rule's: cached whole bucket checks do not fit.
        recost = False
        if given is not None:
            recost = given.cost != cost
            cost = given.cost
        elif cost.__class__ is not int:
            cost = await self._cost(rule, scope)
        checks: list[Check] = []
        slots: list[int] = []  # index in the rule of each check
        leases: list[LeaseCheck] = []
        #: Check index -> (limit index, rank, fair key text) of leases that may wait in line.
        lines: dict[int, tuple[int, int, str | None]] | None = None
        for i, step, entry, key_func, key_async, cache, p1, p2 in plan.specs:
            if entry is None:
                if given is not None:
                    key = given.keys[i]
                    if key is None:
                        continue
                else:
                    try:
                        key = key_func(scope)
                        if key is None:
                            continue
                        if key.__class__ is not str:
                            if key_async or inspect.isawaitable(key):
                                key = await key
                                if key is None:
                                    continue
                            key = str(key)
                    except Exception as exc:
                        raise _raised("key", key_func, plan, i, exc) from exc
                # Plan.entry inlined for the hit, the common case.
                entry = cache.get(key) or plan.entry(i, key)
            if step == _READY_BUCKET:
                checks.append(_new(BucketCheck, (entry[0], p1, p2, cost)) if recost else entry)
            elif step == _LEASE:
                lease_id = f"{self._lease_prefix}{next(self._lease_ids)}"
                # Built with tuple.__new__: half the cost of calling a NamedTuple
                # class, whose generated __new__ is a Python function.
                lease = _new(LeaseCheck, (entry, p1, p2, lease_id))
                checks.append(lease)
                leases.append(lease)
            elif step == _BUCKET:
                checks.append(_new(BucketCheck, (entry, p1, p2, cost)))
            elif step == _QUEUED_LEASE:
                limit = plan.limits[i]
                if given is None:
                    rank = await _rank(plan, i, scope)
                else:
                    rank = limit.rank(given.priority)
                serial = f"{self._lease_prefix}{next(self._lease_ids)}"
                lease = _new(LeaseCheck, (entry, p1, p2, queue.ticket_id(rank, serial)))
                if limit.queue:
                    if lines is None:
                        lines = {}
                    # The fair key is asked now, though only a request that waits uses
                    # it: every callable runs before the backend is asked, so one that
                    # fails has consumed nothing, busy or not.
                    if given is None:
                        fair = await _fair_text(plan, i, scope)
                    else:
                        fair = None if limit.fair_key is None else given.keys[i]
                    lines[len(checks)] = (i, rank, fair)
                checks.append(lease)
                leases.append(lease)
            else:
                # A window: built per request, its receipt is this request's own.
                checks.append(_new(WindowCheck, (entry, *p1, cost, [])))
            slots.append(i)
        admitted = True
        if checks:
            nowait = self._decide_nowait
            verdict = nowait(checks) if nowait is not None else await self.backend.decide(checks)
            admitted = verdict.admitted
            raw: Sequence[CheckResult] = verdict.results
            waited: float | None = None
            reason: str | None = None
            line_at = -1
            # A rule in shadow mode never makes a request wait: its refusals pass anyway.
            if not admitted and lines is not None and not rule.shadow:
                refused = [k for k, r in enumerate(raw) if not r.admitted]
                if len(refused) == 1 and refused[0] in lines:
                    k = refused[0]
                    line_at = lines[k][0]
                    admitted, raw, reason, waited = await self._line_up(
                        plan, scope, checks, k, lines[k], abandon, given
                    )
            if len(slots) == plan.size:
                # Every limit made a check, in order: no exempt limit.
                results: list[CheckResult | None] = list(raw)
            else:
                results = [None] * plan.size
                for i, r in zip(slots, raw, strict=True):
                    results[i] = r
        else:
            results = [None] * plan.size
            waited = reason = None
            line_at = -1
        if admitted:
            grant = self._hold(tuple(leases), plan) if leases else None
            decision = Decision(rule, True, 200, 0.0, plan, results, grant, checks)
            if waited is not None:
                decision.waited = waited
                decision.line = plan.names[line_at]
            return decision
        status = 503
        wait = 0.0
        for i, (lim, res) in enumerate(zip(plan.limits, results, strict=True)):
            if res is None or res is SKIPPED or res.admitted:
                continue
            if not lim.shared:
                status = 429
            if lim.__class__ is Concurrency and not res.retry_after:
                estimate = self.estimate(plan, i, 0)
                if estimate:
                    res = results[i] = res._replace(retry_after=estimate)
            wait = max(wait, retry_after(lim, res))
        decision = Decision(rule, False, status, wait, plan, results)
        if reason is not None:
            decision.waited = waited
            decision.reason = reason
            decision.line = plan.names[line_at]
        return decision

    async def refund(self, decision: Decision) -> None:
        """Give back the token-bucket and window units an admitted `decision` took, once.

        For a request the app only redirected (see `asgi.redirects`). Its leases
        are left to its grant, released when the response ends.
        """
        units = [c for c in decision.checks if c.__class__ is not LeaseCheck]
        decision.checks = ()
        if units:
            await self.backend.refund(units)

    # -- waiting lines ----------------------------------------------------------

    def estimate(self, plan: Plan, i: int, position: int) -> float:
        """Seconds until limit `i` has a slot for the waiter at `position` (0: next), from
        the observed service time; 0 before any slot was released."""
        service = self._service.get((plan.rule.name, i), 0.0)
        if service <= 0:
            return 0.0
        limit = plan.limits[i]
        assert isinstance(limit, Concurrency)
        return queue.estimate_wait(position, limit.limit, service)

    async def _line_up(
        self,
        plan: Plan,
        scope: Scope,
        checks: list[Check],
        k: int,
        where: tuple[int, int, str | None],
        abandon: Abandon | None,
        given: Given | None = None,
    ) -> tuple[bool, Sequence[CheckResult], str | None, float | None]:
        """Wait in line for check `k`'s slot: (admitted, results, reason, seconds waited).

        `where` is (limit index, rank, fair key text or None), asked before deciding.
        """
        i, rank, fair_text = where
        limit = plan.limits[i]
        assert isinstance(limit, Concurrency)
        lease = checks[k]
        assert isinstance(lease, LeaseCheck)
        backend = self.backend
        assert isinstance(backend, QueueBackend)
        timeout = limit.timeout
        asked = _client_timeout(scope, limit.deadline_header) if given is None else given.timeout
        if asked is not None and asked < timeout:
            timeout = asked
        service = self._service.get((plan.rule.name, i), 0.0)
        fair = "" if fair_text is None else _digest(fair_text)
        line = QueueCheck(
            lease,
            limit.queue,
            rank,
            fair,
            limit.guaranteed,
            queue.max_position(timeout, limit.limit, service, limit.queue),
            # Appointments need to know who comes back (a fair key) and how fast slots free.
            service / limit.limit if fair else 0.0,
        )
        entry = await backend.enqueue(checks, line)
        outcome = entry.outcome
        if outcome == "admitted":
            return True, entry.verdict.results, None, None
        if outcome == "refused":
            return False, entry.verdict.results, None, None
        results = list(entry.verdict.results)
        if outcome != "queued":
            estimate = entry.retry_in or self.estimate(plan, i, entry.position)
            results[k] = results[k]._replace(retry_after=estimate)
            return False, results, QUEUE_FULL if outcome == "full" else TOO_LONG, None
        others = [check for j, check in enumerate(checks) if j != k]
        started = time.monotonic()
        self._queue_changed(plan, i, 1)
        try:
            outcome = await self._await_slot(backend, line, timeout, abandon)
        except BaseException:
            if others:
                self._spawn(backend.refund(others))
            raise
        finally:
            self._queue_changed(plan, i, -1)
        waited = time.monotonic() - started
        if outcome == "granted":
            results[k] = CheckResult(True, 0, 0.0, 0.0)
            return True, results, None, waited
        if others:
            if outcome == ABANDONED:
                self._spawn(backend.refund(others))
            else:
                try:
                    await backend.refund(others)
                except Exception as exc:  # the refusal stands; the quota stays taken
                    logger.warning("could not refund a refused waiter's quota (%r)", exc)
        reason = {"timeout": QUEUE_TIMEOUT, "shed": SHED}.get(outcome, ABANDONED)
        estimate = 0.0
        if reason != ABANDONED and line.spacing:
            try:
                estimate = await backend.appoint(line)
            except Exception as exc:  # the refusal stands; it carries the estimate instead
                logger.warning("could not book an appointment (%r)", exc)
        estimate = estimate or self.estimate(plan, i, max(0, entry.length - 1))
        results[k] = results[k]._replace(retry_after=estimate)
        return False, results, reason, waited

    async def _await_slot(
        self, backend: QueueBackend, line: QueueCheck, timeout: float, abandon: Abandon | None
    ) -> str:
        """The backend's `wait`, cut short (ABANDONED) when `abandon()` completes first."""
        if abandon is None:
            return await backend.wait(line, timeout)
        waiter = asyncio.ensure_future(backend.wait(line, timeout))
        gone = asyncio.ensure_future(abandon())
        try:
            await asyncio.wait((waiter, gone), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            waiter.cancel()  # the backend's wait then leaves the line
            waiter.add_done_callback(partial(self._let_go_late, backend, line))
            raise
        finally:
            if not gone.done():
                gone.cancel()
            elif not gone.cancelled():
                gone.exception()  # retrieved: a receive that failed means the client is gone
        if waiter.done():
            return waiter.result()
        waiter.cancel()
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled() or _cancelling():
                raise  # this task itself is being cancelled
        else:
            # The slot came just as the client left: give it back.
            if waiter.result() == "granted":
                self._spawn(backend.release(line.lease))
        return ABANDONED

    def _let_go_late(
        self, backend: QueueBackend, line: QueueCheck, waiter: asyncio.Future[str]
    ) -> None:
        """Release a slot granted to a waiter whose request was cancelled meanwhile."""
        if not waiter.cancelled() and waiter.exception() is None and waiter.result() == "granted":
            self._spawn(backend.release(line.lease))

    def _queue_changed(self, plan: Plan, i: int, delta: int) -> None:
        if self.observer is not None:
            self.observer.on_queue(plan.rule.name, plan.names[i], delta)

    def _spawn(self, work: Awaitable[Any]) -> None:
        """Run `work` in the background (cleanup that must outlive a cancelled request)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    async def _cost(self, rule: Rule, scope: Scope) -> int:
        """The rule's cost callable asked for `scope`: an integer from 1 to `MAX_COST`,
        else CallableError.

        Not 0: a cost of nothing would admit the request without taking from
        any bucket (an exemption is a key function's None). Not past `MAX_COST`:
        a cost read from the request (`?n=4611686018427387904`) must not make the
        store fail, which `fail="open"` would turn into a free admission.
        """
        func = rule.cost
        assert callable(func)
        try:
            value = func(scope)
            cost = await value if inspect.isawaitable(value) else value
        except Exception as exc:
            raise CallableError(
                "cost", func, rule.name, "", f"raised {type(exc).__name__}"
            ) from exc
        if not isinstance(cost, int) or isinstance(cost, bool) or not 1 <= cost <= MAX_COST:
            raise CallableError(
                "cost",
                func,
                rule.name,
                "",
                f"returned {reprlib.repr(cost)}, not an integer from 1 to 2**53",
            )
        return cost

    # -- live overrides ---------------------------------------------------------

    def swap_rules(
        self, rules: Sequence[Rule], blocks: Mapping[str, Override] | None = None
    ) -> list[str]:
        """Enforce `rules` (the same names, in order) from now on; return the names changed.

        For live overrides: `rules` are the effective rules, `blocks` the block
        in force per rule name. A rule that is the same object as now, under the
        same block, keeps its compiled plan and caches; the others are compiled
        anew. Plans, matchers and rules are assigned together with no await in
        between, so a request sees the old set or the new one, never a mix.
        Requests decided before keep their plan: leases are stored by rule and
        limit name, so they renew and release as before.
        """
        blocks = {} if blocks is None else blocks
        names = [r.name for r in rules if isinstance(r, Rule)]
        current = [p.rule.name for p in self._plans]
        if names != current or len(names) != len(rules):
            raise ConfigError("rules", f"the rules {current}, in that order", names)
        plans: list[Plan] = []
        changed: list[str] = []
        for old, rule in zip(self._plans, rules, strict=True):
            block = blocks.get(rule.name)
            was = old.block if isinstance(old, BlockedPlan) else None
            if rule is old.rule and block is was:
                plans.append(old)
                continue
            plans.append(Plan(rule) if block is None else BlockedPlan(rule, block))
            changed.append(rule.name)
        if not changed:
            return changed
        # Assigned together: nothing else runs on the loop until this method returns.
        self._plans = tuple(plans)
        self._by_rule = {p.rule.name: p for p in plans}
        self._matchers = _matchers(plans)
        self.rules = tuple(p.rule for p in plans)
        self._renew_every = min((p.min_lease for p in plans), default=math.inf) / 3
        return changed

    def apply_overrides(self, resolution: Resolution) -> list[str]:
        """Enforce the effective rules of `resolution` (see `swap_rules`); return those changed."""
        blocks = {e.rule.name: e.block for e in resolution.rules if e.block is not None}
        return self.swap_rules([e.rule for e in resolution.rules], blocks)

    def blocks(self) -> dict[str, Override]:
        """The block override in force per rule name (rules not blocked are absent)."""
        return {p.rule.name: p.block for p in self._plans if isinstance(p, BlockedPlan)}

    def _blocked(self, plan: Plan) -> Decision:
        assert isinstance(plan, BlockedPlan)
        return BlockedDecision(plan)

    # -- leases -----------------------------------------------------------------

    def _hold(self, leases: tuple[LeaseCheck, ...], plan: Plan) -> Grant:
        for lease in leases:
            self._held[lease.lease_id] = lease
        renewer = self._renewer
        if renewer is None or renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        return Grant(leases, False, time.monotonic(), plan)

    async def release(self, grant: Grant) -> None:
        """Free a grant's slots. Releasing the same grant twice raises `LeaseError`."""
        if self.release_nowait(grant):
            return
        self._let_go(grant)
        for lease in grant.leases:
            await self._release_lease(lease)

    def release_nowait(self, grant: Grant) -> bool:
        """`release`, done at once if the backend answers without waiting (`NowaitBackend`)
        or can send it without waiting for the answer (`PostingBackend`).

        False, having done nothing, when the caller must `await release(grant)`.
        """
        nowait = self._release_nowait
        if nowait is None:
            post = self._release_post
            # Released already: `release` raises, as a second release must.
            if post is None or grant.released or not post(grant.leases[0]):
                return False
            self._let_go(grant)
            for lease in grant.leases[1:]:
                if not post(lease):
                    self._spawn(self._release_lease(lease))
            return True
        self._let_go(grant)
        for lease in grant.leases:
            try:
                nowait(lease)
            except Exception:
                _release_failed(lease)
        return True

    async def _release_lease(self, lease: LeaseCheck) -> None:
        try:
            await self.backend.release(lease)
        except Exception:
            _release_failed(lease)

    def _let_go(self, grant: Grant) -> None:
        """Mark `grant` released and stop renewing its leases."""
        if grant.released:
            raise LeaseError("this grant was already released")
        grant.released = True
        plan = grant.plan
        if plan is not None:
            # A slot's service time: the moving average behind wait estimates.
            held = time.monotonic() - grant.started
            service = self._service
            name = plan.rule.name
            for i, kind in enumerate(plan.kinds):
                if kind == _LEASE:
                    service[name, i] = queue.ewma(service.get((name, i), 0.0), held)
        if self.observer is not None:
            self.observer.on_release(grant)
        for lease in grant.leases:
            self._held.pop(lease.lease_id, None)

    def release_soon(self, grant: Grant) -> None:
        """Release without waiting: for `finally` blocks of cancelled or failed requests."""
        if grant.released:
            return
        self._spawn(self.release(grant))

    def held(self) -> int:
        """Leases this engine holds for running requests."""
        return len(self._held)

    async def _renew_loop(self) -> None:
        """Renew every held lease each lease/3 seconds; exit when none are held."""
        every = self._renew_every
        while self._held:
            await asyncio.sleep(every)
            batch = list(self._held.values())
            if not batch:
                break
            try:
                alive = await self.backend.renew(batch)
            except Exception as exc:
                logger.warning("lease renewal failed (%s); retrying in %.1fs", exc, every)
                continue
            lost = [
                lease
                for lease, ok in zip(batch, alive, strict=True)
                if not ok and lease.lease_id in self._held
            ]
            if lost:
                logger.warning("%d lease(s) expired before renewal (store lost them)", len(lost))

    async def aclose(self) -> None:
        """Stop background work (the renewal loop and pending releases)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._renewer is not None and not self._renewer.done():
            self._renewer.cancel()
