"""TopCallers: the heaviest callers of a tracked key, served as JSON by top_app, never as labels."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from ratelimit import (
    Concurrency,
    ConfigError,
    Metrics,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    TopCallers,
    keys,
    top_app,
)
from ratelimit._types import Scope
from ratelimit.policy.keys import digest as _digest


async def ok(request: object) -> Response:
    return PlainTextResponse("ok")


def build(top: TopCallers, key: Any, registry: CollectorRegistry | None = None) -> Starlette:
    app = Starlette(routes=[Route("/work", ok), Mount("/debug/top", top_app(top))])
    app.add_middleware(
        RateLimitMiddleware,
        metrics=Metrics(registry or CollectorRegistry()),
        rules=[Rule("/work", limits=[TokenBucket("1/hour", burst=10, key=key, name="per-key")])],
    )
    return app


async def drive(app: Starlette, callers: dict[str, int]) -> dict[int, int]:
    """Send `n` requests as each caller; return the count of each status."""
    statuses: dict[int, int] = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for caller, n in callers.items():
            for _ in range(n):
                r = await client.get("/work", headers={"x-api-key": caller})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    return statuses


async def fetch(app: Starlette, query: str = "") -> dict[str, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get("/debug/top/" + query)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    answer: dict[str, Any] = r.json()
    return answer


async def test_heaviest_callers_by_digest_including_refused_requests() -> None:
    """Every request counts (admitted or 429); a caller with over 1/capacity of them is kept."""
    top = TopCallers(capacity=8)
    registry = CollectorRegistry()
    app = build(top, top.track(keys.header("x-api-key"), "api-key"), registry)
    callers = {"heavy": 60, "medium": 30} | {f"once-{i}": 1 for i in range(200)}
    statuses = await drive(app, callers)
    assert statuses[429] == 50 + 20  # each caller's burst of 10 was admitted
    answer = await fetch(app)
    assert answer["keys_shown"] is False
    table = answer["tables"]["api-key"]
    assert table["total"] == 290
    ranked = table["callers"]
    assert len(ranked) == 8
    assert ranked[0]["key"] == _digest("heavy")
    assert ranked[0]["estimate"] - ranked[0]["error"] <= 60 <= ranked[0]["estimate"]
    # medium (30 of 290) is under N/capacity = 36: Space-Saving does not promise to keep it.
    assert sum(c["estimate"] for c in ranked) == 290
    exposition = generate_latest(registry).decode()
    assert "heavy" not in exposition
    assert _digest("heavy") not in exposition


async def test_key_text_only_when_asked_for() -> None:
    """show_keys=True keeps the key text (opt-in: keys are often personal data)."""
    top = TopCallers(capacity=4, show_keys=True)
    app = build(top, top.track(keys.header("x-api-key"), "api-key"))
    await drive(app, {"alice": 3, "bob": 1})
    answer = await fetch(app, "?n=1")
    assert answer["keys_shown"] is True
    assert answer["tables"]["api-key"]["callers"] == [{"key": "alice", "estimate": 3, "error": 0}]


async def test_exempt_requests_are_not_counted_and_async_keys_work() -> None:
    """A key returning None is not a caller; an async key function is tracked too."""
    top = TopCallers(capacity=4, show_keys=True)

    async def api_key(scope: Scope) -> str | None:
        for k, v in scope["headers"]:
            if k == b"x-api-key" and v != b"exempt":
                return bytes(v).decode()
        return None

    app = build(top, top.track(api_key, "api-key"))
    statuses = await drive(app, {"a": 2, "exempt": 5})
    assert statuses == {200: 7}
    table = (await fetch(app))["tables"]["api-key"]
    assert table == {"total": 2, "callers": [{"key": "a", "estimate": 2, "error": 0}]}


def test_a_tracked_global_key_stays_shared() -> None:
    """Wrapping keys.GLOBAL keeps it shared capacity: refusals stay 503."""
    top = TopCallers()
    limit = Concurrency(1, key=top.track(keys.GLOBAL, "global"))
    assert limit.shared


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"show_keys": 1}, "show_keys"),
    ],
)
def test_bad_settings_fail_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    """Capacity is a positive int, show_keys a bool."""
    with pytest.raises(ConfigError, match=field):
        TopCallers(**kwargs)


def test_one_table_per_name() -> None:
    """Tracking two keys under one name would mix their callers: refused."""
    top = TopCallers()
    top.track(keys.header("a"), "x")
    with pytest.raises(ConfigError, match="name"):
        top.track(keys.header("b"), "x")
