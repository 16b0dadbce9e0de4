"""What `Metrics` costs per decision: the same ASGI app with and without metrics, in-process.

Requests are driven straight through the ASGI callable (hand-built scope,
receive and send; no server, no HTTP parsing), so the difference between the
variants is the metrics code alone. Variants run interleaved round by round
and the median round is reported, since the 2-core machine is shared. The
multi-process variant runs in a child process with `PROMETHEUS_MULTIPROC_DIR`
set before prometheus_client is imported (values then live in mmap files).
The table goes to this script's section of RESULTS.md.

    .venv/bin/python -m benchmarks.metrics_overhead            # ~1 minute
    .venv/bin/python -m benchmarks.metrics_overhead --quick    # ~15 seconds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import _support

SECTION = "metrics_overhead"

REPO = Path(__file__).resolve().parent.parent

#: name -> (path, description); rules are built in `_app` (imports wait for the child's env).
SCENARIOS = {
    "bucket": "TokenBucket per API key, every request admitted",
    "bucket+slot": "TokenBucket + global Concurrency slot (in-flight gauge, release hook)",
    "refused": "TokenBucket spent: every request refused with 429",
}


@dataclass(frozen=True)
class Row:
    """One scenario: median microseconds per request without and with metrics."""

    scenario: str
    mode: str  # "single-process" or "multiprocess"
    without_us: float
    with_us: float

    @property
    def overhead_us(self) -> float:
        return self.with_us - self.without_us

    @property
    def overhead_pct(self) -> float:
        return 100.0 * self.overhead_us / self.without_us


def _app(scenario: str, with_metrics: bool) -> Any:
    from prometheus_client import CollectorRegistry

    from ratelimit import Concurrency, Metrics, RateLimitMiddleware, Rule, TokenBucket, keys

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    per_key = keys.header("x-api-key")
    limits: list[Any]
    if scenario == "bucket":
        limits = [TokenBucket("1000000/second", burst=1_000_000, key=per_key)]
    elif scenario == "bucket+slot":
        limits = [
            TokenBucket("1000000/second", burst=1_000_000, key=per_key),
            Concurrency(64, key=keys.GLOBAL),
        ]
    else:
        limits = [TokenBucket("1/hour", burst=1, key=per_key)]
    metrics = Metrics(CollectorRegistry()) if with_metrics else None
    return RateLimitMiddleware(inner, rules=[Rule("/gen", limits=limits)], metrics=metrics)


_SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/gen",
    "raw_path": b"/gen",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"x-api-key", b"bench-caller")],
    "client": ("127.0.0.1", 5000),
    "server": ("127.0.0.1", 80),
}


async def _drive(app: Any, n: int) -> float:
    """Seconds to push `n` requests through `app`, one after another."""
    message = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def send(_: Any) -> None:
        return None

    await app(dict(_SCOPE), receive, send)  # warm: first request creates state
    gc.collect()
    started = time.perf_counter()
    for _ in range(n):
        await app(dict(_SCOPE), receive, send)
    return time.perf_counter() - started


async def _measure(n: int, rounds: int) -> dict[tuple[str, bool], list[float]]:
    times: dict[tuple[str, bool], list[float]] = {}
    apps = {(s, m): _app(s, m) for s in SCENARIOS for m in (False, True)}
    for _ in range(rounds):
        for key, app in apps.items():
            seconds = await _drive(app, n)
            times.setdefault(key, []).append(seconds / n * 1e6)
    for app in apps.values():
        await app.aclose()
    return times


def measure(n: int, rounds: int) -> dict[str, dict[str, float]]:
    """scenario -> {"without": µs, "with": µs}: medians over interleaved rounds."""
    times = asyncio.run(_measure(n, rounds))
    return {
        s: {
            "without": statistics.median(times[(s, False)]),
            "with": statistics.median(times[(s, True)]),
        }
        for s in SCENARIOS
    }


def run(n: int = 20_000, rounds: int = 7) -> list[Row]:
    """Measure in this process (single-process registry) and in a multi-process child."""
    rows = [
        Row(s, "single-process", v["without"], v["with"]) for s, v in measure(n, rounds).items()
    ]
    with tempfile.TemporaryDirectory(prefix="ratelimit-mp-") as mp:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": mp}
        child = [sys.executable, "-m", "benchmarks.metrics_overhead", "--child"]
        child += ["-n", str(n), "--rounds", str(rounds)]
        out = subprocess.run(child, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    for s, v in json.loads(out.stdout).items():
        rows.append(Row(s, "multiprocess", v["without"], v["with"]))
    return rows


def render(rows: list[Row], n: int, rounds: int) -> str:
    """The Markdown section for RESULTS.md."""
    lines = [
        "## Metrics overhead per decision (in-process)",
        "",
        f"`python -m benchmarks.metrics_overhead`: {n:,} requests per round straight",
        "through the ASGI callable (no server), memory backend, median of "
        f"{rounds} interleaved rounds.",
        "The multiprocess rows run with `PROMETHEUS_MULTIPROC_DIR` set (mmap-backed values).",
        "Percentages are of the middleware's own in-process cost, which is small: behind an",
        "HTTP server a request costs far more (see the http_overhead section), so the same",
        "microseconds are a much smaller share there.",
        "",
        "| scenario | mode | without metrics (µs/req) | with metrics (µs/req) "
        "| overhead (µs) | overhead |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.mode} | {r.without_us:.1f} | {r.with_us:.1f} "
            f"| {r.overhead_us:+.1f} | {r.overhead_pct:+.0f}% |"
        )
    lines += ["", "Scenarios:", ""]
    lines += [f"- `{name}`: {text}" for name, text in SCENARIOS.items()]
    lines += [
        "",
        f"- Machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, print_: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="5,000 requests, 3 rounds")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n, rounds = (5_000, 3) if args.quick else (args.n, args.rounds)
    if args.child:
        print_(json.dumps(measure(n, rounds)))
        return
    body = render(run(n, rounds), n, rounds)
    print_(body)
    if not args.no_write:
        _support.write_section(SECTION, body)


if __name__ == "__main__":
    main()
