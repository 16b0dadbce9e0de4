"""Telling whether this process is one of several workers of one server (Linux).

`MemoryBackend` keeps limits in the process: under `uvicorn --workers N` or
gunicorn with N workers, each worker has its own, and "8 GPU slots" becomes
8 per worker. A worker cannot ask its server how many workers it runs, so
this reads `/proc` for its siblings, once, at start-up:

- uvicorn starts workers with multiprocessing's spawn: a worker has a
  `multiprocessing.parent_process()`, and its siblings are the other spawn
  children of the same parent (the resource tracker, also a child, is not
  one; under `--reload` the single spawned server has none);
- gunicorn forks its workers from the master without exec: with `gunicorn`
  imported, siblings are the master's other children with our command line
  (`setproctitle` renames workers alike).

Anything else (another process manager, no `/proc`) is not recognised.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys

_SPAWNED = b"from multiprocessing.spawn import spawn_main"


logger = logging.getLogger("ratelimit")


def _cmdline(pid: int | str) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _parent_of(pid: str) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def other_workers() -> int | None:
    """How many sibling workers of this server run beside this process: 0 when this
    is not a worker process, None when it cannot tell (no `/proc`)."""
    if multiprocessing.parent_process() is None and "gunicorn" not in sys.modules:
        return 0
    me, parent = os.getpid(), os.getppid()
    try:
        mine = _cmdline(me)
        entries = os.listdir("/proc")
    except OSError:
        return None
    spawned = _SPAWNED in mine
    count = 0
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if _parent_of(entry) != parent:
                continue
            theirs = _cmdline(entry)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if theirs == mine or (spawned and _SPAWNED in theirs):
            count += 1
    return count


#: Seconds after start-up to look for sibling workers (see `warn_if_workers`).
WORKERS_CHECK_DELAY = 1.0


def warn_if_workers() -> None:
    """Warn once if this process is one of several workers on a MemoryBackend."""
    try:
        others = other_workers()
    except Exception:  # a look at /proc must never stop the app
        return
    if others:
        logger.warning(
            "ratelimit: MemoryBackend in one of %d worker processes: each worker keeps its "
            "own limits, so each limit is allowed %d times over. Use RedisBackend(url) to "
            "share them across workers (or divide every limit by the number of workers)",
            others + 1,
            others + 1,
        )
