"""What a flood of distinct keys (an attacker rotating IPs) costs per decision, in-process.

Requests go straight through the ASGI callable (hand-built scope, receive and
send; no server) of `RateLimitMiddleware` with the default `MemoryBackend()`
(max_keys 100,000) and one `TokenBucket("5/minute", burst=10**6,
key=keys.client_ip())`: every request is admitted, and a bucket stays non-full
for 12 s after a hit, so the store fills with live buckets and, past max_keys,
evicts one per new key.

- steady: 8 callers, one after another, for the same number of requests;
- flood N: N requests, each from an IP never seen before, on a fresh
  middleware. Its requests are split into those made while the store is
  filling (fewer keys than max_keys) and those made while eviction runs
  (the store is full: each new key evicts the oldest).

A flood is cut short after `--budget` seconds (the code before issue 13
spent up to ~1 ms per decision there); the row then says how far it got.
Steady rounds are interleaved with the floods and the median is reported;
floods up to 10^5 keys run three times and the median one is reported.

    python -m benchmarks.key_flood            # ~1 minute
    python -m benchmarks.key_flood --quick    # ~15 seconds, floods up to 10^5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import _support

SECTION = "key_flood"
#: Requests per timed slice: the worst slice of a flood is reported too.
SLICE = 10_000
HOT_CALLERS = 8


@dataclass(frozen=True)
class Row:
    """One scenario: µs per request, while filling and while evicting."""

    scenario: str
    requests: int
    filling_us: float | None
    evicting_us: float | None
    worst_slice_us: float
    cut_short: bool = False


def _ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def _app() -> Any:
    from ratelimit import MemoryBackend, RateLimitMiddleware, Rule, TokenBucket, keys

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    # A burst no caller spends here: every request is admitted, and a bucket hit once
    # stays non-full for 12 s, so the store fills with live buckets.
    limit = TokenBucket("5/minute", burst=10**6, key=keys.client_ip())
    return RateLimitMiddleware(inner, rules=[Rule("/gen", limits=[limit])], backend=MemoryBackend())


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
    "headers": [],
    "server": ("127.0.0.1", 80),
}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(_: Any) -> None:
    return None


async def _slice(app: Any, first: int, n: int, modulo: int | None) -> float:
    """Seconds for requests `first`..`first + n` (client IP i, or i % modulo)."""
    started = time.perf_counter()
    for i in range(first, first + n):
        scope = dict(_SCOPE)
        scope["client"] = (_ip(i if modulo is None else i % modulo), 5000)
        await app(scope, _receive, _send)
    return time.perf_counter() - started


async def _steady(n: int) -> float:
    """µs per request for `n` requests of a few hot callers."""
    app = _app()
    await _slice(app, 0, HOT_CALLERS, HOT_CALLERS)  # warm: the callers' state exists
    gc.collect()
    seconds = await _slice(app, 0, n, HOT_CALLERS)
    await app.aclose()
    return seconds / n * 1e6


async def _flood(n: int, budget: float) -> Row:
    app = _app()
    await app.start()
    backend = app.engine.backend
    max_keys = backend.max_keys
    gc.collect()
    filling: list[float] = []  # (seconds per slice) while the store is below max_keys
    evicting: list[float] = []
    worst = 0.0
    done = 0
    started = time.monotonic()
    while done < n:
        size = min(SLICE, n - done)
        full = len(backend) >= max_keys
        seconds = await _slice(app, done, size, None)
        (evicting if full else filling).append(seconds / size * 1e6)
        worst = max(worst, seconds / size * 1e6)
        done += size
        if time.monotonic() - started > budget:
            break
    await app.aclose()
    return Row(
        f"flood {n:,} keys",
        done,
        statistics.mean(filling) if filling else None,
        statistics.mean(evicting) if evicting else None,
        worst,
        cut_short=done < n,
    )


async def _measure(floods: Sequence[int], budget: float) -> tuple[float, list[Row]]:
    await _flood(1_000, budget)  # warm: imports, first-use caches
    steady: list[float] = []
    rows = []
    for size in floods:
        # Small floods are short: three of them, and the median one is reported.
        tries = []
        for _ in range(3 if size <= 100_000 else 1):
            steady.append(await _steady(min(size, 100_000)))
            tries.append(await _flood(size, budget))
            gc.collect()
        tries.sort(key=lambda r: r.evicting_us or r.filling_us or 0.0)
        rows.append(tries[len(tries) // 2])
    steady.append(await _steady(100_000))
    return statistics.median(steady), rows


def run(floods: Sequence[int], budget: float) -> tuple[float, list[Row]]:
    """(steady µs per request, one row per flood size)."""
    return asyncio.run(_measure(floods, budget))


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _x(value: float | None, steady: float) -> str:
    return "-" if value is None else f"{value / steady:.2f}x"


def render(steady: float, rows: list[Row], budget: float) -> str:
    """The Markdown section for RESULTS.md."""
    lines = [
        "## Key flood: cost per decision while an attacker rotates IPs (memory backend)",
        "",
        "`python -m benchmarks.key_flood`: requests straight through the ASGI callable",
        "(no server), default `MemoryBackend()` (max_keys 100,000), one",
        '`TokenBucket("5/minute", burst=10**6, key=keys.client_ip())`: every request is',
        "admitted and a bucket stays non-full for 12 s after a hit. Steady: 8 callers taking",
        "turns (the median of rounds interleaved with the floods). A flood: every request from",
        "a new IP, on a fresh middleware (floods up to 10^5 run 3 times: the median is shown);",
        f'"filling" is the mean over slices of {SLICE:,} requests made while the store held',
        'fewer than max_keys keys, "evicting" the mean over slices made while it was full',
        f"(each new key evicts the oldest). Floods stop after {budget:g} s.",
        "",
        "| scenario | requests | µs/request filling | µs/request evicting "
        "| worst slice (µs) | evicting / steady |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| steady, {HOT_CALLERS} callers | - | {steady:.1f} | - | - | 1.00x |",
    ]
    for r in rows:
        got = f"{r.requests:,}" + (" (cut short)" if r.cut_short else "")
        ratio = _x(r.evicting_us if r.evicting_us is not None else r.filling_us, steady)
        lines.append(
            f"| {r.scenario} | {got} | {_us(r.filling_us)} | {_us(r.evicting_us)} "
            f"| {r.worst_slice_us:.1f} | {ratio} |"
        )
    lines += [
        "",
        "The last column compares the evicting phase (the filling phase where the flood never",
        "filled the store) with the steady state; the target is at most 2x.",
        "",
        f"- Machine: {os.cpu_count()} cores, {_support.cpu_model()}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; "
        f"{_support.code_revision('ratelimit', 'benchmarks')}; "
        f"run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, print_: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="floods of 10^4 and 10^5 only")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per flood at most")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    floods = (10_000, 100_000) if args.quick else (10_000, 100_000, 1_000_000)
    steady, rows = run(floods, args.budget)
    body = render(steady, rows, args.budget)
    print_(body)
    if not args.no_write:
        _support.write_section(SECTION, body)


if __name__ == "__main__":
    main()
