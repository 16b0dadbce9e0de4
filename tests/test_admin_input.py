"""The admin endpoints (`top_app`, `metrics_app`) answer bad input with a 400, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from ratelimit import ConfigError, TopCallers, keys, metrics_app, top_app


def _top() -> TopCallers:
    top = TopCallers(capacity=8)
    key = top.track(keys.header("x-api-key"), "api-key")
    for i in range(12):
        for _ in range(i + 1):
            key({"type": "http", "headers": [(b"x-api-key", f"caller-{i}".encode())]})
    return top


async def _get(app: Any, target: str, headers: dict[str, str] | None = None) -> httpx.Response:
    # No raise_app_exceptions: a crash in the app must show as the 500 a server sends.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(target, headers=headers)


@pytest.mark.parametrize(
    "query",
    [
        "n=%C2%B2",  # "²": str.isdigit() says yes, int() raises
        "n=-1",
        "n=0",
        "n=abc",
        "n=10**9",
        "n=",
        "n=1.5",
        "n=%201",
        "n=1_0",
        "n=%D9%A3",  # Arabic-Indic three: int() would take it
        "n=3&n=5",
        "n=%ff",  # not UTF-8
    ],
)
async def test_top_app_answers_bad_n_with_a_400(query: str) -> None:
    """A malformed, non-ASCII, non-positive or repeated `n` is a 400 saying what `n` takes."""
    r = await _get(top_app(_top()), f"/?{query}")
    assert r.status_code == 400
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.text.startswith(("n: ", "the query string")), r.text
    assert len(r.text) < 100


@pytest.mark.parametrize(
    ("query", "shown"),
    [("", 5), ("n=3", 3), ("n=8", 8), ("n=1000000000", 8), ("n=" + "9" * 5000, 8), ("x=1", 5)],
)
async def test_top_app_reads_a_good_n_and_caps_it_at_the_capacity(query: str, shown: int) -> None:
    """A whole number is read; past the capacity it reads as the capacity; other params
    are ignored."""
    r = await _get(top_app(_top(), n=5), f"/?{query}")
    assert r.status_code == 200
    assert len(r.json()["tables"]["api-key"]["callers"]) == shown


@pytest.mark.parametrize("n", [0, -1, True, "10", 1.5])
def test_top_app_default_n_must_be_a_positive_integer(n: Any) -> None:
    """The default count is configuration: checked at construction."""
    with pytest.raises(ConfigError, match=r"^n: expected a positive integer"):
        top_app(_top(), n=n)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("ratelimit_probe", "A probe.", registry=registry).inc()
    return registry


@pytest.mark.parametrize(
    "headers",
    [
        {"accept": "application/openmetrics-text; version=abc"},
        {"accept": "text/plain; version=1.x"},
    ],
)
async def test_metrics_app_answers_an_unreadable_accept_header_with_a_400(
    headers: dict[str, str],
) -> None:
    """prometheus_client compares the version as numbers and fails with a 500; here it is
    a 400 naming the header."""
    r = await _get(metrics_app(_registry()), "/", headers)
    assert r.status_code == 400
    assert r.text.startswith("accept: ")


async def test_metrics_app_answers_a_query_that_is_not_utf8_with_a_400() -> None:
    """A query string prometheus_client could not decode is a 400."""
    app = metrics_app(_registry())
    scope_query = b"name[]=\xff"
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": scope_query,
        "headers": [(b"accept", b"text/plain; charset=\xff")],
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 400


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/", {}),
        ("/?name[]=ratelimit_probe_total&name[]=ratelimit_probe_total", {}),
        ("/", {"accept": "application/openmetrics-text; version=1.0.0"}),
        ("/", {"accept-encoding": "gzip"}),
    ],
)
async def test_metrics_app_serves_good_scrapes_as_before(
    target: str, headers: dict[str, str]
) -> None:
    """Ordinary scrapes (filters, OpenMetrics, gzip) still answer 200 with the metric."""
    r = await _get(metrics_app(_registry()), target, headers)
    assert r.status_code == 200
    assert "ratelimit_probe_total" in r.text
