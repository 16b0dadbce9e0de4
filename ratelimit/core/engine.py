"""The engine: turns a matched rule and a request scope into a `Decision`.

It computes keys and cost, asks the backend for all of the rule's limits in
one call (all or nothing: buckets, windows and concurrency leases alike), and
hands the leases of admitted requests to its `Holding`, which renews them
with one background loop; a request that may wait for a slot goes through
its `Lines`. Live overrides recompile the rules they change (`swap_rules`)
into new plans, so a request never looks one up; a blocked rule is refused
without a backend call.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from .._errors import CallableError, ConfigError
from .._types import Scope
from ..algorithms import queue
from ..algorithms.leases import weighted_id
from ..backends.base import (
    Backend,
    BucketCheck,
    Check,
    CheckResult,
    LeaseCheck,
    QueueBackend,
    WindowCheck,
    nowait_method,
)
from ..policy.costs import Cost
from ..policy.effective import Resolution
from ..policy.limits import Concurrency
from ..policy.overrides import Override
from ..policy.paths import route_path
from ..policy.rules import Rule, routed_methods
from . import asking, settling
from .decision import OVERSIZED, Abandon, BlockedDecision, Decision, EngineObserver, Given
from .holding import Holding
from .plan import (
    BUCKET,
    LEASE,
    QUEUED_LEASE,
    READY_BUCKET,
    SKIPPED,
    BlockedPlan,
    OneBucketPlan,
    Plan,
    compile_plan,
    new,
    retry_after,
)
from .spread import Spread
from .waiting import Lines


def _matchers(
    plans: Sequence[Plan],
) -> tuple[tuple[Callable[[str], bool], frozenset[str] | None, Rule], ...]:
    """(path matcher, methods, rule) per plan with a path, in order, for `Engine.match`."""
    return tuple(
        (p.rule.pattern.matches, routed_methods(p.rule.methods), p.rule)
        for p in plans
        if p.rule.pattern is not None
    )


class Engine:
    """Decides requests for a list of rules against one backend.

    `release`, `release_nowait`, `release_soon` and `aclose` are its `holding`'s
    (the leases of admitted requests), `estimate` its `lines`' (waiting lines):
    bound once here, so a release costs no extra call.
    """

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
            plans.append(compile_plan(rule))
        self.rules = tuple(rules)
        self.backend = backend
        self._plans = tuple(plans)
        #: The plan in force per rule name.
        self.by_name = {p.rule.name: p for p in plans}
        self._matchers = _matchers(plans)
        #: The backend's synchronous twin of decide, if it has one (NowaitBackend).
        self._decide_nowait = nowait_method(backend, "decide")
        self._lease_ids = itertools.count()
        self._lease_prefix = os.urandom(6).hex() + "-"
        #: Told of each release and each join or leave of a line (metrics), or None.
        self.observer = observer
        #: The leases of running requests, renewed and released (see `Holding`).
        self.holding = holding = Holding(backend, observer)
        holding.renew_every = min((p.min_lease for p in plans), default=math.inf) / 3
        self.lines = Lines(holding, observer)
        #: Sends admitted requests' settlements (see `Decision.settle`).
        self.settlements = settling.Settlements(backend, observer, holding.background)
        #: When refused callers are told to come back (see `Spread`).
        self.spread = Spread(holding, getattr(backend, "clock", None) or time.monotonic)
        self.release = holding.release
        self.release_nowait = holding.release_nowait
        self.release_soon = holding.release_soon
        self.aclose = holding.aclose
        self.estimate = self.lines.estimate
        _check_lines(plans, backend)

    def add(self, rule: Rule) -> None:
        """Decide `rule` too, after the others (a rule added before start-up, e.g. a
        route's own limits); ConfigError for a name in use."""
        if not isinstance(rule, Rule):
            raise ConfigError("rule", "a Rule", rule)
        if rule.name in self.by_name:
            raise ConfigError(
                "rule.name", f"a name unused by the rules {list(self.by_name)}", rule.name
            )
        plan = compile_plan(rule)
        _check_lines([plan], self.backend)
        # As in `swap_rules`: assigned together, with no await in between.
        self._plans = (*self._plans, plan)
        self.by_name = {**self.by_name, rule.name: plan}
        self._matchers = _matchers(self._plans)
        self.rules = (*self.rules, rule)
        self.holding.renew_every = min(self.holding.renew_every, plan.min_lease / 3)

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
        return self.by_name[rule.name]

    def decide(
        self,
        rule: Rule,
        scope: Scope,
        abandon: Abandon | None = None,
        given: Given | None = None,
    ) -> Coroutine[Any, Any, Decision]:
        """Decide `scope` against `rule`: all of its limits admit and consume, or none.

        If the rule's only refusal is a full concurrency limit with a `queue`, the
        request waits in line (its other limits consumed meanwhile, refunded if it
        is refused in the end). `abandon()`, if given, is awaited alongside: when
        it completes (the client went away) the request leaves the line at once.
        With `given`, keys, cost, priority and deadline come from it, not `scope`.

        The rule's kind of plan picks the coroutine that decides (no other await
        in between: one coroutine per decision, as a plain `async def`).
        """
        plan = self.by_name[rule.name]
        if plan.__class__ is Plan:
            return self._decide(plan, scope, abandon, given)
        if isinstance(plan, OneBucketPlan):
            return self._decide_one(plan, scope, given)
        assert isinstance(plan, BlockedPlan)
        return _blocked(plan)

    async def _decide(
        self, plan: Plan, scope: Scope, abandon: Abandon | None, given: Given | None
    ) -> Decision:
        """`decide` for any rule: every limit in order, then the line if one refused."""
        rule = plan.rule
        cost = plan.static_cost
        #: A cost other than the rule's constant one: cached whole bucket checks do not fit.
        recost = False
        if given is not None:
            recost = given.cost != cost
            cost = given.cost
        elif cost is None:
            recost = True
            cost = await asking.cost(rule, scope)
        #: The units each limit takes of the cost.
        taken = plan.static_units
        if recost or taken is None:
            taken = _units(plan, cost)
        checks: list[Check] = []
        slots: list[int] = []  # index in the rule of each check
        leases: list[LeaseCheck] = []
        #: Check index -> (limit index, rank, fair key text) of leases that may wait in line.
        lines: dict[int, tuple[int, int, str | None]] | None = None
        #: The limit a weighted request is too heavy for, ever (-1: none).
        oversized = -1
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
                        raise asking.raised("key", key_func, plan, i, exc) from exc
                # Plan.entry inlined for the hit, the common case.
                entry = cache.get(key) or plan.entry(i, key)
            if step == READY_BUCKET:
                if recost:
                    entry = new(BucketCheck, (entry[0], p1, p2, taken[i]))
                checks.append(entry)
            elif step == LEASE:
                lease_id = f"{self._lease_prefix}{next(self._lease_ids)}"
                if plan.limits[i].weighted:
                    weight = taken[i]
                    if weight == 0:
                        continue  # holds nothing
                    if weight > p1:
                        oversized = i
                        break
                    lease_id = weighted_id(lease_id, weight)
                # Built with tuple.__new__: half the cost of calling a NamedTuple
                # class, whose generated __new__ is a Python function.
                lease = new(LeaseCheck, (entry, p1, p2, lease_id))
                checks.append(lease)
                leases.append(lease)
            elif step == BUCKET:
                checks.append(new(BucketCheck, (entry, p1, p2, taken[i])))
            elif step == QUEUED_LEASE:
                limit = plan.limits[i]
                serial = f"{self._lease_prefix}{next(self._lease_ids)}"
                if limit.weighted:
                    weight = taken[i]
                    if weight == 0:
                        continue  # holds nothing
                    if weight > p1:
                        oversized = i
                        break
                    serial = weighted_id(serial, weight)
                if given is None:
                    rank = await asking.rank(plan, i, scope)
                else:
                    rank = limit.rank(given.priority)
                lease = new(LeaseCheck, (entry, p1, p2, queue.ticket_id(rank, serial)))
                if limit.queue:
                    if lines is None:
                        lines = {}
                    # The fair key is asked now, though only a request that waits uses
                    # it: every callable runs before the backend is asked, so one that
                    # fails has consumed nothing, busy or not.
                    if given is None:
                        fair = await asking.fair_text(plan, i, scope)
                    else:
                        fair = None if limit.fair_key is None else given.keys[i]
                    lines[len(checks)] = (i, rank, fair)
                checks.append(lease)
                leases.append(lease)
            else:
                # A window: built per request, its receipt is this request's own.
                checks.append(new(WindowCheck, (entry, *p1, taken[i], [])))
            slots.append(i)
        if oversized >= 0:
            return _oversized(plan, oversized)
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
                    admitted, raw, reason, waited = await self.lines.line_up(
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
            grant = self.holding.hold(tuple(leases), plan) if leases else None
            decision = Decision(rule, True, 200, 0.0, plan, results, grant, checks, cost, self)
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
        if reason is None and not rule.shadow:
            # Not from a line (its refusals carry their place's estimate or appointment).
            wait = self.spread.refused(plan, results, checks, slots)
        decision = Decision(rule, False, status, wait, plan, results)
        if reason is not None:
            decision.waited = waited
            decision.reason = reason
            decision.line = plan.names[line_at]
        return decision

    async def _decide_one(self, plan: OneBucketPlan, scope: Scope, given: Given | None) -> Decision:
        """`decide` for the commonest rule, one per-caller bucket of constant cost: no
        lists, no loop; no await either when the backend decides in this process."""
        rule = plan.rule
        if given is None:
            key_func = plan.key
            try:
                key = key_func(scope)
                if key is not None and key.__class__ is not str:
                    # As in `decide`'s loop: a key function may still return an awaitable.
                    if inspect.isawaitable(key):
                        key = await key
                    key = None if key is None else str(key)
            except Exception as exc:
                raise asking.raised("key", key_func, plan, 0, exc) from exc
        else:
            key = given.keys[0]
        if key is None:
            return Decision(rule, True, 200, 0.0, plan, [None])
        check = plan.cache.get(key) or plan.entry(0, key)
        if given is not None and given.cost != check[3]:
            # A given cost other than the rule's: the cached check does not fit.
            check = new(BucketCheck, (check[0], check[1], check[2], _units(plan, given.cost)[0]))
        one = (check,)
        nowait = self._decide_nowait
        verdict = nowait(one) if nowait is not None else await self.backend.decide(one)
        result = verdict.results[0]
        if verdict.admitted:
            # The rule's constant cost is the units its one bucket (counting requests) takes.
            cost: Cost = check[3] if given is None else given.cost
            return Decision(rule, True, 200, 0.0, plan, [result], None, one, cost, self)
        status = 503 if plan.limits[0].shared else 429
        results: list[CheckResult | None] = [result]
        wait = result.retry_after if rule.shadow else self.spread.refused(plan, results, one, (0,))
        return Decision(rule, False, status, wait, plan, results)

    async def settle(self, decision: Decision, actual: Cost) -> bool:
        """Settle `decision`, which this engine admitted, at `actual` (see `settling`)."""
        return await self.settlements.settle(
            decision, actual, self.by_name.get(decision.rule.name)
        )

    async def refund(self, decision: Decision) -> None:
        """Give back the token-bucket and window units an admitted `decision` took, once.

        For a request the app only redirected (see `asgi.redirects`). Its leases
        are left to its grant, released when the response ends.
        """
        units = [c for c in decision.checks if c.__class__ is not LeaseCheck]
        decision.checks = ()
        if units:
            await self.backend.refund(units)

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
            plans.append(compile_plan(rule, block))
            changed.append(rule.name)
        if not changed:
            return changed
        # Assigned together: nothing else runs on the loop until this method returns.
        self._plans = tuple(plans)
        self.by_name = {p.rule.name: p for p in plans}
        self._matchers = _matchers(plans)
        self.rules = tuple(p.rule for p in plans)
        self.holding.renew_every = min((p.min_lease for p in plans), default=math.inf) / 3
        return changed

    def apply_overrides(self, resolution: Resolution) -> list[str]:
        """Enforce the effective rules of `resolution` (see `swap_rules`); return those changed."""
        blocks = {e.rule.name: e.block for e in resolution.rules if e.block is not None}
        return self.swap_rules([e.rule for e in resolution.rules], blocks)

    def blocks(self) -> dict[str, Override]:
        """The block override in force per rule name (rules not blocked are absent)."""
        return {p.rule.name: p.block for p in self._plans if isinstance(p, BlockedPlan)}


def _units(plan: Plan, cost: Cost) -> tuple[int, ...]:
    """Units each limit of `plan` takes of `cost` (a weighted pool's: slots held); a
    counted dimension the cost lacks is the cost function's error, never free."""
    try:
        return plan.units(cost)
    except ValueError as exc:
        rule = plan.rule
        raise CallableError("cost", rule.cost, rule.name, "", str(exc)) from None


def _oversized(plan: Plan, i: int) -> Decision:
    """The refusal of a request that needs more of limit `i`'s slots than it has: asked
    of no backend, nothing consumed, and no retry would admit it (`OVERSIZED`)."""
    results: list[CheckResult | None] = [SKIPPED] * plan.size
    results[i] = CheckResult(False, 0, 0.0, 0.0)
    status = 503 if plan.limits[i].shared else 429
    decision = Decision(plan.rule, False, status, math.inf, plan, results)
    decision.reason = OVERSIZED
    return decision


def _check_lines(plans: Sequence[Plan], backend: Backend) -> None:
    """ConfigError if a plan has a waiting line the backend cannot keep."""
    if any(p.queued for p in plans) and not isinstance(backend, QueueBackend):
        raise ConfigError(
            "backend", "a backend with waiting lines (queue=), e.g. MemoryBackend()", backend
        )


async def _blocked(plan: BlockedPlan) -> Decision:
    """A blocked rule's refusal (see `BlockedDecision`): no backend call."""
    return BlockedDecision(plan)
