"""The Grafana dashboard (examples/grafana/ratelimit.json) against what is really exported.

Every metric, label and `outcome` value a query names must exist in a real
exposition parsed back by prometheus_client's parser, and the "admitted" and
"refused" queries must add up to exactly the responses traffic got: every
refusal (429, 503 after a wait or a shed, a block, a 400) and every admission
(after a wait, in shadow mode, with the backend down) counted once.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from test_metrics import busy_registry

from ratelimit import (
    BackendError,
    Concurrency,
    MemoryBackend,
    Metrics,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    keys,
)
from ratelimit.backends.breaker import CircuitBreaker
from ratelimit.core.outcomes import ADMITTED, OUTCOMES, REFUSED

DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana" / "ratelimit.json"

#: A selector `ratelimit_x{...}` or a bare `ratelimit_x`: the metric and its matchers.
SELECTOR = re.compile(r"\b(ratelimit_[a-z_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def targets(title: str | None = None) -> list[dict[str, Any]]:
    panels = dashboard()["panels"]
    return [t for p in panels if title in (None, p["title"]) for t in p.get("targets", [])]


def labels_by_metric(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Each sample name of the exposition and the label names it carries."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def outcomes(expr: str, op: str = "=~") -> set[str]:
    """The `outcome` values an expression's `outcome=~"a|b"` matchers name."""
    found: set[str] = set()
    for _, matchers in SELECTOR.findall(expr):
        for label, got, value in MATCHER.findall(matchers):
            if label == "outcome" and got == op:
                found.update(value.split("|"))
    return found


async def test_every_metric_label_and_outcome_a_query_names_is_exported() -> None:
    """The dashboard is importable as is, and each metric, matcher label, grouping label
    and `outcome` value in its queries exists in a real exposition."""
    board = dashboard()
    assert board["uid"] == "ratelimit-overview"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    exported = labels_by_metric(await busy_registry())
    with_breaker = CollectorRegistry()  # ratelimit_breaker_open: only with a breaker-backed store
    Metrics(with_breaker).watch_breaker(CircuitBreaker())
    exported |= labels_by_metric(with_breaker)
    assert all(t["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for t in targets())
    exprs = [t["expr"] for t in targets()]
    exprs.append(variables["rule"]["query"]["query"])
    assert len(exprs) >= 10
    for expr in exprs:
        selectors = SELECTOR.findall(expr)
        assert selectors, expr
        used: set[str] = set()
        for metric, matchers in selectors:
            assert metric in exported, f"{metric} is not exported: {expr}"
            used |= exported[metric]
            for label, _, value in MATCHER.findall(matchers):
                assert label in exported[metric], f"{metric} has no label {label}: {expr}"
                if label == "outcome":
                    for alternative in value.split("|"):
                        assert any(re.fullmatch(alternative, o) for o in OUTCOMES), (
                            f"no outcome matches {alternative!r}: {expr}"
                        )
        for grouping in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in grouping.split(","))):
                assert label in used, f"grouping by {label}, which no metric has: {expr}"


def test_admitted_and_refused_queries_name_exactly_those_outcomes() -> None:
    """ "admitted" is every outcome that reached the app (after a wait too), "refused" every
    outcome answered with a refusal; the refused share divides the same refusals."""
    admitted, refused = targets("Admitted vs refused per rule")
    assert outcomes(admitted["expr"]) == ADMITTED
    assert outcomes(refused["expr"]) == REFUSED
    (share,) = targets("Refused share per rule")
    assert outcomes(share["expr"]) == REFUSED
    (by_limit,) = targets("Refusals by limit (shadow: would-be refusals)")
    assert outcomes(by_limit["expr"]) == (REFUSED - {"failed_closed"}) | {
        o for o in ADMITTED if o.startswith("shadow_")
    }
    assert ADMITTED.isdisjoint(REFUSED)
    assert set(OUTCOMES) == ADMITTED | REFUSED | {"abandoned"}


async def slow(request: Request) -> Response:
    await asyncio.sleep(0.2)
    return PlainTextResponse("ok")


def failing_key(scope: Any) -> str:
    raise RuntimeError("no key today")


class DownBackend(MemoryBackend):
    """A store that is down: every decision raises BackendError."""

    async def decide(self, checks: Any) -> Any:
        raise BackendError("store is down")


async def test_admitted_plus_refused_is_every_response() -> None:
    """Through real traffic of every kind, the dashboard's admitted outcomes sum to the 200s
    and its refused outcomes to the refusals, each outcome seen."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    prio = Concurrency(
        1, key=keys.GLOBAL, queue=1, timeout=5.0, name="prio",
        priority=lambda scope: int(dict(scope["headers"]).get(b"x-prio", b"0")),
    )  # fmt: skip
    rules = [
        Rule("/prio", limits=[prio], name="prio"),
        Rule("/short", limits=[Concurrency(1, key=keys.GLOBAL, queue=1, timeout=0.05)]),
        Rule("/work", limits=[TokenBucket("1/hour", burst=1)], name="work"),
        Rule("/shadow", limits=[TokenBucket("1/hour", burst=1)], shadow=True, name="shadow"),
        Rule("/bad", limits=[TokenBucket("1/hour", key=failing_key)], name="bad"),
        Rule("/blocked", limits=[TokenBucket("1/hour")], name="blocked"),
    ]
    routes = [Route(p, slow) for p in ("/prio", "/short", "/work", "/shadow", "/bad", "/blocked")]
    app = RateLimitMiddleware(Starlette(routes=routes), rules=rules, metrics=metrics)
    await app.overrides.set("blocked", block=True, until_cleared=True)
    down = [
        RateLimitMiddleware(
            Starlette(routes=[Route("/down", slow)]),
            rules=[Rule("/down", limits=[TokenBucket("1/hour")], name=f"down-{fail}")],
            backend=DownBackend(), fail=fail, metrics=metrics,
        )
        for fail in ("open", "closed")
    ]  # fmt: skip

    async def get(target: Any, path: str, prio: int = 0, after: float = 0.0) -> int:
        await asyncio.sleep(after)
        transport = httpx.ASGITransport(app=target)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.get(path, headers={"x-prio": str(prio)})).status_code

    # /prio: one runs, a low waiter is shed by a high one that then runs, a low latecomer
    # finds the line full; /short: one runs, one times out in line.
    codes = await asyncio.gather(
        get(app, "/prio"), get(app, "/prio", after=0.02), get(app, "/prio", 9, after=0.05),
        get(app, "/prio", after=0.08), get(app, "/short"), get(app, "/short", after=0.02),
        get(app, "/work"), get(app, "/work"), get(app, "/shadow"), get(app, "/shadow"),
        get(app, "/bad"), get(app, "/blocked"), get(down[0], "/down"), get(down[1], "/down"),
    )  # fmt: skip
    assert codes == [200, 503, 200, 503, 200, 503, 200, 429, 200, 200, 400, 503, 200, 503]
    counted: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name == "ratelimit_decisions_total":
                outcome = s.labels["outcome"]
                counted[outcome] = counted.get(outcome, 0) + s.value
    assert {o for o, n in counted.items() if n} == (ADMITTED | REFUSED) - {
        "shadow_rejected",
        "shadow_invalid",
    }
    assert sum(counted.get(o, 0) for o in ADMITTED) == codes.count(200)
    assert sum(counted.get(o, 0) for o in REFUSED) == len(codes) - codes.count(200)
    await app.aclose()
