"""Metrics on by default: mounting `metrics_app()` is the only line, and off means off.

The default set lives on prometheus_client's global registry, shared by every
test of this process: each test names its rules uniquely and reads only them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from ratelimit import (
    ConfigError,
    Limiter,
    Metrics,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    keys,
    metrics_app,
)


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def unique() -> str:
    return f"r{uuid.uuid4().hex[:12]}"


def rule(name: str) -> Rule:
    return Rule("/work", name=name, limits=[TokenBucket("1/hour", burst=2, key=keys.GLOBAL)])


def readme_app(name: str, **options: Any) -> Starlette:
    """The README's shape: the middleware and a mounted metrics_app(), nothing else."""
    app = Starlette(routes=[Route("/work", ok), Mount("/metrics", metrics_app())])
    app.add_middleware(RateLimitMiddleware, rules=[rule(name)], **options)
    return app


def decisions(name: str, outcome: str, limit: str = "") -> float | None:
    labels = {"rule": name, "limit": limit, "outcome": outcome}
    return REGISTRY.get_sample_value("ratelimit_decisions_total", labels)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


async def test_mounting_metrics_app_shows_the_series_of_apps_built_per_test() -> None:
    """Two apps from one factory (as per-test fixtures build them) count into one set, with
    no `Duplicated timeseries` error, and /metrics shows it without metrics=."""
    name = unique()
    first, second = readme_app(name), readme_app(name)
    transport = httpx.ASGITransport
    async with httpx.AsyncClient(transport=transport(app=first), base_url="http://t") as c:
        assert [(await c.get("/work")).status_code for _ in range(3)] == [200, 200, 503]
    async with httpx.AsyncClient(transport=transport(app=second), base_url="http://t") as c:
        assert (await c.get("/work")).status_code == 200  # its own MemoryBackend
        text = (await c.get("/metrics/")).text
    assert f'ratelimit_decisions_total{{limit="",outcome="allowed",rule="{name}"}} 3.0' in text
    refused = f'ratelimit_decisions_total{{limit="token-bucket",outcome="rejected",rule="{name}"}}'
    assert f"{refused} 1.0" in text
    assert f'ratelimit_limit{{limit="token-bucket",rule="{name}"}} 2.0' in text


async def test_a_limiter_and_a_middleware_share_the_default_set() -> None:
    """A Limiter built alone and a middleware's both count into the process's one set."""
    name = unique()
    limiter = Limiter([rule(name)])
    assert limiter.metrics is Metrics()
    await limiter.check(name)
    middleware = RateLimitMiddleware(Starlette(routes=[Route("/work", ok)]), rules=[rule(name)])
    assert middleware.metrics is limiter.metrics
    await limiter.aclose()
    assert decisions(name, "allowed") == 1


OFF: dict[str, Callable[[str], Any]] = {
    "Limiter(metrics=None)": lambda name: RateLimitMiddleware(
        Starlette(routes=[Route("/work", ok)]), limiter=Limiter([rule(name)], metrics=None)
    ),
    "RateLimitMiddleware(metrics=None)": lambda name: RateLimitMiddleware(
        Starlette(routes=[Route("/work", ok)]), rules=[rule(name)], metrics=None
    ),
    "metrics = false": lambda name: RateLimitMiddleware.from_config(
        {
            "metrics": False,
            "rules": [
                {"path": "/work", "name": name, "limits": [{"type": "window", "rate": "2/hour"}]}
            ],
        }
    )(Starlette(routes=[Route("/work", ok)])),
}


@pytest.mark.parametrize("build", OFF.values(), ids=OFF.keys())
async def test_metrics_off_counts_nothing(build: Callable[[str], RateLimitMiddleware]) -> None:
    """Turned off in code or in the config file: no observer, no series of the rule."""
    name = unique()
    app = build(name)
    assert app.metrics is None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/work")).status_code == 200
    assert decisions(name, "allowed") is None
    assert not any(s.labels.get("rule") == name for m in REGISTRY.collect() for s in m.samples)


def test_an_explicit_metrics_wins_over_the_files_false() -> None:
    """metrics= given in code is used even when the file says metrics = false."""
    from prometheus_client import CollectorRegistry

    metrics = Metrics(CollectorRegistry())
    limiter = Limiter(config={"metrics": False}, rules=[rule(unique())], metrics=metrics)
    assert limiter.metrics is metrics


def test_a_non_boolean_metrics_setting_fails_naming_it() -> None:
    """`metrics = "yes"` in a config file fails at start-up naming the key."""
    with pytest.raises(ConfigError, match=r"^metrics: expected true or false, got 'yes'"):
        Limiter(config={"metrics": "yes"})
