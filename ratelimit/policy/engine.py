"""The engine: turns a matched rule and a request scope into a `Decision`.

It computes keys and cost, asks the backend for the rule's native limits in
one call (all or nothing), then the rule's Window if any (refunding the native
limits if the window refuses), and keeps the leases of running requests alive
with one background renewal loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .._errors import ConfigError, LeaseError
from .._types import Scope
from ..backends.base import Backend, BucketCheck, Check, LeaseCheck, StoreKey
from .limits import Concurrency, Limit, TokenBucket, Window
from .rules import Rule

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


class Decision(NamedTuple):
    """The answer for one request: admitted or refused, and why."""

    rule: Rule
    allowed: bool
    #: 200 when allowed; 429 (the caller's own quota) or 503 (shared capacity) when refused.
    status: int
    #: Seconds to wait before retrying (0 when allowed).
    retry_after: float
    states: tuple[LimitState, ...]
    grant: Grant | None = None

    @property
    def violated(self) -> list[str]:
        """Names of the limits that refused."""
        return [s.name for s in self.states if not s.admitted and not s.exempt and not s.skipped]


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A rule with everything the hot path needs precomputed."""

    rule: Rule
    names: tuple[str, ...]
    limits: tuple[Limit, ...]
    window_index: int
    min_lease: float


#: Recent caller digests kept to skip re-hashing hot keys; cleared whole when full.
_DIGEST_CACHE = 4096


def _digest(text: str) -> str:
    """The stored form of a caller key: fixed size, no raw request bytes."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _report_refunded(
    states: list[LimitState | None], slots: list[int], checks: list[Check]
) -> None:
    """After a refund, report the native limits as untouched (as a refused verdict does)."""
    for i, check in zip(slots, checks, strict=True):
        s = states[i]
        assert s is not None
        if isinstance(check, BucketCheck):
            reset = max(0.0, s.reset_after - check.cost * check.interval)
            remaining = min(check.burst, s.remaining + check.cost)
            states[i] = s._replace(remaining=remaining, reset_after=reset)
        else:
            states[i] = s._replace(remaining=s.remaining + 1)


class Engine:
    """Decides requests for a list of rules against one backend."""

    def __init__(self, rules: Sequence[Rule], backend: Backend) -> None:
        if isinstance(rules, Rule) or not isinstance(rules, Sequence):
            raise ConfigError("rules", "a list of Rule", rules)
        seen: dict[str, int] = {}
        compiled = []
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
            window = [j for j, lim in enumerate(rule.limits) if isinstance(lim, Window)]
            leases = [lim.lease for lim in rule.limits if isinstance(lim, Concurrency)]
            compiled.append(
                _Compiled(
                    rule=rule,
                    names=tuple(rule.limit_names()),
                    limits=rule.limits,
                    window_index=window[0] if window else -1,
                    min_lease=min(leases) if leases else math.inf,
                )
            )
        self.rules = tuple(rules)
        self.backend = backend
        self._compiled = tuple(compiled)
        self._by_rule = {c.rule.name: c for c in compiled}
        self._window_limiters: dict[int, Any] = {}
        self._digests: dict[str, str] = {}
        self._lease_ids = itertools.count()
        self._lease_prefix = os.urandom(6).hex() + "-"
        self._held: dict[str, LeaseCheck] = {}
        self._renew_every = min((c.min_lease for c in compiled), default=math.inf) / 3
        self._renewer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        #: Called with each grant as it is released (metrics count the slots in flight).
        self.on_release: Callable[[Grant], None] | None = None

    def match(self, scope: Scope) -> Rule | None:
        """The first rule whose path and methods match, or None (the request passes)."""
        path = scope["path"]
        method = scope.get("method")
        for c in self._compiled:
            rule = c.rule
            if rule.pattern.matches(path) and (
                rule.methods is None or (method is not None and method in rule.methods)
            ):
                return rule
        return None

    async def decide(self, rule: Rule, scope: Scope) -> Decision:
        """Decide `scope` against `rule`: all of its limits admit and consume, or none."""
        c = self._by_rule[rule.name]
        cost = rule.cost
        if not isinstance(cost, int):
            value = cost(scope)
            cost = await value if inspect.isawaitable(value) else value
            if not isinstance(cost, int) or isinstance(cost, bool) or cost < 0:
                raise ConfigError(
                    f"rules[{rule.name}].cost", "an integer >= 0 from the cost callable", cost
                )
        checks: list[Check] = []
        slots: list[int] = []  # index in rule.limits of each check
        callers: list[str | None] = []
        digests = self._digests
        for i, lim in enumerate(c.limits):
            key = lim.key(scope)
            if key is None:
                callers.append(None)
                continue
            if key.__class__ is not str and (lim.key_is_async or inspect.isawaitable(key)):
                key = await key  # type: ignore[misc]
                if key is None:
                    callers.append(None)
                    continue
            if lim.shared and key == "*":
                caller = "*"
            else:
                text = str(key)
                caller = digests.get(text)  # type: ignore[assignment]
                if caller is None:
                    if len(digests) >= _DIGEST_CACHE:
                        digests.clear()
                    caller = digests[text] = _digest(text)
            callers.append(caller)
            if i == c.window_index:
                continue
            skey = StoreKey(rule.name, c.names[i], caller)
            if isinstance(lim, TokenBucket):
                checks.append(BucketCheck(skey, lim.interval, lim.burst, cost))
            elif isinstance(lim, Concurrency):
                lease_id = f"{self._lease_prefix}{next(self._lease_ids)}"
                checks.append(LeaseCheck(skey, lim.limit, lim.lease, lease_id))
            slots.append(i)
        states: list[LimitState | None] = [None] * len(c.limits)
        admitted = True
        if checks:
            verdict = await self.backend.decide(checks)
            admitted = verdict.admitted
            for i, check, result in zip(slots, checks, verdict.results, strict=True):
                lim = c.limits[i]
                retry = result.retry_after
                reset = result.reset_after
                if isinstance(check, LeaseCheck):
                    if not result.admitted:
                        assert isinstance(lim, Concurrency)
                        retry = lim.retry_after
                elif result.remaining == 0:
                    # Time until one unit is free again: what a client waits for.
                    reset = (
                        retry
                        if not result.admitted
                        else max(0.0, reset - (check.burst - 1) * check.interval)
                    )
                states[i] = LimitState(
                    lim, c.names[i], result.admitted, False, False, result.remaining, retry, reset
                )
        w = c.window_index
        if w >= 0:
            wcaller = callers[w]
            if wcaller is None:
                pass
            elif not admitted:
                states[w] = LimitState(c.limits[w], c.names[w], False, skipped=True)
            else:
                states[w], ok = await self._hit_window(c, w, wcaller, cost)
                if not ok:
                    admitted = False
                    if checks:
                        await self.backend.refund(checks)
                        _report_refunded(states, slots, checks)
        for i, lim in enumerate(c.limits):
            if states[i] is None:
                states[i] = LimitState(lim, c.names[i], True, exempt=True)
        final: tuple[LimitState, ...] = tuple(s for s in states if s is not None)
        if admitted:
            leases = tuple(ch for ch in checks if isinstance(ch, LeaseCheck))
            grant = self._hold(leases) if leases else None
            return Decision(rule, True, 200, 0.0, final, grant)
        refused = [s for s in final if not s.admitted and not s.exempt and not s.skipped]
        status = 429 if any(not s.limit.shared for s in refused) else 503
        retry_after = max((s.retry_after for s in refused), default=0.0)
        return Decision(rule, False, status, retry_after, final)

    async def _hit_window(
        self, c: _Compiled, i: int, caller: str, cost: int
    ) -> tuple[LimitState, bool]:
        lim = c.limits[i]
        assert isinstance(lim, Window)
        limiter = self._window_limiters.get(id(lim))
        if limiter is None:
            limiter = lim.limiter(self.backend.window_storage())
            self._window_limiters[id(lim)] = limiter
        ids = (c.rule.name, c.names[i], caller)
        ok = bool(await limiter.hit(lim.item, *ids, cost=cost))
        stats = await limiter.get_window_stats(lim.item, *ids)
        wait = max(0.0, stats.reset_time - time.time())
        remaining = max(0, int(stats.remaining))
        return LimitState(
            lim, c.names[i], ok, False, False, remaining, 0.0 if ok else wait, wait
        ), ok

    # -- leases -----------------------------------------------------------------

    def _hold(self, leases: tuple[LeaseCheck, ...]) -> Grant:
        for lease in leases:
            self._held[lease.lease_id] = lease
        renewer = self._renewer
        if renewer is None or renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        return Grant(leases)

    async def release(self, grant: Grant) -> None:
        """Free a grant's slots. Releasing the same grant twice raises `LeaseError`."""
        if grant.released:
            raise LeaseError("this grant was already released")
        grant.released = True
        if self.on_release is not None:
            self.on_release(grant)
        for lease in grant.leases:
            self._held.pop(lease.lease_id, None)
        for lease in grant.leases:
            try:
                await self.backend.release(lease)
            except Exception:
                # The lease will expire by itself within its ttl; never fail the response.
                logger.warning(
                    "could not release lease %s; it expires in %ss", lease.key, lease.ttl
                )

    def release_soon(self, grant: Grant) -> None:
        """Release without waiting: for `finally` blocks of cancelled or failed requests."""
        if grant.released:
            return
        task = asyncio.get_running_loop().create_task(self.release(grant))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
