"""CPU per request of benchmark apps called in-process: no server, no sockets, no load generator.

Run by `http_overhead` in a benchmark venv, with benchmarks/apps as the working
directory (put first on `sys.path` in place of this file's folder):

    python _inprocess_worker.py REQUESTS ROUNDS MODULE [MODULE ...]

Each module's `app` gets the scope uvicorn builds for wrk's request (GET of the
benchmarked path from 127.0.0.1, a `host` header), a `receive` with an empty
body and a `send` that drops what it gets; `REQUESTS` calls in a row are timed
with the process's CPU clock, rounds interleaved across modules, and the
fastest round kept (the least disturbed). Prints one JSON object: module ->
microseconds per request. A limited app must first refuse the second call to
the 1/minute probe path with 429, as under uvicorn.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
from typing import Any

PATH = "/hello"
PROBE = "/probe"


def _scope(path: str) -> dict[str, Any]:
    """What uvicorn (httptools) passes an app for `GET path` from wrk."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 40000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000")],
        "state": {},
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _call(app: Any, path: str) -> int:
    """One request; the response status."""
    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = _scope(path)
    await app(scope, _receive, send)
    return status


async def _time(app: Any, requests: int) -> float:
    """Microseconds of CPU per request over `requests` calls in a row."""

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = _scope(PATH)
    started = time.process_time()
    for _ in range(requests):
        # A fresh scope per request, as a server builds one (apps may write to it).
        await app({**scope, "state": {}}, _receive, send)
    return (time.process_time() - started) / requests * 1e6


async def main(requests: int, rounds: int, modules: list[str]) -> dict[str, float]:
    apps = {m: importlib.import_module(m).app for m in modules}
    for name, app in apps.items():
        if await _call(app, PATH) != 200:
            raise SystemExit(f"{name}: {PATH} did not answer 200")
        want = (200, 200) if name == "bare" else (200, 429)
        got = (await _call(app, PROBE), await _call(app, PROBE))
        if got != want:
            raise SystemExit(f"{name}: {PROBE} answered {got}, want {want}")
        await _time(app, requests // 10)  # warm-up
    best = {m: float("inf") for m in modules}
    for rnd in range(rounds):
        shift = rnd % len(modules)
        for m in [*modules[shift:], *modules[:shift]]:
            best[m] = min(best[m], await _time(apps[m], requests))
    return best


if __name__ == "__main__":
    sys.path[0] = os.getcwd()
    n, r, *names = sys.argv[1:]
    print(json.dumps(asyncio.run(main(int(n), int(r), names))))
