"""gunicorn server hooks that keep ratelimit's multi-process metrics right.

Import them into the gunicorn config file, where gunicorn takes module-level
names as its settings (examples/gunicorn.conf.py):

    from ratelimit.gunicorn import child_exit, on_starting

and start gunicorn with `PROMETHEUS_MULTIPROC_DIR` set in its environment
(by the shell or the service manager, before Python starts, so the master and
every worker agree on it) and uvicorn's worker class:

    PROMETHEUS_MULTIPROC_DIR=/run/myapp/metrics \\
        gunicorn -c gunicorn.conf.py -k uvicorn_worker.UvicornWorker -w 4 'myapp:create_app()'

`on_starting` runs once in the master before the first worker forks: it
empties the directory of the previous run's files, which prometheus_client
requires (else the last run's counters are summed into this run's, and the
dead pids' live gauges counted as if alive), and creates it if missing.

`child_exit` runs in the master after any worker ends: a crash, `kill -9`, a
timeout, `max_requests` recycling, or a reload. It calls
`prometheus_client.multiprocess.mark_process_dead`, which deletes that
worker's files of the live gauge modes, so `ratelimit_in_flight` stops
counting the slots the dead worker held (the store gets them back when their
leases expire) and the limit gauges show only living workers' values.
Counters and histograms keep the dead worker's share: they are totals.

This module imports neither gunicorn nor uvicorn: the hooks only read
`worker.pid` and `server.log`. For uvicorn's own `--workers`, see `ratelimit.uvicorn`.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import multiprocess

from .multiproc import clear_multiproc_dir, multiproc_dir

__all__ = ["child_exit", "on_starting"]


class _Log(Protocol):
    def info(self, msg: str, *args: object) -> None: ...
    def warning(self, msg: str, *args: object) -> None: ...


class _Arbiter(Protocol):
    """What the hooks use of gunicorn's master (`gunicorn.arbiter.Arbiter`)."""

    log: _Log


class _Worker(Protocol):
    """What the hooks use of a gunicorn worker (`gunicorn.workers.base.Worker`)."""

    pid: int


def on_starting(server: _Arbiter) -> None:
    """gunicorn hook (master, once, before forking): start from an empty metrics directory.

    Without `PROMETHEUS_MULTIPROC_DIR` every worker keeps metrics of its own
    and a scrape shows only the share of the worker that answered it: that is
    logged as a warning rather than refused, since metrics may be unused.
    """
    path = multiproc_dir()
    if path is None:
        server.log.warning(
            "ratelimit: PROMETHEUS_MULTIPROC_DIR is not set, so each gunicorn worker "
            "keeps its own metrics and /metrics shows only the answering worker's share"
        )
        return
    deleted = clear_multiproc_dir(path)
    server.log.info("ratelimit: cleared %d metric files from %s", deleted, path)


def child_exit(server: _Arbiter, worker: _Worker) -> None:
    """gunicorn hook (master, after a worker ended): stop counting its live gauges."""
    if multiproc_dir() is None:
        return
    try:
        # prometheus_client leaves this function unannotated.
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
    except OSError as exc:  # never let bookkeeping take the master down
        server.log.warning("ratelimit: could not mark worker %s dead: %s", worker.pid, exc)
