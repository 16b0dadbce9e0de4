"""No bypass through routing: root_path, mounts, HEAD, `{rest:path}`; slash redirects are free.

Every test goes through real Starlette routing: an endpoint that ran must have
been counted by the rule written for it (the `--root-path` case under a real
uvicorn is in test_uvicorn_root_path.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from ratelimit import (
    BackendError,
    Concurrency,
    MemoryBackend,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    Window,
    keys,
)
from ratelimit.asgi.redirects import slash_redirect
from ratelimit.backends.base import Backend
from ratelimit.backends.redis import RedisBackend


def _bucket(name: str, quota: int = 3) -> TokenBucket:
    return TokenBucket(f"{quota}/minute", burst=quota, key=keys.client_ip(), name=name)


class Site:
    """A Starlette app whose endpoints record each run, limited by one rule per route."""

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        headers: bool = True,
        limits: Callable[[str], list[Any]] | None = None,
    ) -> None:
        self.ran: list[str] = []
        make = limits or (lambda name: [_bucket(name)])

        def endpoint(name: str, response: Callable[[], Response] | None = None) -> Any:
            async def run(request: Request) -> Response:
                self.ran.append(name)
                return response() if response is not None else PlainTextResponse(name)

            return run

        self.app = Starlette(
            routes=[
                Route("/v1/models", endpoint("models"), methods=["GET"]),
                Route("/v1/things/", endpoint("things"), methods=["GET"]),
                Route("/files/{rest:path}", endpoint("files")),
                Route("/users/{id}", endpoint("users")),
                Route("/apix/v1/models", endpoint("apix")),
                Route(
                    "/v1/moved",
                    endpoint("moved", lambda: RedirectResponse("/elsewhere", status_code=307)),
                ),
            ]
        )
        self.app.add_middleware(
            RateLimitMiddleware,
            backend=MemoryBackend() if backend is None else backend,
            headers=headers,
            rules=[
                Rule("/v1/models", methods=["GET"], limits=make("models")),
                Rule("/v1/things", methods=["GET"], limits=make("things")),
                Rule("/files/{rest:path}", limits=make("files")),
                Rule("/users/{id}", limits=make("users")),
                Rule("/apix/v1/models", limits=make("apix")),
                Rule("/v1/moved", limits=make("moved")),
            ],
        )


def _client(app: Any, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


#: (deployment, outer app of a site, root_path the server passes, prefix a client sends)
DEPLOYMENTS = ["root", "mounted", "root_path"]


def _deploy(site: Site, deployment: str) -> tuple[httpx.AsyncClient, str]:
    """A client for `site` served at `/`, mounted under `/api`, or with root_path `/api`
    passed by the server and kept in the path (a proxy that does not strip it)."""
    if deployment == "root":
        return _client(site.app), ""
    if deployment == "mounted":
        return _client(Starlette(routes=[Mount("/api", app=site.app)])), "/api"
    return _client(site.app, root_path="/api"), "/api"


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_one_configuration_counts_at_root_mounted_and_under_root_path(
    deployment: str,
) -> None:
    """The same rules limit the same endpoint served at `/`, mounted, and under root_path."""
    site = Site()
    client, prefix = _deploy(site, deployment)
    async with client:
        codes = [(await client.get(f"{prefix}/v1/models")).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert site.ran == ["models"] * 3


#: (root_path, request path, the endpoint Starlette runs for it or None).
ROUTED = [
    ("", "/v1/models", "models"),
    ("", "/v1/models/", None),  # redirected
    ("", "/v1/things", None),  # redirected
    ("", "/v1/things/", "things"),
    ("", "/files/", "files"),
    ("", "/files", None),  # redirected
    ("", "/files/a", "files"),
    ("", "/files//a/b/", "files"),
    ("", "/files/a%20b", "files"),
    ("", "/users/42", "users"),
    ("", "/users/42/", None),  # redirected
    ("", "/users/", None),  # not found
    ("", "/apix/v1/models", "apix"),
    ("/api", "/api/v1/models", "models"),
    ("/api", "/api/v1/things/", "things"),
    ("/api", "/api/files/", "files"),
    ("/api", "/api/users/7", "users"),
    ("/api", "/apix/v1/models", "apix"),
    ("/api", "/api/apix/v1/models", "apix"),
    ("/api", "/api/api/v1/models", None),  # not found
]


@pytest.mark.parametrize(("root_path", "path", "endpoint"), ROUTED)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_every_request_starlette_routes_to_an_endpoint_is_counted_by_its_rule(
    root_path: str, path: str, endpoint: str | None, method: str
) -> None:
    """Endpoint ran => the request was decided by the rule written for that endpoint."""
    site = Site()
    async with _client(site.app, root_path) as client:
        response = await client.request(method, path)
    assert site.ran == ([endpoint] if endpoint else [])
    if endpoint is not None:
        assert response.headers["ratelimit-policy"] == f'"{endpoint}";q=3;w=60'


async def test_head_is_counted_by_a_get_rule() -> None:
    """Starlette runs a GET endpoint for HEAD: a GET rule counts HEAD and GET together."""
    site = Site()
    async with _client(site.app) as client:
        heads = [(await client.head("/v1/models")).status_code for _ in range(3)]
        after = [(await client.head("/v1/models")).status_code, (await client.get("/v1/models"))]
    assert heads == [200, 200, 200]
    assert after[0] == 429
    assert after[1].status_code == 429
    assert site.ran == ["models"] * 3


async def test_a_head_only_rule_does_not_count_get() -> None:
    """HEAD is added to GET rules, not the other way round."""
    app = Starlette(routes=[Route("/x", lambda request: PlainTextResponse("x"))])
    app.add_middleware(RateLimitMiddleware, rules=[Rule("/x", ["HEAD"], [_bucket("x", 1)])])
    async with _client(app) as client:
        codes = [(await client.get("/x")).status_code for _ in range(3)]
    assert codes == [200, 200, 200]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A MemoryBackend, or a RedisBackend on the session's real redis-server."""
    if request.param == "memory":
        store: Backend = MemoryBackend()
    else:
        store = RedisBackend(request.getfixturevalue("redis_url"))
    try:
        yield store
    finally:
        await store.aclose()


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
@pytest.mark.parametrize(
    ("redirected", "served", "name"),
    [("/v1/models/", "/v1/models", "models"), ("/v1/things", "/v1/things/", "things")],
)
async def test_trailing_slash_redirects_spend_nothing_and_the_endpoint_stays_limited(
    backend: Backend, deployment: str, redirected: str, served: str, name: str
) -> None:
    """The slash variant Starlette only redirects is free; the endpoint itself is limited."""
    site = Site(backend)
    client, prefix = _deploy(site, deployment)
    async with client:
        redirects = [await client.get(prefix + redirected) for _ in range(10)]
        codes = [(await client.get(prefix + served)).status_code for _ in range(4)]
    assert {r.status_code for r in redirects} == {307}
    assert {httpx.URL(r.headers["location"]).path for r in redirects} == {prefix + served}
    assert codes == [200, 200, 200, 429]
    assert site.ran == [name] * 3


@pytest.mark.parametrize(
    ("headers", "limits"),
    [
        (False, lambda name: [_bucket(name)]),
        (True, lambda name: [_bucket(name), Concurrency(1, key=keys.GLOBAL)]),
        (False, lambda name: [_bucket(name), Concurrency(1, key=keys.GLOBAL)]),
    ],
    ids=["bucket-no-headers", "bucket-and-slots", "bucket-and-slots-no-headers"],
)
async def test_slash_redirects_are_free_with_or_without_slots_and_header_fields(
    headers: bool, limits: Callable[[str], list[Any]]
) -> None:
    """Every way an admitted response is sent gives a slash redirect's units back."""
    site = Site(headers=headers, limits=limits)
    async with _client(site.app) as client:
        redirects = [(await client.get("/v1/models/")).status_code for _ in range(10)]
        codes = [(await client.get("/v1/models")).status_code for _ in range(4)]
    assert set(redirects) == {307}
    assert codes == [200, 200, 200, 429]


async def test_an_endpoint_that_redirects_elsewhere_still_spends(backend: Backend) -> None:
    """A redirect to another location is the endpoint's answer: it is charged."""
    site = Site(backend)
    async with _client(site.app) as client:
        codes = [(await client.get("/v1/moved")).status_code for _ in range(4)]
    assert codes == [307, 307, 307, 429]
    assert site.ran == ["moved"] * 3


async def test_a_refund_that_fails_still_sends_the_redirect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The limiter never fails a response over a refund: the redirect goes out, logged."""

    class NoRefunds(MemoryBackend):
        async def refund(self, checks: Any) -> None:
            raise BackendError("store gone")

    site = Site(NoRefunds())
    async with _client(site.app) as client:
        response = await client.get("/v1/models/")
    assert response.status_code == 307
    assert "could not refund a trailing-slash redirect" in caplog.text


@pytest.mark.parametrize("strategy", ["fixed", "sliding", "moving"])
async def test_a_window_hit_comes_back_on_a_slash_redirect(strategy: Any) -> None:
    """Window units are refunded like bucket units: redirects never spend the window."""
    site = Site(
        limits=lambda name: [Window("3/minute", strategy=strategy, key=keys.client_ip(), name=name)]
    )
    async with _client(site.app) as client:
        codes = [(await client.get("/v1/models/")).status_code for _ in range(6)]
    assert codes == [307] * 6


@pytest.mark.parametrize(
    ("path", "status", "location", "free"),
    [
        ("/v1/models/", 307, b"http://test/v1/models", True),
        ("/v1/models", 307, b"http://test/v1/models/", True),
        ("/v1/models//", 308, b"/v1/models", True),
        ("/v1/models/", 301, b"/v1/models?x=1", True),
        ("/a b/", 307, b"http://test/a%20b", True),
        ("/api/", 307, b"http://test/api", True),
        ("/v1/models/", 303, b"/v1/models", False),
        ("/v1/models/", 200, b"/v1/models", False),
        ("/v1/models/", 307, b"/v1/models/", False),
        ("/v1/models/", 307, b"/elsewhere", False),
        ("/v1/models/", 307, b"http://evil.example/v1/models", False),
        ("/v1/models/", 307, b"/v1/model", False),
        ("/", 307, b"http://test", False),
    ],
)
def test_slash_redirect_recognises_only_a_redirect_to_the_other_spelling(
    path: str, status: int, location: bytes, free: bool
) -> None:
    """Only a redirect to the request's own path, up to trailing slashes, on its host is free."""
    scope = {"type": "http", "path": path, "headers": [(b"host", b"test")]}
    start = {"type": "http.response.start", "status": status, "headers": [(b"location", location)]}
    assert slash_redirect(scope, start) is free
