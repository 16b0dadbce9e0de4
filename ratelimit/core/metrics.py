"""Prometheus metrics of a `Limiter` (`asgi.exposition.metrics_app` serves them).

On by default: the first `Limiter` built without `metrics=` creates them on
prometheus_client's global registry (never at import), and every later one
shares that set, so app factories called once per test never collide.
`Metrics(registry)` puts them on another registry; `metrics=None` (or
`metrics = false` in a config file) turns them off. Labels are only `rule`,
`limit`, `outcome`, `change` and `operation` — never the caller's key — so
cardinality stays at rules x limits x outcomes however many callers there are.

The series (decisions by outcome, decision time, near-limit admissions, slots
in flight, effective limits and rates, queue depth and wait, settled units,
backend errors, breaker state) and what each counts are listed in docs/operations/metrics.md;
each series' help text below says it in a line.

Multi-process mode: see `asgi.exposition`.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Sequence
from typing import Final
from weakref import WeakKeyDictionary

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from .._errors import ConfigError
from ..backends.breaker import BreakerState, CircuitBreaker
from ..policy.limits import Concurrency, Limit
from ..policy.rules import Rule
from .decision import Decision, Grant
from .engine import Engine
from .outcomes import (
    OUTCOMES,
    REASON_OUTCOME,
    capacity,
    deciding_limit,
    refusal_outcome,
    sustained_rate,
)

__all__ = ["DECISION_BUCKETS", "DEFAULT_METRICS", "OUTCOMES", "DefaultMetrics", "Metrics"]

logger = logging.getLogger("ratelimit")

#: Decision latency buckets (seconds): sub-millisecond decisions of the memory
#: backend, Redis round trips, and multi-second waits of queued requests.
DECISION_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_NAMESPACE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class DefaultMetrics(enum.Enum):
    """The type of `DEFAULT_METRICS`: `metrics=` left out."""

    DEFAULT_METRICS = "default"

    def __repr__(self) -> str:
        return "DEFAULT_METRICS"


#: `metrics=` left out: the metrics on the global registry, unless the config file
#: says `metrics = false`.
DEFAULT_METRICS: Final = DefaultMetrics.DEFAULT_METRICS

#: The `Metrics` of each registry, by namespace: building one again gives the same set.
_SHARED: WeakKeyDictionary[CollectorRegistry, dict[str, Metrics]] = WeakKeyDictionary()


def given_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    """`registry`, checked; prometheus_client's global `REGISTRY` for None."""
    if registry is None:
        return REGISTRY
    if not isinstance(registry, CollectorRegistry):
        raise ConfigError("registry", "a prometheus_client CollectorRegistry", registry)
    return registry


class Metrics:
    """The ratelimit instruments on one registry; pass it as `Limiter(metrics=)` (an
    `Observer`) or `RateLimitMiddleware(metrics=)`.

    One set per registry and namespace: `Metrics(registry)` again returns the
    set already there (so every limiter of a process counts into one, and an
    app built once per test never collides); asking for it with another
    `near_limit` or `buckets` raises `ConfigError`. `near_limit` is the
    fraction of a limit's capacity below which an admission counts as near it.
    """

    registry: CollectorRegistry
    namespace: str
    near_limit: float

    def __new__(
        cls,
        registry: CollectorRegistry | None = None,
        *,
        namespace: str = "ratelimit",
        near_limit: float = 0.2,
        buckets: Sequence[float] = DECISION_BUCKETS,
    ) -> Metrics:
        registry = given_registry(registry)
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
            raise ConfigError("namespace", "a metric name prefix like ratelimit", namespace)
        if (
            not isinstance(near_limit, (int, float))
            or isinstance(near_limit, bool)
            or not 0 < near_limit <= 1
        ):
            raise ConfigError("near_limit", "a fraction of capacity in (0, 1]", near_limit)
        bounds = list(buckets) if isinstance(buckets, Sequence) else []
        if (
            not bounds
            or not all(isinstance(b, (int, float)) and b > 0 for b in bounds)
            or bounds != sorted(set(bounds))
        ):
            raise ConfigError("buckets", "increasing bucket bounds in seconds, > 0", buckets)
        shared = _SHARED.setdefault(registry, {})
        self = shared.get(namespace)
        if self is None:
            self = super().__new__(cls)
            self._build(registry, namespace, float(near_limit), tuple(bounds))
            shared[namespace] = self
            return self
        for field, wanted, has in (
            ("near_limit", float(near_limit), self.near_limit),
            ("buckets", tuple(bounds), self._bounds),
        ):
            if wanted != has:
                raise ConfigError(
                    field,
                    f"{has} as for the {namespace}_* metrics already on this registry "
                    "(or another namespace=)",
                    wanted,
                )
        return self

    def _build(
        self,
        registry: CollectorRegistry,
        namespace: str,
        near_limit: float,
        bounds: tuple[float, ...],
    ) -> None:
        """Create the instruments and register them on `registry` (once per set)."""
        self.registry = registry
        self.namespace = namespace
        self.near_limit = near_limit
        ns = namespace
        self.decisions = Counter(
            "decisions_total",
            "Rate-limit decisions by rule, deciding limit and outcome.",
            ["rule", "limit", "outcome"],
            namespace=ns,
            registry=None,
        )
        self.decision_seconds = Histogram(
            "decision_seconds",
            "Time to decide one request (keys, cost, backend round trip).",
            ["rule"],
            namespace=ns,
            buckets=bounds,
            registry=None,
        )
        self.near = Counter(
            "near_limit_total",
            "Admissions that left the caller under the near-limit fraction of a limit's capacity.",
            ["rule", "limit"],
            namespace=ns,
            registry=None,
        )
        self.in_flight = Gauge(
            "in_flight",
            "Concurrency slots held by running requests (all callers of the limit).",
            ["rule", "limit"],
            namespace=ns,
            multiprocess_mode="livesum",
            registry=None,
        )
        self.limit = Gauge(
            "limit",
            "Effective capacity of each limit: slots, burst, or requests per window.",
            ["rule", "limit"],
            namespace=ns,
            multiprocess_mode="livemostrecent",
            registry=None,
        )
        self.limit_rate = Gauge(
            "limit_rate_per_second",
            "Effective sustained rate of each token-bucket and window limit, units per second.",
            ["rule", "limit"],
            namespace=ns,
            multiprocess_mode="livemostrecent",
            registry=None,
        )
        self.queue_depth = Gauge(
            "queue_depth",
            "Requests waiting in a limit's line (this process; summed over processes).",
            ["rule", "limit"],
            namespace=ns,
            multiprocess_mode="livesum",
            registry=None,
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "Time requests spent waiting in line, by how the wait ended.",
            ["rule", "limit", "outcome"],
            namespace=ns,
            buckets=tuple(b for b in bounds if b >= 0.001) or bounds,
            registry=None,
        )
        self.settled = Counter(
            "settled_units_total",
            "Units settlements gave back (refunded) or charged past the estimate (charged).",
            ["rule", "limit", "change"],
            namespace=ns,
            registry=None,
        )
        self.backend_errors = Counter(
            "backend_errors_total",
            "Backend calls that failed, by operation.",
            ["operation"],
            namespace=ns,
            registry=None,
        )
        self._bounds = bounds
        #: Created when a backend that reports its calls is seen (see `on_start`).
        self.backend_seconds: Histogram | None = None
        #: Created when a backend with a circuit breaker is seen (see `on_start`).
        self.breaker_open: Gauge | None = None
        self._collectors: tuple[Collector, ...] = (
            self.decisions,
            self.decision_seconds,
            self.near,
            self.in_flight,
            self.limit,
            self.limit_rate,
            self.queue_depth,
            self.queue_wait,
            self.settled,
            self.backend_errors,
        )
        self._register()
        # Label children by label values: `.labels()` validates and locks on
        # every call, a dict lookup does not.
        self._decision_children: dict[tuple[str, str, str], Counter] = {}
        self._seconds_children: dict[str, Histogram] = {}
        self._near_children: dict[tuple[str, str], Counter] = {}
        self._in_flight_children: dict[tuple[str, str], Gauge] = {}
        self._settled_children: dict[tuple[str, str, str], Counter] = {}
        #: Limits of observed engines: only their grants are released through our hook.
        self._watched: set[Limit] = set()
        #: ids of the watched breakers, and of those not closed now.
        self._breakers: set[int] = set()
        self._open_breakers: set[int] = set()

    def _register(self) -> None:
        done: list[Collector] = []
        for collector in self._collectors:
            try:
                self.registry.register(collector)
            except ValueError as exc:
                for c in done:
                    self.registry.unregister(c)
                raise ConfigError(
                    "registry",
                    f"a registry without other {self.namespace}_* metrics, or another "
                    f"namespace= (prometheus_client: {exc})",
                ) from None
            done.append(collector)

    def unregister(self) -> None:
        """Remove these metrics from their registry (for tests and app reloads).

        The next `Metrics` on that registry and namespace is a new set.
        """
        for collector in self._collectors:
            self.registry.unregister(collector)
        shared = _SHARED.get(self.registry, {})
        if shared.get(self.namespace) is self:
            del shared[self.namespace]

    # -- the `Observer` interface: called by the Limiter and its engine ----------

    def on_start(self, engine: Engine) -> None:
        """Publish `engine`'s limits, start every series at zero, and time its backend's calls.

        The `Limiter` calls it once; after each live override, `on_limits`.
        """
        self._watched.update(lim for rule in engine.rules for lim in rule.limits)
        self.on_limits(engine)
        for rule in engine.rules:
            self._decision_child(rule.name, "", "allowed")
            self._seconds_child(rule.name)
            for lim, name in zip(rule.limits, rule.limit_names(), strict=True):
                outcome = "rejected" if lim.shared else "limited"
                self._decision_child(rule.name, name, outcome)
                if rule.shadow:
                    self._decision_child(rule.name, name, f"shadow_{outcome}")
                self._near_child(rule.name, name)
                if isinstance(lim, Concurrency):
                    self._in_flight_child(rule.name, name)
                    if lim.queue:
                        self.queue_depth.labels(rule.name, name)
                        for outcome in ("queued", "queue_timeout", "shed"):
                            self._decision_child(rule.name, name, outcome)
        self.backend_errors.labels("decide")
        add_observer = getattr(engine.backend, "add_observer", None)
        if add_observer is not None:
            # The backend times each call and reports errors per operation itself.
            if self.backend_seconds is None:
                self.backend_seconds = Histogram(
                    "backend_seconds",
                    "Time of one call to the store, by operation (a Redis script round trip).",
                    ["operation"],
                    namespace=self.namespace,
                    buckets=self._bounds,
                    registry=None,
                )
                self.registry.register(self.backend_seconds)
                self._collectors = (*self._collectors, self.backend_seconds)
            add_observer(self)
        breaker = getattr(engine.backend, "breaker", None)
        if isinstance(breaker, CircuitBreaker):
            self.watch_breaker(breaker)

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        """Export `breaker`'s state in `ratelimit_breaker_open`, updated on every change.

        `on_start` calls it for a backend's `breaker`. The gauge is registered on
        first use, so apps on a backend without a breaker never show it.
        """
        gauge = self.breaker_open
        if gauge is None:
            gauge = Gauge(
                "breaker_open",
                "Backends whose circuit breaker is open or probing: calls fail at once "
                "without reaching the store.",
                namespace=self.namespace,
                multiprocess_mode="livesum",
                registry=None,
            )
            self.registry.register(gauge)
            self.breaker_open = gauge
            self._collectors = (*self._collectors, gauge)
        key = id(breaker)
        if key in self._breakers:
            return
        self._breakers.add(key)
        opened = self._open_breakers

        def changed(old: BreakerState, new: BreakerState) -> None:
            try:
                if new == "closed":
                    opened.discard(key)
                else:
                    opened.add(key)
                gauge.set(len(opened))
            except Exception:  # a metrics bug must never break the backend's calls
                logger.exception("ratelimit metrics: could not record a breaker change")

        breaker.add_listener(changed)
        if breaker.state != "closed":
            opened.add(key)
        gauge.set(len(opened))

    def on_limits(self, engine: Engine) -> None:
        """Set the limit gauges to the limits `engine` enforces now (0 for a blocked rule).

        The Limiter calls it after each live override applies. The new
        limits are watched too: slots they grant count in `in_flight`.
        """
        blocked = engine.blocks()
        for rule in engine.rules:
            off = rule.name in blocked
            for lim, name in zip(rule.limits, rule.limit_names(), strict=True):
                # Limits of earlier overrides stay watched: a request granted under one
                # may be observed after the next applies (a few objects per change).
                self._watched.add(lim)
                self.limit.labels(rule.name, name).set(0 if off else capacity(lim))
                rate = sustained_rate(lim)
                if rate is not None:
                    self.limit_rate.labels(rule.name, name).set(0.0 if off else rate)

    def on_decision(self, decision: Decision, seconds: float) -> None:
        """Count one decision and its latency; track near-limit callers and held slots."""
        rule = decision.rule.name
        waited = decision.waited
        if waited is not None:
            outcome = "queued" if decision.allowed else REASON_OUTCOME[decision.reason or ""]
            line = decision.line or ""
            key = (rule, line, outcome)
            self.queue_wait.labels(rule, line, outcome).observe(waited)
        elif decision.allowed:
            key = (rule, "", "allowed")
        elif decision.reason in REASON_OUTCOME:  # a line's refusal (not OVERSIZED)
            key = (rule, decision.line or "", REASON_OUTCOME[decision.reason])
        else:
            key = (rule, deciding_limit(decision), refusal_outcome(decision))
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_child(*key)
        child.inc()
        hist = self._seconds_children.get(rule)
        if hist is None:
            hist = self._seconds_child(rule)
        hist.observe(seconds)
        if not decision.allowed:
            return
        fraction = self.near_limit
        for s in decision.states:
            if s.admitted and not s.exempt and s.remaining < fraction * capacity(s.limit):
                near = self._near_children.get((rule, s.name))
                if near is None:
                    near = self._near_child(rule, s.name)
                near.inc()
        grant = decision.grant
        # A grant of an engine we do not watch (the fail="local" fallback's, whose
        # limits are scaled copies) is never reported released: counting it would
        # leave in_flight too high.
        if grant is not None and decision.states[0].limit in self._watched:
            for lease in grant.leases:
                gauge = self._in_flight_children.get((lease.key.rule, lease.key.limit))
                if gauge is None:
                    gauge = self._in_flight_child(lease.key.rule, lease.key.limit)
                gauge.inc(lease.weight)  # slots: a weighted lease holds several

    def on_release(self, grant: Grant) -> None:
        """The engine released `grant`: its slots are no longer in flight."""
        try:
            for lease in grant.leases:
                gauge = self._in_flight_children.get((lease.key.rule, lease.key.limit))
                if gauge is None:
                    gauge = self._in_flight_child(lease.key.rule, lease.key.limit)
                gauge.dec(lease.weight)
        except Exception:  # a metrics bug must never keep a lease from being released
            logger.exception("ratelimit metrics: could not record a release")

    def on_queue(self, rule: str, limit: str, delta: int) -> None:
        """A request of this process joined (+1) or left (-1) a limit's line."""
        self.queue_depth.labels(rule, limit).inc(delta)

    def on_settle(self, rule: str, limit: str, units: int) -> None:
        """A settlement moved `units` of a limit (see `core.settling`)."""
        if units:
            key = (rule, limit, "charged" if units > 0 else "refunded")
            child = self._settled_children.get(key)
            if child is None:
                child = self._settled_children[key] = self.settled.labels(*key)
            child.inc(abs(units))

    def on_failure(self, rule: Rule, policy: str, exc: BaseException) -> None:
        """The backend failed deciding for `rule`; `policy` ("open"/"closed"/"local") applies.

        "local" decides again in-process and that verdict is counted by
        `on_decision`, so here only the backend error is.
        """
        if policy != "local":
            self._decision_child(rule.name, "", f"failed_{policy}").inc()
        if self.backend_seconds is None:  # else the backend reported the error itself
            self.observe_backend_error("decide")

    def on_invalid(self, rule: Rule, limit: str) -> None:
        """A user callable of `rule` (of its limit `limit`; "" for the cost) failed."""
        outcome = "shadow_invalid" if rule.shadow else "invalid"
        key = (rule.name, limit, outcome)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_child(*key)
        child.inc()

    def observe_backend_call(
        self, operation: str, seconds: float, error: BaseException | None
    ) -> None:
        """One call to the store finished (or failed): its latency, and its error if any."""
        if self.backend_seconds is not None:
            self.backend_seconds.labels(operation).observe(seconds)
        if error is not None:
            self.observe_backend_error(operation)

    def observe_backend_error(self, operation: str) -> None:
        """Count one failed backend call of `operation` (decide, release, renew, ...)."""
        self.backend_errors.labels(operation).inc()

    # -- children ---------------------------------------------------------------

    def _decision_child(self, rule: str, limit: str, outcome: str) -> Counter:
        child = self._decision_children[(rule, limit, outcome)] = self.decisions.labels(
            rule, limit, outcome
        )
        return child

    def _seconds_child(self, rule: str) -> Histogram:
        child = self._seconds_children[rule] = self.decision_seconds.labels(rule)
        return child

    def _near_child(self, rule: str, limit: str) -> Counter:
        child = self._near_children[(rule, limit)] = self.near.labels(rule, limit)
        return child

    def _in_flight_child(self, rule: str, limit: str) -> Gauge:
        child = self._in_flight_children[(rule, limit)] = self.in_flight.labels(rule, limit)
        return child
