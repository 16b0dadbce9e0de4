"""`python -m ratelimit.uvicorn`: uvicorn --workers with the metrics directory kept right.

Real uvicorn with two workers (the app of tests/_fleet.py, whose responses
name the answering worker), started twice on one `PROMETHEUS_MULTIPROC_DIR`:
the second run's scrape counts only the second run. And a worker killed while
holding a slot stops counting in `ratelimit_in_flight`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _fleet import (
    HOST,
    Fleet,
    Scrape,
    free_port,
    hold_slot,
    scrape,
    send_traffic,
    series,
    start_fleet,
    stop,
    write_app,
)

from ratelimit.multiproc import mark_dead_processes

ALLOWED = ("ratelimit_decisions_total", series(rule="work", limit="", outcome="allowed"))
LIMITED = ("ratelimit_decisions_total", series(rule="work", limit="per-key", outcome="limited"))


def start(root: Path, multiproc: Path) -> Fleet:
    port = free_port()
    argv = [
        sys.executable, "-m", "ratelimit.uvicorn", "mpapp:create_app", "--factory",
        "--workers", "2", "--app-dir", str(root),
        "--host", HOST, "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    fleet, _ = start_fleet(argv, root, multiproc, port, "uvicorn")
    return fleet


def in_flight(got: Scrape) -> list[float]:
    return got[("ratelimit_in_flight", series(rule="hold", limit="slots"))]


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true after {timeout}s: {check}")
        time.sleep(0.05)


@pytest.fixture
def app_dir(tmp_path: Path) -> tuple[Path, Path]:
    write_app(tmp_path)
    multiproc = tmp_path / "prometheus-multiproc"
    multiproc.mkdir()
    return tmp_path, multiproc


@pytest.mark.slow
def test_a_restart_counts_only_the_new_run(app_dir: tuple[Path, Path]) -> None:
    """Stopped and started again on the same directory, the scrape shows this run's counts,
    not the sum of both runs (what plain `uvicorn --workers` shows)."""
    first = start(*app_dir)
    try:
        asyncio.run(send_traffic(first))
        assert scrape(first.metrics_url)[ALLOWED] == [first.count(200)]
    finally:
        assert first.proc is not None
        stop(first.proc)
    second = start(*app_dir)
    try:
        asyncio.run(send_traffic(second))
        assert len(second.pids) == 2
        for _ in range(4):  # fresh connections: both workers serve scrapes
            got = scrape(second.metrics_url)
            assert got[ALLOWED] == [second.count(200)]
            assert got[LIMITED] == [second.count(429)]
    finally:
        assert second.proc is not None
        stop(second.proc)


@pytest.mark.slow
def test_a_killed_worker_stops_counting_its_slots(app_dir: tuple[Path, Path]) -> None:
    """kill -9 of a worker holding a slot: uvicorn replaces it and the supervisor's watch
    drops its live gauges, so in_flight reads 0 again; its counted admission stays."""
    fleet = start(*app_dir)
    try:
        sock, pid = hold_slot(fleet)
        try:
            live_file = fleet.multiproc_dir / f"gauge_livesum_{pid}.db"
            assert live_file.exists()
            assert in_flight(scrape(fleet.metrics_url)) == [1.0]
            os.kill(int(pid), signal.SIGKILL)
            eventually(lambda: not live_file.exists())
        finally:
            sock.close()
        eventually(lambda: len(list(fleet.multiproc_dir.glob("gauge_livesum_*.db"))) == 2)
        for _ in range(4):
            got = scrape(fleet.metrics_url)
            assert in_flight(got) == [0.0]
            held = ("ratelimit_decisions_total", series(rule="hold", limit="", outcome="allowed"))
            assert got[held] == [1.0]
    finally:
        assert fleet.proc is not None
        stop(fleet.proc)


def test_mark_dead_processes_drops_only_gone_writers(tmp_path: Path) -> None:
    """Live-gauge files of an ended process (reaped or a zombie) go; a live one's and every
    counter file stay."""
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    eventually(lambda: _state(zombie.pid) == "Z")
    files = [
        f"gauge_livesum_{reaped.pid}.db", f"gauge_livemostrecent_{zombie.pid}.db",
        f"gauge_livesum_{os.getpid()}.db", f"counter_{reaped.pid}.db", "gauge_livesum_x.db",
    ]  # fmt: skip
    for name in files:
        (tmp_path / name).write_bytes(b"")
    try:
        assert mark_dead_processes(tmp_path) == sorted([reaped.pid, zombie.pid])
    finally:
        zombie.wait()
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {f"gauge_livesum_{os.getpid()}.db", f"counter_{reaped.pid}.db", files[-1]}


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
