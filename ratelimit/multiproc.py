"""The multi-process metrics directory (`PROMETHEUS_MULTIPROC_DIR`) over a server's life.

prometheus_client's multi-process mode asks two things of whoever runs the
workers: empty the directory before the first worker starts (else the last
run's counters are summed into this run's), and mark each worker that ends
dead (`multiprocess.mark_process_dead`, which deletes its live-gauge files, so
`ratelimit_in_flight` stops counting the slots it held). `ratelimit.gunicorn`
does both from gunicorn's hooks, `ratelimit.uvicorn` around uvicorn's
supervisor; both use this module. It imports neither server.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client import multiprocess

__all__ = ["clear_multiproc_dir", "mark_dead_processes", "multiproc_dir", "watch_dead_processes"]

logger = logging.getLogger("ratelimit")

#: File name prefixes of prometheus_client's multi-process files (`counter_<pid>.db`,
#: `gauge_livesum_<pid>.db`, ...): the only files `clear_multiproc_dir` deletes.
_METRIC_FILE_PREFIXES = ("counter_", "gauge_", "histogram_", "summary_")

#: A live-gauge file and its writer's pid: what `mark_process_dead` deletes.
_LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def multiproc_dir() -> str | None:
    """`PROMETHEUS_MULTIPROC_DIR`, None if unset or empty (as `metrics_app` reads it)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def clear_multiproc_dir(path: str | os.PathLike[str]) -> int:
    """Delete prometheus_client's metric files in `path` (creating it if missing).

    Only files named like the client's (`counter_*.db`, `gauge_*.db`,
    `histogram_*.db`, `summary_*.db`) go; anything else in the directory is
    left alone. Returns how many were deleted.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    deleted = 0
    for f in directory.glob("*.db"):
        if f.name.startswith(_METRIC_FILE_PREFIXES) and f.is_file():
            f.unlink(missing_ok=True)
            deleted += 1
    return deleted


def mark_dead_processes(path: str | os.PathLike[str]) -> list[int]:
    """Mark dead every process that left live-gauge files in `path` and is gone; its pids.

    A process is gone when no process has its pid, or only a zombie (ended,
    not yet reaped by its parent). Counters and histograms stay: they are totals.
    """
    pids = set()
    for f in Path(path).glob("gauge_live*.db"):
        match = _LIVE_FILE.match(f.name)
        if match:
            pids.add(int(match.group(1)))
    dead = sorted(pid for pid in pids if not _alive(pid))
    for pid in dead:
        # prometheus_client leaves this function unannotated.
        multiprocess.mark_process_dead(pid, os.fspath(path))  # type: ignore[no-untyped-call]
    return dead


def watch_dead_processes(path: str | os.PathLike[str], interval: float = 1.0) -> Callable[[], None]:
    """Run `mark_dead_processes(path)` every `interval` seconds in a daemon thread.

    For a supervisor that restarts its workers without telling anyone (uvicorn's):
    a worker's slots leave `ratelimit_in_flight` about `interval` after it dies.
    Returns a function that stops the thread.
    """
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.wait(interval):
            try:
                for pid in mark_dead_processes(path):
                    logger.info("ratelimit: worker %d ended; its live gauges are dropped", pid)
            except OSError as exc:  # never let bookkeeping end the watch
                logger.warning("ratelimit: could not mark dead workers in %s: %s", path, exc)

    threading.Thread(target=watch, name="ratelimit-dead-workers", daemon=True).start()
    return stopped.set


def _alive(pid: int) -> bool:
    """Whether a process with `pid` runs (a zombie does not; pid reuse reads as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS): kill(pid, 0) answered
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
