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
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _fleet import (
    HOST,
    Fleet,
    free_port,
    get,
    needs_promtool,
    promtool_check,
    query,
    run_prometheus,
    scrape,
    send_traffic,
    series,
    start_fleet,
    stop,
    write_app,
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    write_app(root)
    multiproc = root / "prometheus-multiproc"
    multiproc.mkdir()
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "mpapp:create_app", "--factory",
        "--workers", "2", "--app-dir", str(root),
        "--host", HOST, "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    fleet, _ = start_fleet(argv, root, multiproc, port, "uvicorn")
    assert fleet.proc is not None
    try:
        asyncio.run(send_traffic(fleet))
        yield fleet
    finally:
        stop(fleet.proc)


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
@needs_promtool
def test_multiprocess_exposition_passes_promtool(fleet: Fleet) -> None:
    """The merged multi-process exposition passes `promtool check metrics` too."""
    promtool_check(get(fleet.metrics_url))


DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana" / "ratelimit.json"


@pytest.fixture(scope="module")
def prometheus(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real Prometheus server scraping the fleet every second; yields its port."""
    yield from run_prometheus(fleet.port, tmp_path_factory.mktemp("prometheus"))


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
    for needle in ("allowed|queued|failed_open", "ratelimit_limit{", "ratelimit_decision_seconds"):
        assert any(needle in e for e in with_data), needle
