"""`Limiter`: the rules and the backend, decided for anyone, with or without a request.

A GPU worker that pulls jobs from a queue takes its slot from the same
fleet-wide pool as the HTTP endpoint in front of it:

    limiter = Limiter(rules=[...], backend=RedisBackend(url))
    async with limiter.acquire("images", key="alice") as decision:
        ...                           # holds every limit of the rule; released on exit
    decision = await limiter.check("chat", key="alice")   # rate limits: a value

The `Limiter` owns everything that is not HTTP: the engine, live overrides
(`overrides`, followed by every decision), the fail policies with the
in-process fallback, the observer (metrics), callable-error logging and the
top-callers publisher. `RateLimitMiddleware` is its ASGI face.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from time import perf_counter
from types import TracebackType
from typing import Any

from .._errors import CallableError, ConfigError
from .._types import Scope
from ..backends.base import Backend
from ..backends.memory import MemoryBackend
from ..backends.stores import override_store, top_store
from ..core.top import publisher_for
from ..policy.config import ConfigSource, Settings, load_config
from ..policy.costs import Cost
from ..policy.effective import Resolution
from ..policy.overlap import shadowed
from ..policy.rules import FAIL_POLICIES, FailPolicy, Rule
from ..policy.top import TopCallers
from . import caller, statistics
from .acquisition import Acquisition
from .callables import CallableErrorLog
from .caller import Key
from .decision import Abandon, Decision, FailedDecision, Given
from .engine import Engine
from .live import LiveOverrides
from .metrics import DEFAULT_METRICS, DefaultMetrics, Metrics
from .observer import Observer
from .peek import would
from .plan import Plan, new
from .statistics import LimitStatistics
from .workers import WORKERS_CHECK_DELAY, warn_if_workers

logger = logging.getLogger("ratelimit")

#: The scope of a decision with a `Given`: the engine asks it nothing.
_NO_SCOPE: Scope = {}


class Limiter:
    """Decides the named rules against one backend, for requests and for plain callers.

    `backend` defaults to a `MemoryBackend()`. `fail` is what rules without
    their own `fail=` do when the backend errors: "open" (admit), "closed"
    (refuse: 503, `RateLimited` from `acquire`) or "local" (decide in this
    process, each limit multiplied by `local_share`: 1 / the number of
    processes). `shadow=True` puts every rule in shadow mode. `config` is a
    TOML file or dict (see `policy.config`); its rules come before `rules`.
    `metrics` is an `Observer`: by default the process's `Metrics()` on the
    global registry (shared by every limiter; off when the config file says
    `metrics = false`), None for none. With `top=` and a Redis backend
    the heaviest callers are published for `ratelimit top`.

    Live overrides (`overrides`) start with `await limiter.start()`, with
    `async with limiter:`, or on first use; `aclose()` stops them and closes
    the backend.
    """

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        *,
        backend: Backend | None = None,
        fail: FailPolicy | None = None,
        local_share: float = 1.0,
        shadow: bool = False,
        config: ConfigSource | Settings | None = None,
        metrics: Observer | DefaultMetrics | None = DEFAULT_METRICS,
        top: TopCallers | None = None,
    ) -> None:
        #: The configuration file's settings, if `config` was given.
        self.settings: Settings | None = None
        if config is not None:
            settings = config if isinstance(config, Settings) else load_config(config)
            self.settings = settings
            rules = [*settings.rules, *rules]
            if backend is None:
                backend = build_backend(settings.backend)
            fail = fail or settings.fail
        fail = fail or "open"
        if backend is None:
            backend = MemoryBackend()
        elif not isinstance(backend, Backend):
            raise ConfigError(
                "backend", "a Backend such as MemoryBackend() or RedisBackend(url)", backend
            )
        if fail not in FAIL_POLICIES:
            raise ConfigError("fail", '"open", "closed" or "local"', fail)
        if not isinstance(shadow, bool):
            raise ConfigError("shadow", "true or false", shadow)
        if shadow and isinstance(rules, Sequence) and not isinstance(rules, Rule):
            rules = [_in_shadow(r) if isinstance(r, Rule) else r for r in rules]
        if (
            not isinstance(local_share, (int, float))
            or isinstance(local_share, bool)
            or not 0 < local_share <= 1
        ):
            raise ConfigError("local_share", "a fraction in (0, 1], e.g. 1 / workers", local_share)
        if metrics is DEFAULT_METRICS:
            on = self.settings is None or self.settings.metrics
            metrics = Metrics() if on else None
        elif metrics is not None and not isinstance(metrics, Observer):
            raise ConfigError(
                "metrics", "a ratelimit Metrics object (or another Observer)", metrics
            )
        if top is not None and not isinstance(top, TopCallers):
            raise ConfigError("top", "a TopCallers", top)
        self.shadow = shadow
        self.fail: FailPolicy = fail
        self.local_share = float(local_share)
        self.backend = backend
        #: Told of every decision, release, line change, failure and limit change.
        self.metrics = metrics
        self.engine = Engine(rules, backend, metrics)
        for later, earlier in shadowed(self.engine.rules):
            logger.warning(
                "ratelimit: rule %r (%s) never applies: the earlier rule %r (%s) matches every "
                "request it would (the first matching rule wins; put the narrower rule first)",
                later.name,
                _describe(later),
                earlier.name,
                _describe(earlier),
            )
        if metrics is not None:
            metrics.on_start(self.engine)
        #: Live overrides of the rules, in the backend's store (Redis: the fleet's).
        self.overrides = LiveOverrides(
            self.engine.rules, override_store(backend), self._apply_overrides
        )
        #: Publishes `top`'s windows to Redis for `ratelimit top` (None: nothing to publish).
        self.top_publisher = (
            None
            if top is None
            else publisher_for(top, top_store(backend), worker=self.overrides.worker)
        )
        #: The in-process engine of fail="local" (made on its first use).
        self._local: Engine | None = None
        #: True while the backend fails (logged once, at the change).
        self.failing = False
        #: Logs failing key/cost/priority functions, each at most once per 10 s.
        self.callable_errors = CallableErrorLog(logger)
        #: False until `start` ran (explicitly, or on first use): read per request.
        self.started = False

    # -- the caller's API -----------------------------------------------------------

    def acquire(
        self,
        rule: str,
        key: Key = None,
        *,
        cost: Cost | None = None,
        priority: object = None,
        timeout: float | None = None,
    ) -> Acquisition:
        """`async with limiter.acquire(rule, key=...) as decision:` holds every limit of `rule`.

        All or nothing, as a request would: token buckets and windows consume
        `cost` (default: the rule's), concurrency slots are held, renewed while
        the block runs and released when it ends, raises or is cancelled. A
        full pool with a line makes the caller wait in it (same line, `priority`
        class and fair order as requests; `timeout` seconds at most, never more
        than the limit's own). Raises `RateLimited` when refused; the block then
        does not run. `key` is the caller's text for the rule's per-caller
        limits, or a mapping of limit name -> text (None: exempt from it);
        `keys.GLOBAL` limits stay global.
        """
        return Acquisition(partial(self._decide, rule, key, cost, priority, timeout, peek=None))

    async def check(self, rule: str, key: Key = None, *, cost: Cost | None = None) -> Decision:
        """Decide `rule` for `key` now and return the decision; it consumes when allowed.

        For rules of rate limits (token buckets, windows), like `limits`' `hit()`:
        a rule with a `Concurrency` limit raises `ConfigError` (a slot must be
        given back: use `acquire`). A refusal is a value (`allowed` False,
        `retry_after`, `states`); a rule in shadow mode returns it as it is.
        """
        _, decision = await self._decide(rule, key, cost, None, None, peek=False)
        return decision

    async def peek(self, rule: str, key: Key = None, *, cost: Cost | None = None) -> Decision:
        """Whether `check` would admit now, consuming nothing (like `limits`' `test()`).

        The backend decides with cost 0, which takes nothing and writes nothing,
        and each limit's answer for `cost` is computed from its state: `allowed`
        and `remaining` are exact. `retry_after` is exact for buckets and fixed
        windows; for a sliding or moving window it is when the window next frees
        units, which may be too few for `cost` > 1 (a lower bound). Not counted in
        metrics.
        """
        _, zero = await self._decide(rule, key, cost, None, None, peek=True)
        if zero.__class__ is not Decision:
            return zero  # a block or a fail policy answered: nothing to compute
        plan = self.engine.plan(zero.rule)
        return would(plan, zero, plan.units(caller.cost(plan, cost)))

    async def statistics(self, rule: str, key: Key = None) -> tuple[LimitStatistics, ...]:
        """How full each concurrency limit of `rule` is now, for `key` (per-caller limits).

        From the backend: this process on `MemoryBackend`, the fleet on Redis.
        """
        plan = self._plan(rule)
        texts = caller.texts(plan, key, leases_only=True)
        return await statistics.gather(plan, texts, self.backend)

    def add_rule(self, rule: Rule) -> None:
        """Decide `rule` too (a FastAPI route's `RateLimit`): shares backend, overrides,
        metrics, `ratelimit status`. ConfigError once started or for a name in use."""
        if not isinstance(rule, Rule):
            raise ConfigError("rule", "a Rule", rule)
        if self.started:
            expected = "a rule added before the limiter starts (at import, beside the routes)"
            raise ConfigError("rule", expected, rule.name)
        rule = _in_shadow(rule) if self.shadow else rule
        self.engine.add(rule)
        self.overrides.add(rule)
        if self.metrics is not None:
            self.metrics.on_limits(self.engine)

    # -- lifetime -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the live overrides: read the store, then follow it (shared stores).

        Later calls return at once. A store that cannot be read does not stop
        anything: decisions use the configuration while the watcher keeps trying.
        """
        if self.started:
            return
        self.started = True
        if isinstance(self.backend, MemoryBackend):
            # Later, not now: a server may still be starting the other workers.
            asyncio.get_running_loop().call_later(WORKERS_CHECK_DELAY, warn_if_workers)
        try:
            await self.overrides.start()
        except Exception:
            logger.exception("ratelimit: could not start live overrides; serving as configured")
        if self.top_publisher is not None:
            await self.top_publisher.start()

    async def stop(self) -> None:
        """Stop following overrides and publishing top callers (decisions go on)."""
        try:
            await self.overrides.aclose()
        except Exception:
            logger.exception("ratelimit: could not stop live overrides cleanly")
        if self.top_publisher is not None:
            await self.top_publisher.aclose()

    async def aclose(self) -> None:
        """`stop`, end background work (lease renewal, releases) and close the backend."""
        await self.stop()
        await self.engine.aclose()
        if self._local is not None:
            await self._local.aclose()
        await self.backend.aclose()

    async def __aenter__(self) -> Limiter:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- shared with the middleware -------------------------------------------------

    async def decide(
        self,
        rule: Rule,
        scope: Scope,
        abandon: Abandon | None = None,
        given: Given | None = None,
        *,
        observe: bool = True,
    ) -> tuple[Engine, Decision]:
        """Decide `rule` for a request's `scope` (or what a caller `given`): the engine,
        the rule's fail policy when the store fails, the observer told. The one path of
        every decision, the middleware's and the caller API's.

        Returns the engine holding the decision's grant (the in-process one after a
        `fail="local"` fallback) and the decision: a `FailedDecision` when "open" or
        "closed" answered (not observed: its failure was). `CallableError` propagates.
        """
        engine = self.engine
        metrics = self.metrics if observe else None
        started = perf_counter() if metrics is not None else 0.0
        try:
            decision = await engine.decide(rule, scope, abandon, given)
        except CallableError:
            raise
        except Exception as exc:
            decision = await self._fall_back(rule, exc, scope, abandon, given)
            if decision.__class__ is FailedDecision:
                return engine, decision
            engine = self.local_engine()  # it decided: it holds the grant, refunds
        else:
            if self.failing:
                self.answered()
        if metrics is not None:
            metrics.on_decision(decision, perf_counter() - started)
        return engine, decision

    async def _fall_back(
        self,
        rule: Rule,
        exc: Exception,
        scope: Scope,
        abandon: Abandon | None = None,
        given: Given | None = None,
    ) -> Decision:
        """The backend failed deciding `rule` with `exc`: apply the rule's fail policy.

        A `FailedDecision` for "open" and "closed"; for "local" the in-process
        engine's decision (whose grant that engine holds). `CallableError` from
        the local engine propagates; any other failure of it admits (logged).
        """
        fail = rule.fail or self.fail
        self._note_failure(rule, fail, exc)
        if fail == "local":
            try:
                return await self.local_engine().decide(rule, scope, abandon, given)
            except CallableError:
                raise
            except Exception:
                # Not the store then: the limiter still must not fail the caller.
                logger.exception("ratelimit: the in-process fallback failed too; admitting")
                fail = "open"
        return FailedDecision(self.engine.plan(rule), fail == "open", exc)

    def answered(self) -> None:
        """The backend answered after failing: log the change once."""
        self.failing = False
        logger.warning("ratelimit backend answers again")

    def unratable(self, rule: Rule, exc: CallableError) -> None:
        """A user callable failed for one request of `rule`: log it (rate-limited), count it."""
        self.callable_errors.report(exc, shadow=rule.shadow)
        if self.metrics is not None:
            self.metrics.on_invalid(rule, exc.limit)

    def local_engine(self) -> Engine:
        """The in-process fallback for `fail="local"`: every limit times `local_share`."""
        if self._local is None:
            rules = [rule.scaled(self.local_share) for rule in self.engine.rules]
            local = Engine(rules, MemoryBackend())
            local.swap_rules(local.rules, self.engine.blocks())
            self._local = local
        return self._local

    # -- inside ---------------------------------------------------------------------

    def _plan(self, name: str) -> Plan:
        """The plan in force for the rule named `name`; ConfigError if there is none."""
        try:
            plan = self.engine.by_name.get(name)
        except TypeError:  # unhashable: not a name
            plan = None
        if plan is None or not isinstance(name, str):
            names = list(self.engine.by_name)
            raise ConfigError("rule", f"the name of a rule: one of {names}", name)
        return plan

    async def _decide(
        self,
        name: str,
        key: Key,
        cost: Cost | None,
        priority: object,
        timeout: float | None,
        *,
        peek: bool | None,
    ) -> tuple[Engine, Decision]:
        """Decide rule `name` for a caller: (the engine holding its grant, the decision).

        `peek`: None for `acquire`; False for `check`, True for `peek` (both refuse
        rules with leases; a peek takes cost 0 and is not observed).
        """
        if not self.started:
            await self.start()
        plan = self._plan(name)
        if peek is not None and plan.min_lease != math.inf:  # the rule has leases
            raise ConfigError(
                "rule",
                "a rule without Concurrency limits for check() and peek() (a slot must be "
                f"given back): use `async with limiter.acquire({name!r}, ...)`",
                name,
            )
        # The common call (one text, the rule's own constant cost) asks no checker.
        texts = (
            (key,) * plan.size
            if isinstance(key, str)
            else caller.texts(plan, key, leases_only=False)
        )
        units: Cost
        if peek:
            units = 0
        elif cost is None and plan.static_cost is not None:
            units = plan.static_cost
        else:
            units = caller.cost(plan, cost)
        given = new(
            Given,
            (
                texts,
                units,
                None if priority is None else caller.priority(plan, priority),
                None if timeout is None else caller.timeout(timeout),
            ),
        )
        return await self.decide(plan.rule, _NO_SCOPE, None, given, observe=not peek)

    def _apply_overrides(self, resolution: Resolution) -> None:
        """Enforce the effective rules of `resolution`: swap plans, the fallback's, gauges.

        The `fail="local"` fallback follows the same overrides, scaled.
        """
        changed = set(self.engine.apply_overrides(resolution))
        if self._local is not None:
            share = self.local_share
            local = self._local
            current = {r.name: r for r in local.rules}
            local.swap_rules(
                [
                    r.scaled(share) if r.name in changed else current[r.name]
                    for r in self.engine.rules
                ],
                self.engine.blocks(),
            )
        if self.metrics is not None:
            self.metrics.on_limits(self.engine)

    def _note_failure(self, rule: Rule, policy: str, exc: Exception) -> None:
        """Count every failure; log only the change from answering to failing."""
        if self.metrics is not None:
            self.metrics.on_failure(rule, policy, exc)
        if not self.failing:
            self.failing = True
            logger.error("ratelimit backend failed (%r); failing %s until it answers", exc, policy)


def _describe(rule: Rule) -> str:
    methods = "any method" if rule.methods is None else ", ".join(sorted(rule.methods))
    return f"{rule.path}, {methods}"


def _in_shadow(rule: Rule) -> Rule:
    """`rule` in shadow mode: a copy, so fields added to `Rule` later carry over."""
    if rule.shadow:
        return rule
    clone = copy.copy(rule)
    clone.shadow = True
    return clone


def build_backend(spec: Mapping[str, Any] | None) -> Backend:
    """A backend from the `[backend]` table of a config file."""
    if not spec:
        return MemoryBackend()
    kind = spec.get("type", "memory")
    options = {k: v for k, v in spec.items() if k != "type"}
    try:
        if kind == "memory":
            return MemoryBackend(**options)
        if kind == "redis":
            from ..backends.redis import RedisBackend

            return RedisBackend(**options)
    except ConfigError as exc:
        raise exc.under("backend") from None
    except TypeError as exc:
        raise ConfigError("backend", f"options of the {kind} backend ({exc})", options) from None
    raise ConfigError("backend.type", '"memory" or "redis"', kind)
