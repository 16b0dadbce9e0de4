"""Metrics under a real `uvicorn --workers 2` in multi-process mode, and a real Prometheus.

One module-scoped fleet: uvicorn with two workers on a free loopback port,
`PROMETHEUS_MULTIPROC_DIR` set to a temporary directory, traffic sent until
both workers have answered. Every response carries the answering worker's pid
(a wrapper outside the middleware), so the tests know the exact totals the
merged exposition must show, whichever worker serves the scrape.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
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
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from ratelimit import Metrics, RateLimitMiddleware, Rule, TokenBucket, keys, metrics_app

PID = str(os.getpid()).encode()


async def work(request):
    return PlainTextResponse("ok")


def create_app():
    inner = Starlette(routes=[Route("/work", work), Mount("/metrics", metrics_app())])
    limited = RateLimitMiddleware(
        inner,
        metrics=Metrics(),
        rules=[Rule("/work", limits=[
            TokenBucket("1/hour", burst=3, key=keys.header("x-api-key"), name="per-key"),
        ])],
    )

    async def app(scope, receive, send):
        async def send_pid(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-pid", PID)]}
            await send(message)

        await limited(scope, receive, send_pid)

    return app
"""

HOST = "127.0.0.1"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


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
    """The running uvicorn fleet and what the test traffic got from it."""

    port: int
    multiproc_dir: Path
    #: (pid, status) -> responses.
    seen: Counter[tuple[str, int]] = field(default_factory=Counter)

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.port}/metrics/"

    def count(self, status: int) -> int:
        return sum(n for (_, s), n in self.seen.items() if s == status)

    @property
    def pids(self) -> set[str]:
        return {pid for pid, _ in self.seen}


async def send_traffic(fleet: Fleet, batches: int = 50, per_batch: int = 12) -> None:
    """Concurrent requests on fresh connections until both workers answered (and some more)."""
    url = f"http://{HOST}:{fleet.port}/work"
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


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    (root / "mpapp.py").write_text(APP_SOURCE)
    multiproc = root / "prometheus-multiproc"
    multiproc.mkdir()
    port = free_port()
    log = root / "uvicorn.log"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "mpapp:create_app", "--factory",
                "--workers", "2", "--app-dir", str(root),
                "--host", HOST, "--port", str(port), "--log-level", "warning",
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        fleet = Fleet(port, multiproc)
        wait_until_up(fleet.metrics_url, proc, log, timeout=60)
        # Each worker's Metrics writes its counter file as the app is built: wait
        # for two, so traffic does not start while one worker is still booting.
        deadline = time.monotonic() + 60
        while len(list(multiproc.glob("counter_*.db"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        asyncio.run(send_traffic(fleet))
        yield fleet
    finally:
        stop(proc)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], list[float]]:
    """Every sample of one scrape; a list per series, to catch unmerged duplicates."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], list[float]] = {}
    for family in text_string_to_metric_families(get(url).decode()):
        for s in family.samples:
            out.setdefault((s.name, frozenset(s.labels.items())), []).append(s.value)
    return out


def series(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


@pytest.mark.slow
def test_counters_sum_over_workers(fleet: Fleet) -> None:
    """Whichever worker answers the scrape, counters are the exact sum over both workers."""
    assert len(fleet.pids) == 2, f"traffic reached only {fleet.pids}"
    allowed, limited = fleet.count(200), fleet.count(429)
    assert allowed + limited == sum(fleet.seen.values())
    per_worker = Counter(pid for (pid, status), n in fleet.seen.items() for _ in range(n))
    assert all(n < allowed + limited for n in per_worker.values())
    files = {p.name.rsplit("_", 1)[1] for p in fleet.multiproc_dir.glob("counter_*.db")}
    assert fleet.pids <= {f.removesuffix(".db") for f in files}
    for _ in range(6):  # fresh connections: both workers serve scrapes
        got = scrape(fleet.metrics_url)
        decisions = "ratelimit_decisions_total"
        assert got[(decisions, series(rule="work", limit="", outcome="allowed"))] == [allowed]
        assert got[(decisions, series(rule="work", limit="per-key", outcome="limited"))] == [
            limited
        ]
        count = got[("ratelimit_decision_seconds_count", series(rule="work"))]
        assert count == [allowed + limited]


@pytest.mark.slow
def test_gauges_merge_to_one_series_without_pid(fleet: Fleet) -> None:
    """The limit gauge (livemostrecent) and in-flight gauge (livesum) merge over workers."""
    got = scrape(fleet.metrics_url)
    assert got[("ratelimit_limit", series(rule="work", limit="per-key"))] == [3.0]
    rate = got[("ratelimit_limit_rate_per_second", series(rule="work", limit="per-key"))]
    assert rate == [pytest.approx(1 / 3600)]
    assert not any(("pid", pid) in labels for (_, labels) in got for pid in fleet.pids)


@pytest.mark.slow
@pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (apt-get install prometheus; scripts/test does it)",
)
def test_multiprocess_exposition_passes_promtool(fleet: Fleet) -> None:
    """The merged multi-process exposition passes `promtool check metrics` too."""
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=get(fleet.metrics_url),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""


DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana" / "ratelimit.json"


def query(prometheus_port: int, promql: str) -> list[dict[str, Any]]:
    """An instant query through Prometheus' HTTP API; fails on any API error."""
    url = f"http://{HOST}:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode(
        {"query": promql}
    )
    answer = json.loads(get(url))
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


@pytest.fixture(scope="module")
def prometheus(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real Prometheus server scraping the fleet every second; yields its port."""
    if PROMETHEUS is None:
        pytest.skip(
            "the prometheus server is not installed (apt-get install prometheus; "
            "scripts/test does it)"
        )
    root = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: ratelimit\n"
        "    metrics_path: /metrics/\n"
        "    static_configs:\n"
        f"      - targets: ['{HOST}:{fleet.port}']\n"
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
        # Wait for a few scrapes, so rate() over the dashboards' windows has points.
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


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_exact_count(fleet: Fleet, prometheus: int) -> None:
    """A Prometheus server scraping /metrics answers the exact admitted count through its API."""
    assert query(prometheus, 'up{job="ratelimit"}')[0]["value"][1] == "1"
    admitted = query(prometheus, 'sum(ratelimit_decisions_total{rule="work",outcome="allowed"})')
    assert float(admitted[0]["value"][1]) == fleet.count(200)
    refused = query(prometheus, 'sum(ratelimit_decisions_total{rule="work",outcome="limited"})')
    assert float(refused[0]["value"][1]) == fleet.count(429)


@pytest.mark.slow
def test_every_dashboard_query_evaluates_in_prometheus(prometheus: int) -> None:
    """Each query of the Grafana dashboard is valid PromQL, and the core panels have data."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    results = {}
    for expr in exprs:
        promql = expr.replace("$__rate_interval", "1m").replace("$rule", ".*")
        results[expr] = query(prometheus, promql)
    with_data = [e for e, r in results.items() if r]
    for needle in ("allowed|failed_open", "ratelimit_limit{", "ratelimit_decision_seconds"):
        assert any(needle in e for e in with_data), needle
