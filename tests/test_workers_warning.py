"""MemoryBackend under a multi-worker server: one WARNING per worker, seen in real servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

APP = textwrap.dedent(
    """
    from starlette.applications import Starlette
    from ratelimit import RateLimitMiddleware, Rule, TokenBucket

    app = Starlette()
    app.add_middleware(
        RateLimitMiddleware, rules=[Rule("/x", limits=[TokenBucket("5/minute")])]
    )
    """
)

WARNING = "MemoryBackend in one of 2 worker processes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _address(bind: str) -> list[str]:
    port = _free_port()
    return [bind, f"127.0.0.1:{port}"] if bind == "--bind" else [bind, str(port)]


def _run(
    tmp_path: Path,
    *args: str,
    until: Callable[[str], bool],
    seconds: float,
    command: tuple[str, ...] | list[str] = ("uvicorn", "limited:app"),
    bind: str = "--port",
) -> str:
    """Start the server on `tmp_path`/limited.py; stop it once its log satisfies `until` (or
    `seconds` pass) and return the log."""
    (tmp_path / "limited.py").write_text(APP)
    log = tmp_path / "uvicorn.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *command, *args, *_address(bind)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not until(log.read_text()):
                time.sleep(0.1)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return log.read_text()


@pytest.mark.slow
def test_memory_backend_under_uvicorn_workers_2_logs_one_warning_per_worker(
    tmp_path: Path,
) -> None:
    """Each of the 2 workers warns once, naming RedisBackend as the remedy."""
    text = _run(tmp_path, "--workers", "2", until=lambda t: t.count(WARNING) >= 2, seconds=30)
    assert text.count(WARNING) == 2, text
    assert "RedisBackend(url)" in text


@pytest.mark.slow
def test_memory_backend_under_a_single_uvicorn_server_does_not_warn(tmp_path: Path) -> None:
    """One server process: no warning (the check runs a second after start-up)."""
    text = _run(tmp_path, until=lambda t: False, seconds=4)
    assert "Application startup complete" in text
    assert "worker processes" not in text


@pytest.mark.slow
def test_memory_backend_under_uvicorn_reload_does_not_warn(tmp_path: Path) -> None:
    """--reload runs one spawned server beside multiprocessing's resource tracker: one
    worker, no warning."""
    text = _run(
        tmp_path, "--reload", "--reload-dir", str(tmp_path), until=lambda t: False, seconds=5
    )
    assert "Application startup complete" in text
    assert "worker processes" not in text


@pytest.mark.slow
def test_memory_backend_under_gunicorn_workers_2_logs_one_warning_per_worker(
    tmp_path: Path,
) -> None:
    """gunicorn forks its workers: each of 2 finds the other and warns once."""
    text = _run(
        tmp_path,
        until=lambda t: t.count(WARNING) >= 2,
        seconds=30,
        command=["gunicorn", "-w", "2", "-k", "uvicorn_worker.UvicornWorker", "limited:app"],
        bind="--bind",
    )
    assert text.count(WARNING) == 2, text
