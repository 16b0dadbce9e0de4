"""Helpers for tests that run a real multi-process fleet (uvicorn or gunicorn) and Prometheus.

The app (`APP_SOURCE`, written to a temporary directory as `mpapp.py`) puts
every response's answering worker pid in an `x-pid` header, from a wrapper
outside the middleware, so a test knows the exact totals the merged
exposition must show, whichever worker serves the scrape. Routes:

- `/work`: a TokenBucket of burst 3 per `x-api-key` (rule "work", limit "per-key").
- `/hold`: a Concurrency of 64 (rule "hold", limit "slots"), per worker since
  each has its own MemoryBackend; the response starts at once and its body
  never ends, so the slot stays held (and counted in `ratelimit_in_flight`)
  until the client or the worker goes.

Servers are started in their own session and stopped by process group id.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

APP_SOURCE = """
import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route

from ratelimit import (
    Concurrency, RateLimitMiddleware, Rule, TokenBucket, keys, metrics_app,
)


async def work(request):
    return PlainTextResponse("ok")


async def hold(request):
    async def body():
        yield b"holding\\n"
        await asyncio.sleep(600)

    return StreamingResponse(body())


def create_app():
    inner = Starlette(routes=[
        Route("/work", work), Route("/hold", hold), Mount("/metrics", metrics_app()),
    ])
    limited = RateLimitMiddleware(
        inner,
        rules=[
            Rule("/work", limits=[
                TokenBucket("1/hour", burst=3, key=keys.header("x-api-key"), name="per-key"),
            ]),
            Rule("/hold", limits=[Concurrency(64, key=keys.GLOBAL, name="slots")]),
        ],
    )
    pid = str(os.getpid()).encode()

    async def app(scope, receive, send):
        async def send_pid(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-pid", pid)]}
            await send(message)

        await limited(scope, receive, send_pid)

    return app
"""

HOST = "127.0.0.1"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (apt-get install prometheus; scripts/test does it)",
)

Labels = frozenset[tuple[str, str]]
Scrape = dict[tuple[str, Labels], list[float]]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server we started in its own session: its whole process group, by id."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body


def wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll `url` until it answers; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            get(url, timeout=1.0)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up after {timeout}s:\n{log.read_text()}") from None
            time.sleep(0.1)


@dataclass
class Fleet:
    """A running multi-worker server and what the test traffic got from it."""

    port: int
    multiproc_dir: Path
    #: The server's own process (uvicorn's supervisor, gunicorn's master).
    proc: subprocess.Popen[bytes] | None = None
    #: (pid, status) -> responses.
    seen: Counter[tuple[str, int]] = field(default_factory=Counter)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics/"

    def count(self, status: int) -> int:
        return sum(n for (_, s), n in self.seen.items() if s == status)

    @property
    def pids(self) -> set[str]:
        return {pid for pid, _ in self.seen}


def write_app(root: Path) -> None:
    """Write the test app as `root/mpapp.py` (factory `create_app`)."""
    (root / "mpapp.py").write_text(APP_SOURCE)


def start_fleet(
    argv: list[str], root: Path, multiproc: Path, port: int, name: str
) -> tuple[Fleet, Path]:
    """Start `argv` in its own session with PROMETHEUS_MULTIPROC_DIR=`multiproc`.

    Returns once `/metrics/` answers and both workers have written their
    counter files (each worker's Metrics does so as the app is built), so
    traffic does not start while one worker is still booting. The caller
    stops `fleet.proc` with `stop`.
    """
    log = root / f"{name}.log"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    fleet = Fleet(port, multiproc, proc)
    try:
        wait_until_up(fleet.metrics_url, proc, log, timeout=60)
        deadline = time.monotonic() + 60
        while len(list(multiproc.glob("counter_*.db"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    except BaseException:
        stop(proc)
        raise
    return fleet, log


async def send_traffic(fleet: Fleet, batches: int = 50, per_batch: int = 12) -> None:
    """Concurrent requests on fresh connections until both workers answered (and some more)."""
    url = f"{fleet.url}/work"
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:
        for i in range(batches):
            replies = await asyncio.gather(
                *(client.get(url, headers={"x-api-key": "k"}) for _ in range(per_batch))
            )
            for r in replies:
                fleet.seen[(r.headers["x-pid"], r.status_code)] += 1
            if len(fleet.pids) >= 2 and i >= 1:
                return


def hold_slot(fleet: Fleet) -> tuple[socket.socket, str]:
    """GET /hold on a fresh connection; return the open socket and the answering worker's pid.

    The worker holds one `hold/slots` slot until the socket is closed (or the
    worker dies). A raw socket, so the body is never read to its (absent) end.
    """
    sock = socket.create_connection((HOST, fleet.port), timeout=10.0)
    try:
        sock.sendall(b"GET /hold HTTP/1.1\r\nHost: test\r\n\r\n")
        data = b""
        while b"holding" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"connection closed while holding: {data!r}")
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        assert head[0].split()[1] == "200", head
        pid = next(v.strip() for k, v in (h.split(":", 1) for h in head[1:]) if k == "x-pid")
    except BaseException:
        sock.close()
        raise
    return sock, pid


def scrape(url: str) -> Scrape:
    """Every sample of one scrape; a list per series, to catch unmerged duplicates."""
    out: Scrape = {}
    for family in text_string_to_metric_families(get(url).decode()):
        for s in family.samples:
            out.setdefault((s.name, frozenset(s.labels.items())), []).append(s.value)
    return out


def series(**labels: str) -> Labels:
    return frozenset(labels.items())


def promtool_check(exposition: bytes) -> None:
    """`promtool check metrics` accepts `exposition` without a word of complaint."""
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""


def query(prometheus_port: int, promql: str) -> list[dict[str, Any]]:
    """An instant query through Prometheus' HTTP API; fails on any API error."""
    url = f"http://{HOST}:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode(
        {"query": promql}
    )
    answer = json.loads(get(url))
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def run_prometheus(target_port: int, root: Path) -> Iterator[int]:
    """A real Prometheus server scraping `target_port` every second; yields its port.

    Skips when the server is not installed. Returns after it has scraped a
    few times, so rate() over a dashboard's windows has points.
    """
    if PROMETHEUS is None:
        pytest.skip(
            "the prometheus server is not installed (apt-get install prometheus; "
            "scripts/test does it)"
        )
    port = free_port()
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: ratelimit\n"
        "    metrics_path: /metrics/\n"
        "    static_configs:\n"
        f"      - targets: ['{HOST}:{target_port}']\n"
    )
    log = root / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address={HOST}:{port}",
            ],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_up(f"http://{HOST}:{port}/-/ready", proc, log, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = query(port, 'count_over_time(up{job="ratelimit"}[1m])')
            if got and float(got[0]["value"][1]) >= 3:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"prometheus did not scrape the fleet:\n{log.read_text()[-3000:]}")
        yield port
    finally:
        stop(proc)
