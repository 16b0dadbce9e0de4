"""Metrics under a real gunicorn with two uvicorn workers, configured by examples/gunicorn.conf.py.

One module-scoped fleet: `gunicorn -c examples/gunicorn.conf.py -w 2` (worker
class `uvicorn_worker.UvicornWorker`, hooks `on_starting` and `child_exit` from
`ratelimit.gunicorn`) on a free loopback port, `PROMETHEUS_MULTIPROC_DIR` set
to a directory that holds a stale counter file of a "previous run". The app is
tests/_fleet.py's: every response names the worker that answered, so the tests
know the exact totals the merged exposition must show.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from _fleet import (
    HOST,
    Fleet,
    Scrape,
    free_port,
    get,
    hold_slot,
    needs_promtool,
    promtool_check,
    scrape,
    send_traffic,
    series,
    start_fleet,
    stop,
    write_app,
)

pytest.importorskip("gunicorn", reason="gunicorn is in the test extra: pip install -e .[test]")
pytest.importorskip("uvicorn_worker", reason="uvicorn-worker is in the test extra")

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "gunicorn.conf.py"

STALE_RUN = """
from prometheus_client import Counter
Counter("ratelimit_decisions", "stale", ["rule", "limit", "outcome"]).labels(
    "work", "", "allowed"
).inc(1000)
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("gunicorn")
    write_app(root)
    multiproc = root / "prometheus-multiproc"
    multiproc.mkdir()
    # A previous run's counter file: on_starting must clear it, or the sums are off by 1000.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    subprocess.run([sys.executable, "-c", STALE_RUN], env=env, check=True, timeout=60)
    assert list(multiproc.glob("counter_*.db"))
    port = free_port()
    argv = [
        sys.executable, "-m", "gunicorn", "-c", str(CONFIG),
        "--workers", "2", "--bind", f"{HOST}:{port}", "--pythonpath", str(root),
        "--graceful-timeout", "3", "--log-level", "warning",
        "mpapp:create_app()",
    ]  # fmt: skip
    fleet, _ = start_fleet(argv, root, multiproc, port, "gunicorn")
    assert fleet.proc is not None
    try:
        asyncio.run(send_traffic(fleet))
        yield fleet
    finally:
        stop(fleet.proc)


def workers(fleet: Fleet) -> set[int]:
    """The pids of gunicorn's live workers (the master's children)."""
    assert fleet.proc is not None
    return {
        c.pid
        for c in psutil.Process(fleet.proc.pid).children()
        if c.status() != psutil.STATUS_ZOMBIE
    }


def in_flight(got: Scrape) -> list[float]:
    return got[("ratelimit_in_flight", series(rule="hold", limit="slots"))]


def eventually(check: object, timeout: float = 30.0) -> None:
    """Retry `check()` (a callable returning a bool) until true; fail after `timeout`."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true after {timeout}s: {check}")
        time.sleep(0.05)


@pytest.mark.slow
def test_the_example_config_runs_uvicorn_workers(fleet: Fleet) -> None:
    """The documented config starts two uvicorn workers, and both answered traffic."""
    assert len(workers(fleet)) == 2
    assert {int(p) for p in fleet.pids} == workers(fleet), fleet.seen


@pytest.mark.slow
def test_counters_sum_over_gunicorn_workers_exactly(fleet: Fleet) -> None:
    """Whichever worker answers the scrape, counters are the exact sum over both (no stale run)."""
    allowed, limited = fleet.count(200), fleet.count(429)
    assert allowed + limited == sum(fleet.seen.values())
    for pid in fleet.pids:  # one key, burst 3 in each worker's own MemoryBackend
        answered = fleet.seen[(pid, 200)] + fleet.seen[(pid, 429)]
        assert fleet.seen[(pid, 200)] == min(3, answered)
    for _ in range(6):  # fresh connections: both workers serve scrapes
        got = scrape(fleet.metrics_url)
        decisions = "ratelimit_decisions_total"
        assert got[(decisions, series(rule="work", limit="", outcome="allowed"))] == [allowed]
        refused = got[(decisions, series(rule="work", limit="per-key", outcome="limited"))]
        assert refused == [limited]
        assert got[("ratelimit_decision_seconds_count", series(rule="work"))] == [allowed + limited]


@pytest.mark.slow
def test_gauges_aggregate_per_their_mode(fleet: Fleet) -> None:
    """in_flight sums the slots held in both workers; the limit gauges show one value, no pid."""
    held: list[tuple[socket.socket, str]] = []
    try:
        for _ in range(40):
            held.append(hold_slot(fleet))
            if len({pid for _, pid in held}) == 2 and len(held) >= 3:
                break
        assert len({pid for _, pid in held}) == 2, "every hold reached one worker"
        for _ in range(4):
            got = scrape(fleet.metrics_url)
            assert in_flight(got) == [len(held)]
            assert got[("ratelimit_limit", series(rule="hold", limit="slots"))] == [64.0]
            assert got[("ratelimit_limit", series(rule="work", limit="per-key"))] == [3.0]
            assert not any(("pid", p) in labels for (_, labels) in got for p in fleet.pids)
    finally:
        for sock, _ in held:
            sock.close()
    eventually(lambda: in_flight(scrape(fleet.metrics_url)) == [0.0])


@pytest.mark.slow
@needs_promtool
def test_gunicorn_exposition_passes_promtool(fleet: Fleet) -> None:
    """The merged exposition under gunicorn passes `promtool check metrics`."""
    promtool_check(get(fleet.metrics_url))


@pytest.mark.slow
def test_a_killed_worker_leaves_no_slots_in_flight(fleet: Fleet) -> None:
    """kill -9 of a worker holding a slot: gunicorn replaces it, child_exit drops its gauges."""
    before = workers(fleet)
    allowed_holds = scrape(fleet.metrics_url)[
        ("ratelimit_decisions_total", series(rule="hold", limit="", outcome="allowed"))
    ][0]
    sock, pid = hold_slot(fleet)
    try:
        live_file = fleet.multiproc_dir / f"gauge_livesum_{pid}.db"
        assert live_file.exists()
        assert in_flight(scrape(fleet.metrics_url)) == [1.0]
        os.kill(int(pid), signal.SIGKILL)
        eventually(lambda: len(workers(fleet) - {int(pid)}) == 2)
    finally:
        sock.close()
    assert not live_file.exists(), "child_exit did not mark the worker dead"
    (new,) = workers(fleet) - before
    assert len(workers(fleet)) == 2
    # The replacement publishes its gauges once its app is built; then it serves too.
    eventually(lambda: (fleet.multiproc_dir / f"gauge_livemostrecent_{new}.db").exists())
    for _ in range(6):
        got = scrape(fleet.metrics_url)
        assert in_flight(got) == [0.0]
        assert got[("ratelimit_limit", series(rule="hold", limit="slots"))] == [64.0]
        # Counters keep the dead worker's share: the held request was admitted.
        decisions = got[
            ("ratelimit_decisions_total", series(rule="hold", limit="", outcome="allowed"))
        ]
        assert decisions == [allowed_holds + 1]
