"""Under a real `uvicorn --root-path /api`, rules written for the app's routes still count."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _servers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server() -> Iterator[str]:
    """A fresh uvicorn (fresh quota) serving tests/apps/root_path_app.py with root_path /api."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "apps.root_path_app:app", "--root-path", "/api",
         "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/ran", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("uvicorn did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
