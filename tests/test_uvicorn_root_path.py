"""Under a real `uvicorn --root-path /api`, rules written for the app's routes still count."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from _servers import uvicorn_app


@pytest.fixture
def server() -> Iterator[str]:
    """A fresh uvicorn (fresh quota) serving tests/apps/root_path_app.py with root_path /api."""
    with uvicorn_app("apps.root_path_app:app", "--root-path", "/api", probe="/ran") as (url, _):
        yield url


def _runs(server: str) -> int:
    return int(httpx.get(f"{server}/ran", timeout=2).json()["models"])


def test_requests_under_root_path_are_counted(server: str) -> None:
    """uvicorn puts /api in front of the path; the rule for /v1/models still counts: 429."""
    assert httpx.get(f"{server}/ran", timeout=2).json()["root_path"] == "/api"
    with httpx.Client(base_url=server, timeout=5) as c:
        codes = [c.get("/v1/models").status_code for _ in range(4)]
        head = c.head("/v1/models").status_code
    assert codes == [200, 200, 200, 429]
    assert head == 429
    assert _runs(server) == 3


def test_an_unstripped_prefix_never_runs_the_endpoint_uncounted(server: str) -> None:
    """A proxy that does not strip /api: uvicorn prefixes it again, so routing finds no
    endpoint (404); whatever runs is counted, and the quota is there for the real path."""
    with httpx.Client(base_url=server, timeout=5) as c:
        unstripped = [c.get("/api/v1/models").status_code for _ in range(4)]
        codes = [c.get("/v1/models").status_code for _ in range(4)]
    assert set(unstripped) == {404}
    assert codes == [200, 200, 200, 429]
    assert _runs(server) == 3


def test_slash_redirects_under_root_path_spend_nothing(server: str) -> None:
    """uvicorn + Starlette redirect /v1/models/ (Location under /api) without spending."""
    with httpx.Client(base_url=server, timeout=5) as c:
        redirects = [c.get("/v1/models/") for _ in range(10)]
        codes = [c.get("/v1/models").status_code for _ in range(4)]
    assert {r.status_code for r in redirects} == {307}
    assert {httpx.URL(r.headers["location"]).path for r in redirects} == {"/api/v1/models"}
    assert codes == [200, 200, 200, 429]
