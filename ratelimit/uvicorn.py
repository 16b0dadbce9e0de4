"""uvicorn with ratelimit's multi-process metrics kept right: `python -m ratelimit.uvicorn`.

It takes uvicorn's own command line; set `PROMETHEUS_MULTIPROC_DIR` in its
environment (by the shell or the service manager, so the supervisor and every
worker agree on it):

    PROMETHEUS_MULTIPROC_DIR=/run/myapp/metrics \\
        python -m ratelimit.uvicorn myapp:app --workers 4 --host 0.0.0.0

Before uvicorn starts, the directory is emptied of the previous run's files
(created if missing): plain `uvicorn --workers` leaves them, so a restart adds
the last run's counters into this one's (10 requests, restart, 10 more: 20
on the first scrape). While it runs, a thread of the supervisor marks workers
that ended (a crash, `kill -9`, a worker uvicorn restarted) dead within a
second, so the slots they held leave `ratelimit_in_flight`. In code,
`run(app, **options)` does the same around `uvicorn.run`.

The clearing happens here, in the one process that starts the workers, and
never in a worker's lifespan: a worker cannot tell whether it is the first,
and clearing after a sibling started would lose that sibling's counts.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from uvicorn.main import main as uvicorn_main
from uvicorn.main import run as uvicorn_run

from .multiproc import clear_multiproc_dir, multiproc_dir, watch_dead_processes

__all__ = ["main", "run"]

logger = logging.getLogger("ratelimit")


@contextmanager
def metrics_directory_kept(workers: bool) -> Iterator[None]:
    """Empty `PROMETHEUS_MULTIPROC_DIR` now and mark dead workers until the block ends.

    Without the variable each worker keeps metrics of its own and a scrape shows
    only the answering worker's share: with `workers` that is logged, not
    refused (metrics may be unused).
    """
    path = multiproc_dir()
    if path is None:
        if workers:
            logger.warning(
                "ratelimit: PROMETHEUS_MULTIPROC_DIR is not set, so each worker keeps its "
                "own metrics and /metrics shows only the answering worker's share"
            )
        yield
        return
    deleted = clear_multiproc_dir(path)
    logger.info("ratelimit: cleared %d metric files from %s", deleted, path)
    stop = watch_dead_processes(path)
    try:
        yield
    finally:
        stop()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m ratelimit.uvicorn ARGS`: `uvicorn ARGS` with the metrics directory kept."""
    args = sys.argv[1:] if argv is None else list(argv)
    workers = os.environ.get("WEB_CONCURRENCY", "1") != "1" or any(
        a.startswith("--workers") for a in args
    )
    with metrics_directory_kept(workers):
        uvicorn_main.main(args=args, prog_name="python -m ratelimit.uvicorn")


def run(app: Any, **options: Any) -> None:
    """`uvicorn.run(app, **options)` with the metrics directory kept (see the module)."""
    with metrics_directory_kept(options.get("workers") not in (None, 1)):
        uvicorn_run(app, **options)


if __name__ == "__main__":
    main()
