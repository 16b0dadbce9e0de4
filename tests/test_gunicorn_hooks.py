"""The gunicorn hooks of `ratelimit.gunicorn`, called as gunicorn's master calls them.

The real gunicorn fleet is in test_metrics_gunicorn.py; these pin the file
handling without starting one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ratelimit.gunicorn import child_exit, on_starting
from ratelimit.multiproc import clear_multiproc_dir


@dataclass
class Log:
    lines: list[str] = field(default_factory=list)

    def info(self, msg: str, *args: object) -> None:
        self.lines.append(msg % args)

    def warning(self, msg: str, *args: object) -> None:
        self.lines.append("WARNING " + msg % args)


@dataclass
class Server:
    log: Log = field(default_factory=Log)


@dataclass
class Worker:
    pid: int


FILES = (
    "counter_11.db",
    "histogram_11.db",
    "gauge_livesum_11.db",
    "gauge_livemostrecent_11.db",
    "gauge_livesum_12.db",
    "summary_12.db",
    "notes.txt",
    "other.db",
)


@pytest.fixture
def multiproc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "metrics"
    directory.mkdir()
    for name in FILES:
        (directory / name).write_bytes(b"x")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    return directory


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_on_starting_deletes_only_prometheus_files(multiproc: Path) -> None:
    """A previous run's metric files go; files the client did not write stay."""
    server = Server()
    on_starting(server)
    assert names(multiproc) == {"notes.txt", "other.db"}
    assert server.log.lines == [f"ratelimit: cleared 6 metric files from {multiproc}"]


def test_clear_multiproc_dir_creates_a_missing_directory(tmp_path: Path) -> None:
    """A directory that does not exist yet is created (metrics_app needs it to exist)."""
    assert clear_multiproc_dir(tmp_path / "a" / "b") == 0
    assert (tmp_path / "a" / "b").is_dir()


def test_on_starting_warns_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR each worker counts alone: say so, do not fail."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    server = Server()
    on_starting(server)
    assert len(server.log.lines) == 1
    assert server.log.lines[0].startswith("WARNING ratelimit: PROMETHEUS_MULTIPROC_DIR")


def test_child_exit_drops_the_live_gauges_of_that_worker_only(multiproc: Path) -> None:
    """The dead worker's live gauge files go; its counters, and other workers' files, stay."""
    child_exit(Server(), Worker(pid=11))
    assert names(multiproc) == set(FILES) - {"gauge_livesum_11.db", "gauge_livemostrecent_11.db"}


def test_child_exit_is_a_no_op_without_the_variable(
    multiproc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in multi-process mode: nothing to mark, nothing touched."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    child_exit(Server(), Worker(pid=11))
    assert names(multiproc) == set(FILES)
