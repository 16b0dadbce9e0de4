"""Prometheus metrics: exact counts, no collisions, no caller keys, a valid exposition."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_helpers import Exchange, eventually, http_scope
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from ratelimit import (
    BackendError,
    Concurrency,
    ConfigError,
    Limiter,
    MemoryBackend,
    Metrics,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    Window,
    keys,
    metrics_app,
)
from ratelimit._types import Receive, Scope, Send
from ratelimit.core.metrics import DECISION_BUCKETS, OUTCOMES

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

SECRET_KEY = "caller-key-that-must-never-be-a-label"


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def slow(request: Request) -> PlainTextResponse:
    await asyncio.sleep(0.05)
    return PlainTextResponse("ok")


def starlette_app() -> Starlette:
    routes = [Route(p, ok) for p in ("/work", "/shared", "/window", "/free")]
    return Starlette(routes=[*routes, Route("/line", slow)])


RULES = [
    Rule("/work", limits=[TokenBucket("1/hour", burst=10, key=keys.header("x-api-key"))]),
    Rule("/shared", limits=[TokenBucket("1/hour", burst=2, key=keys.GLOBAL, name="fleet")]),
]


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def samples(registry: CollectorRegistry) -> Samples:
    """Every sample of the text exposition, parsed back by prometheus_client's parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(exposition(registry)):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return samples(registry).get((name, frozenset(labels.items())))


async def drive(app: Any, path: str, n: int, **headers: str) -> list[int]:
    async with client(app) as c:
        return [(await c.get(path, headers=headers)).status_code for _ in range(n)]


# -- registration ---------------------------------------------------------------------


def test_importing_the_package_registers_nothing() -> None:
    """Importing ratelimit (and its metrics module) puts no ratelimit_* metric on REGISTRY."""
    code = (
        "import ratelimit, ratelimit.core.metrics, ratelimit.asgi.exposition\n"
        "from prometheus_client import REGISTRY\n"
        "print(sorted(m.name for m in REGISTRY.collect()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "ratelimit" not in out


def test_the_first_limiter_registers_the_metrics_on_the_global_registry() -> None:
    """Nothing at import; a Limiter built without metrics= registers the set on REGISTRY."""
    code = (
        "import ratelimit\n"
        "from prometheus_client import REGISTRY\n"
        "def names():\n"
        "    return [m.name for m in REGISTRY.collect() if m.name.startswith('ratelimit')]\n"
        "assert names() == [], names()\n"
        "rule = ratelimit.Rule('/a', limits=[ratelimit.Window('1/second')])\n"
        "limiter = ratelimit.Limiter([rule])\n"
        "assert isinstance(limiter.metrics, ratelimit.Metrics)\n"
        "assert limiter.metrics.registry is REGISTRY\n"
        "print(sorted(names()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "ratelimit_decisions" in out


def test_metrics_on_one_registry_are_one_set() -> None:
    """Metrics(registry) again is the same object: limiters sharing a registry share one set."""
    registry = CollectorRegistry()
    first = Metrics(registry)
    assert Metrics(registry) is first
    first.observe_backend_error("x")
    assert value(registry, "ratelimit_backend_errors_total", operation="x") == 1
    assert Metrics() is Metrics() is not first  # the global registry's own set


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"near_limit": 0.5}, "near_limit"), ({"buckets": [1.0]}, "buckets")]
)
def test_the_same_set_with_other_settings_is_refused(kwargs: dict[str, Any], field: str) -> None:
    """Asking a registry's set for another near_limit or buckets fails naming the field."""
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ConfigError, match=f"^{field}: expected .* already on this registry"):
        Metrics(registry, **kwargs)


def test_a_failed_registration_leaves_the_registry_unchanged() -> None:
    """A collision with a foreign collector part-way through rolls back what was registered,
    so a retry can succeed; unregister() frees the names for a new set."""
    registry = CollectorRegistry()
    foreign = Counter("ratelimit_backend_errors_total", "not ours", registry=registry)
    before = {m.name for m in registry.collect()}
    with pytest.raises(ConfigError, match=r"^registry: expected a registry without other"):
        Metrics(registry)
    assert {m.name for m in registry.collect()} == before
    registry.unregister(foreign)
    first = Metrics(registry)
    first.unregister()
    assert not list(registry.collect())
    assert Metrics(registry) is not first  # the names are free again


def test_another_namespace_shares_a_registry() -> None:
    """Two Metrics on one registry are fine when their namespaces differ."""
    registry = CollectorRegistry()
    Metrics(registry)
    other = Metrics(registry, namespace="edge")
    other.observe_backend_error("decide")
    assert value(registry, "edge_backend_errors_total", operation="decide") == 1
    assert value(registry, "ratelimit_backend_errors_total", operation="decide") is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"registry": "global"}, "registry"),
        ({"namespace": "rate-limit"}, "namespace"),
        ({"namespace": ""}, "namespace"),
        ({"near_limit": 0}, "near_limit"),
        ({"near_limit": 1.5}, "near_limit"),
        ({"near_limit": True}, "near_limit"),
        ({"buckets": []}, "buckets"),
        ({"buckets": [0.1, 0.01]}, "buckets"),
        ({"buckets": [0, 1]}, "buckets"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    """A wrong argument raises ConfigError naming it, before anything is registered."""
    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        Metrics(**kwargs)


def test_middleware_takes_only_a_metrics_object() -> None:
    """metrics=True is refused: the registry must be chosen explicitly, Metrics(registry)."""
    with pytest.raises(ConfigError, match=r"^metrics: expected a ratelimit Metrics object"):
        RateLimitMiddleware(starlette_app(), rules=RULES, metrics=True)  # type: ignore[arg-type]


# -- counts ---------------------------------------------------------------------------


async def test_counts_are_exact_for_allowed_limited_and_rejected() -> None:
    """N admitted, M refused with 429 and K with 503 show up as exactly N, M and K."""
    registry = CollectorRegistry()
    app = RateLimitMiddleware(starlette_app(), rules=RULES, metrics=Metrics(registry))
    work = await drive(app, "/work", 13, **{"x-api-key": "alice"})
    shared = await drive(app, "/shared", 7)
    free = await drive(app, "/free", 4)
    assert work == [200] * 10 + [429] * 3
    assert shared == [200] * 2 + [503] * 5
    assert free == [200] * 4
    got = samples(registry)

    def count(rule: str, limit: str, outcome: str) -> float:
        key = frozenset({"rule": rule, "limit": limit, "outcome": outcome}.items())
        return got[("ratelimit_decisions_total", key)]

    assert count("work", "", "allowed") == 10
    assert count("work", "token-bucket", "limited") == 3
    assert count("shared", "", "allowed") == 2
    assert count("shared", "fleet", "rejected") == 5
    decisions = [v for (n, _), v in got.items() if n == "ratelimit_decisions_total"]
    assert sum(decisions) == 20  # unmatched /free is not a decision
    for rule, n in (("work", 13), ("shared", 7)):
        labels = frozenset({"rule": rule}.items())
        assert got[("ratelimit_decision_seconds_count", labels)] == n
        le10 = frozenset({"rule": rule, "le": "10.0"}.items())
        assert got[("ratelimit_decision_seconds_bucket", le10)] == n


async def test_every_series_starts_at_zero() -> None:
    """Before any traffic, the admissions and refusals of every rule and limit read 0."""
    registry = CollectorRegistry()
    RateLimitMiddleware(starlette_app(), rules=RULES, metrics=Metrics(registry))
    decisions = "ratelimit_decisions_total"
    assert value(registry, decisions, rule="work", limit="", outcome="allowed") == 0
    assert value(registry, decisions, rule="shared", limit="fleet", outcome="rejected") == 0
    assert value(registry, "ratelimit_near_limit_total", rule="work", limit="token-bucket") == 0


async def test_two_apps_with_two_registries_keep_separate_counts() -> None:
    """Two middlewares on two registries never collide and each counts only its own traffic."""
    one, two = CollectorRegistry(), CollectorRegistry()
    app_one = RateLimitMiddleware(starlette_app(), rules=RULES, metrics=Metrics(one))
    app_two = RateLimitMiddleware(starlette_app(), rules=RULES, metrics=Metrics(two))
    await drive(app_one, "/work", 3, **{"x-api-key": "a"})
    await drive(app_two, "/work", 5, **{"x-api-key": "a"})
    labels = {"rule": "work", "limit": "", "outcome": "allowed"}
    assert value(one, "ratelimit_decisions_total", **labels) == 3
    assert value(two, "ratelimit_decisions_total", **labels) == 5


async def test_one_metrics_can_serve_two_middlewares() -> None:
    """Sharing one Metrics between two middlewares adds their counts up."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    first = RateLimitMiddleware(starlette_app(), rules=RULES, metrics=metrics)
    second = RateLimitMiddleware(starlette_app(), rules=RULES, metrics=metrics)
    await drive(first, "/work", 2, **{"x-api-key": "a"})
    await drive(second, "/work", 2, **{"x-api-key": "a"})
    labels = {"rule": "work", "limit": "", "outcome": "allowed"}
    assert value(registry, "ratelimit_decisions_total", **labels) == 4


@pytest.mark.parametrize(
    ("burst", "fraction", "near"),
    [
        (10, 0.2, 2),  # remaining 1 and 0 are under 2
        (5, 0.2, 1),  # under 1: only the last admission
        (10, 0.5, 5),  # remaining 4..0
        (10, 1.0, 10),  # every admission leaves under 10
    ],
)
async def test_near_limit_counts_admissions_that_leave_little_quota(
    burst: int, fraction: float, near: int
) -> None:
    """Admissions leaving the caller under `near_limit` x capacity are counted; refusals are not."""
    registry = CollectorRegistry()
    rules = [Rule("/work", limits=[TokenBucket("1/hour", burst=burst, key=keys.header("k"))])]
    app = RateLimitMiddleware(
        starlette_app(), rules=rules, metrics=Metrics(registry, near_limit=fraction)
    )
    assert await drive(app, "/work", burst + 2, k="a") == [200] * burst + [429] * 2
    assert value(registry, "ratelimit_near_limit_total", rule="work", limit="token-bucket") == near


async def test_near_limit_of_a_window_uses_its_amount() -> None:
    """A Window of 10 per minute counts the admissions that leave under 2 of its 10."""
    registry = CollectorRegistry()
    rules = [Rule("/window", limits=[Window("10/minute", key=keys.GLOBAL)])]
    app = RateLimitMiddleware(starlette_app(), rules=rules, metrics=Metrics(registry))
    assert await drive(app, "/window", 11) == [200] * 10 + [503]
    assert value(registry, "ratelimit_near_limit_total", rule="window", limit="window") == 2
    labels = {"rule": "window", "limit": "window", "outcome": "rejected"}
    assert value(registry, "ratelimit_decisions_total", **labels) == 1


class FailingBackend(MemoryBackend):
    """A backend whose store is down: every decision raises BackendError."""

    async def decide(self, checks: Any) -> Any:
        raise BackendError("store is down")


@pytest.mark.parametrize(
    ("fail", "status", "outcome"),
    [("open", 200, "failed_open"), ("closed", 503, "failed_closed")],
)
async def test_backend_failures_count_by_policy_and_operation(
    fail: Any, status: int, outcome: str
) -> None:
    """Each failed decision counts once as failed_open/failed_closed and once as a backend error."""
    registry = CollectorRegistry()
    app = RateLimitMiddleware(
        starlette_app(),
        rules=RULES,
        backend=FailingBackend(),
        fail=fail,
        metrics=Metrics(registry),
    )
    assert await drive(app, "/work", 4, **{"x-api-key": "a"}) == [status] * 4
    labels = {"rule": "work", "limit": "", "outcome": outcome}
    assert value(registry, "ratelimit_decisions_total", **labels) == 4
    assert value(registry, "ratelimit_backend_errors_total", operation="decide") == 4


async def test_local_fallback_counts_its_verdicts_once() -> None:
    """Under fail="local" each request is one decision (the in-process verdict) plus one error."""
    registry = CollectorRegistry()
    rules = [Rule("/work", limits=[TokenBucket("1/hour", burst=3, key=keys.header("k"))])]
    app = RateLimitMiddleware(
        starlette_app(),
        rules=rules,
        backend=FailingBackend(),
        fail="local",
        metrics=Metrics(registry),
    )
    assert await drive(app, "/work", 5, k="a") == [200] * 3 + [429] * 2
    got = samples(registry)
    decisions = {
        dict(labels)["outcome"]: v
        for (name, labels), v in got.items()
        if name == "ratelimit_decisions_total" and v
    }
    assert decisions == {"allowed": 3, "limited": 2}
    assert value(registry, "ratelimit_backend_errors_total", operation="decide") == 5


# -- gauges ---------------------------------------------------------------------------


def test_limit_gauges_show_every_effective_limit() -> None:
    """Capacity of every limit, and the sustained rate of rate limits, are exported."""
    registry = CollectorRegistry()
    rules = [
        Rule(
            "/work",
            limits=[
                TokenBucket("30/minute", burst=8, key=keys.header("k"), name="per-key"),
                Concurrency(4, key=keys.GLOBAL, name="gpu"),
            ],
        ),
        Rule("/window", limits=[Window("100/hour", key=keys.GLOBAL)]),
    ]
    RateLimitMiddleware(starlette_app(), rules=rules, metrics=Metrics(registry))
    got = samples(registry)
    limits = {tuple(sorted(labels)): v for (n, labels), v in got.items() if n == "ratelimit_limit"}
    assert limits == {
        (("limit", "per-key"), ("rule", "work")): 8,
        (("limit", "gpu"), ("rule", "work")): 4,
        (("limit", "window"), ("rule", "window")): 100,
    }
    rate = "ratelimit_limit_rate_per_second"
    assert value(registry, rate, rule="work", limit="per-key") == pytest.approx(0.5)
    assert value(registry, rate, rule="window", limit="window") == pytest.approx(100 / 3600)
    assert value(registry, rate, rule="work", limit="gpu") is None


def test_on_limits_shows_a_changed_limit() -> None:
    """After a limit changes in place, on_limits puts the new value on the gauge."""
    registry = CollectorRegistry()
    gpu = Concurrency(4, key=keys.GLOBAL, name="gpu")
    app = RateLimitMiddleware(
        starlette_app(), rules=[Rule("/work", limits=[gpu])], metrics=Metrics(registry)
    )
    gpu.limit = 2
    assert app.metrics is not None
    app.metrics.on_limits(app.engine)
    assert value(registry, "ratelimit_limit", rule="work", limit="gpu") == 2


def gated_app(gate: asyncio.Event) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An app that starts its response, then waits for `gate` before the last body chunk."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await gate.wait()
        await send({"type": "http.response.body", "body": b"b"})

    return app


async def test_in_flight_follows_held_slots_through_the_release_hook() -> None:
    """in_flight rises with each admitted request and falls as the last chunk or a
    cancellation releases its slot."""
    registry = CollectorRegistry()
    gate = asyncio.Event()
    rules = [Rule("/gen", limits=[Concurrency(3, key=keys.GLOBAL, name="gpu")])]
    app = RateLimitMiddleware(gated_app(gate), rules=rules, metrics=Metrics(registry))

    def in_flight() -> float | None:
        return value(registry, "ratelimit_in_flight", rule="gen", limit="gpu")

    assert in_flight() == 0
    exchanges = [Exchange(app, http_scope("/gen")) for _ in range(4)]
    for ex in exchanges:
        ex.start()
    for ex in exchanges:
        await asyncio.wait_for(ex.started.wait(), 2)
    assert sorted(ex.status or 0 for ex in exchanges) == [200, 200, 200, 503]
    assert in_flight() == 3
    cancelled = next(ex.task for ex in exchanges if ex.status == 200)
    assert cancelled is not None
    cancelled.cancel()
    await eventually(lambda: in_flight() == 2)
    gate.set()
    for ex in exchanges:
        assert ex.task is not None
        await asyncio.gather(ex.task, return_exceptions=True)
    await eventually(lambda: in_flight() == 0)
    assert len(app.engine.holding.held) == 0
    await app.aclose()


async def test_local_fallback_grants_never_raise_in_flight() -> None:
    """Slots granted by the fail="local" fallback (which has no release hook) are not counted,
    so in_flight never drifts upward."""
    registry = CollectorRegistry()
    rules = [Rule("/gen", limits=[Concurrency(3, key=keys.GLOBAL, name="gpu")], fail="local")]
    app = RateLimitMiddleware(
        gated_app(asyncio.Event()), rules=rules, backend=FailingBackend(), metrics=Metrics(registry)
    )
    ex = Exchange(app, http_scope("/gen"))
    task = ex.start()
    await asyncio.wait_for(ex.started.wait(), 2)
    assert ex.status == 200
    assert value(registry, "ratelimit_in_flight", rule="gen", limit="gpu") == 0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- exposition -----------------------------------------------------------------------


async def busy_registry() -> CollectorRegistry:
    """A registry with every kind of sample: admissions, both refusals, failures, slots."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    rules = [
        *RULES,
        Rule("/window", limits=[Window("3/minute", key=keys.GLOBAL), Concurrency(2)]),
        Rule("/line", limits=[Concurrency(1, queue=1, timeout=5.0)]),
    ]
    app = RateLimitMiddleware(starlette_app(), rules=rules, metrics=metrics)
    # Three at once on one slot and a line of one: one runs, one waits, one is refused.
    lined = await asyncio.gather(*(drive(app, "/line", 1) for _ in range(3)))
    assert sorted(code for codes in lined for code in codes) == [200, 200, 503]
    await drive(app, "/work", 12, **{"x-api-key": SECRET_KEY})
    await drive(app, "/shared", 3)
    await drive(app, "/window", 4)
    failing = RateLimitMiddleware(
        starlette_app(), rules=[Rule("/free", limits=[TokenBucket("1/second")])],
        backend=FailingBackend(), metrics=metrics, fail="closed",
    )  # fmt: skip
    await drive(failing, "/free", 2)
    tokens = Limiter(
        [Rule(name="tokens", limits=[Window("99/minute", counts="tokens")], cost={"tokens": 9})],
        metrics=metrics,
    )
    async with tokens.acquire("tokens", "caller") as decision:
        await decision.settle({"tokens": 4})
    await tokens.aclose()
    return registry


async def test_exposition_parses_with_the_expected_names_and_types() -> None:
    """The text format parses back; each family has the documented name, type and labels."""
    registry = await busy_registry()
    families = {
        f.name: f
        for f in text_string_to_metric_families(exposition(registry))
        if not f.name.endswith("_created")  # creation times, in the text format as gauges
    }
    expected = {
        "ratelimit_decisions": ("counter", {"rule", "limit", "outcome"}),
        "ratelimit_decision_seconds": ("histogram", {"rule", "le"}),
        "ratelimit_near_limit": ("counter", {"rule", "limit"}),
        "ratelimit_in_flight": ("gauge", {"rule", "limit"}),
        "ratelimit_limit": ("gauge", {"rule", "limit"}),
        "ratelimit_limit_rate_per_second": ("gauge", {"rule", "limit"}),
        "ratelimit_queue_depth": ("gauge", {"rule", "limit"}),
        "ratelimit_queue_wait_seconds": ("histogram", {"rule", "limit", "outcome", "le"}),
        "ratelimit_settled_units": ("counter", {"rule", "limit", "change"}),
        "ratelimit_backend_errors": ("counter", {"operation"}),
    }
    assert set(families) == set(expected)
    for name, (kind, labels) in expected.items():
        family = families[name]
        assert family.type == kind, name
        assert family.documentation, name
        used = {label for s in family.samples for label in s.labels}
        assert used == labels, name
    outcomes = {s.labels["outcome"] for s in families["ratelimit_decisions"].samples}
    assert outcomes <= set(OUTCOMES)
    assert outcomes >= {"allowed", "limited", "rejected", "failed_closed", "queued"}


async def test_the_caller_key_never_reaches_the_exposition() -> None:
    """Labels carry rules, limits and outcomes only: a caller's key appears nowhere."""
    registry = await busy_registry()
    text = exposition(registry)
    assert SECRET_KEY not in text
    assert "x-api-key" not in text


def test_decision_buckets_span_microseconds_to_seconds() -> None:
    """Buckets reach from 50 µs (memory decisions) to 10 s (queue waits)."""
    assert DECISION_BUCKETS[0] == 0.00005
    assert DECISION_BUCKETS[-1] == 10.0
    assert list(DECISION_BUCKETS) == sorted(DECISION_BUCKETS)


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (apt-get install prometheus; scripts/test does it)",
)
async def test_exposition_passes_promtool_check_metrics() -> None:
    """`promtool check metrics` accepts the exposition without a single lint problem."""
    assert PROMTOOL is not None
    registry = await busy_registry()
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(generate_latest(registry)), 60)
    assert proc.returncode == 0, output.decode()
    assert output == b""


# -- metrics_app ----------------------------------------------------------------------


async def test_metrics_app_serves_its_registry_when_mounted() -> None:
    """Mounted at /metrics, metrics_app(registry) answers with that registry's exposition."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    inner = Starlette(routes=[Route("/work", ok), Mount("/metrics", metrics_app(registry))])
    app = RateLimitMiddleware(inner, rules=RULES, metrics=metrics)
    async with client(app) as c:
        await c.get("/work", headers={"x-api-key": "a"})
        r = await c.get("/metrics/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert 'ratelimit_decisions_total{limit="",outcome="allowed",rule="work"} 1.0' in r.text


async def test_metrics_app_defaults_to_the_global_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """metrics_app() serves REGISTRY, where Metrics() registers by default."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    Metrics().observe_backend_error("served-by-default")
    async with client(metrics_app()) as c:
        r = await c.get("/")
    assert 'ratelimit_backend_errors_total{operation="served-by-default"} 1.0' in r.text


async def test_metrics_app_in_multiprocess_mode_reads_the_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, metrics_app serves the directory's merged files."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    registry = CollectorRegistry()
    Metrics(registry).observe_backend_error("decide")  # in-process values: not in the files
    async with client(metrics_app(registry)) as c:
        r = await c.get("/")
    assert r.status_code == 200
    assert "ratelimit_backend_errors_total" not in r.text


def test_metrics_app_rejects_a_missing_multiprocess_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A PROMETHEUS_MULTIPROC_DIR that is not a directory fails at start-up, naming it."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"^PROMETHEUS_MULTIPROC_DIR: expected an existing"):
        metrics_app()
