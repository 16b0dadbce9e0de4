"""`python -m examples.surge`: the image API through a 10x surge, without and with protection.

Starts the demo API (examples/imagegen) under uvicorn, plays the same
open-loop trace against it twice — unprotected, then behind the rate limiter
configured by examples/imagegen/ratelimit.toml — and prints what the clients
saw side by side, writes a chart, and says where protection made the
difference. Runs on the in-process backend by default; `--redis URL
--workers N` runs the protected service as N uvicorn workers sharing limits in
Redis. The default run takes under two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from examples.imagegen.app import FLEET_GPUS, SECONDS_PER_STEP

from .chart import write_chart
from .client import RetryPolicy
from .report import summarise, table, verdict
from .runner import ROOT, Run, Server, play, raise_fd_limit
from .trace import Scenario, make_trace

DEFAULT_OUT = ROOT / "examples" / "out"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.surge",
        description="Play a 10x traffic surge against the demo image API, "
        "unprotected and protected, and compare what the clients saw.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=32.0,
        help="seconds of trace per run (default 32: 35%% normal, 30%% spike, 35%% recovery)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=6.0,
        help="requests per second outside the spike (default 6; the fleet serves about 16)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the trace (default 7)")
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=6.0,
        help="seconds a client waits for one attempt (default 6, twelve generations' worth)",
    )
    parser.add_argument(
        "--max-retries", type=int, default=2, help="retries per request (default 2)"
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="keep the limiter's state in this Redis (e.g. redis://127.0.0.1:6379/0)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help=f"uvicorn workers (needs --redis when more than 1; they split {FLEET_GPUS} GPUs)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="where the chart goes (default examples/out)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines while running")
    args = parser.parse_args(argv)
    if args.workers < 1 or FLEET_GPUS % args.workers:
        parser.error(f"--workers must divide the fleet's {FLEET_GPUS} GPUs (1, 2, 4 or 8)")
    if args.workers > 1 and not args.redis:
        parser.error(
            "--workers above 1 needs --redis URL: the in-memory backend keeps limits per "
            "process, so each worker would admit the whole fleet's share"
        )
    if args.duration <= 0 or args.rate <= 0 or args.client_timeout <= 0 or args.max_retries < 0:
        parser.error("--duration, --rate and --client-timeout must be > 0, --max-retries >= 0")
    return args


def _check_redis(url: str) -> str | None:
    """None if Redis answers PING at `url`, else what went wrong."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


async def run_demo(args: argparse.Namespace) -> int:
    """Both runs, the table, the verdict and the chart."""
    say = (lambda _text: None) if args.quiet else print
    scenario = Scenario(duration=args.duration, normal_rate=args.rate)
    policy = RetryPolicy(timeout=args.client_timeout, max_retries=args.max_retries)
    trace = make_trace(scenario, args.seed)
    mean_work = sum(s * SECONDS_PER_STEP for s in scenario.steps) / len(scenario.steps)
    backend = f"Redis at {args.redis}" if args.redis else "in-memory"
    workers = f"{args.workers} uvicorn workers" if args.workers > 1 else "1 uvicorn worker"
    print(
        f"Surge demo: {FLEET_GPUS} simulated GPUs, about {mean_work:.1f} GPU-s per image "
        f"(capacity ~{FLEET_GPUS / mean_work:.0f} images/s), {workers}, {backend} backend.\n"
        f"Trace: {len(trace)} requests over {scenario.duration:g} s, open loop: "
        f"{scenario.normal_rate:g}/s, then {scenario.normal_rate * scenario.spike_factor:g}/s "
        f"from {scenario.spike_start:.1f} to {scenario.spike_end:.1f} s (paid traffic "
        f"x{scenario.paid_spike_factor:g}, free x{scenario.free_factor():.0f}), then "
        f"{scenario.normal_rate:g}/s;\n{scenario.paid_keys} paid API keys ("
        f"{scenario.paid_share:.0%} of normal traffic) and {scenario.free_keys} free ones. "
        f"Clients: {policy.timeout:g} s timeout, {policy.max_retries} "
        f"{'retry' if policy.max_retries == 1 else 'retries'}, "
        "Retry-After honoured (like common SDKs)."
    )
    if args.redis:
        problem = _check_redis(args.redis)
        if problem:
            print(f"error: Redis at {args.redis} does not answer ({problem})", file=sys.stderr)
            return 2
    raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    for label, protect in (("unprotected", False), ("protected", True)):
        say(f"\n{label}: playing the trace ...")
        server = Server(
            protect=protect,
            gpus=FLEET_GPUS,
            workers=args.workers,
            redis_url=args.redis if protect else None,
            # A fresh keyspace per run: nothing left over from an earlier run counts.
            redis_prefix=f"surge-{os.getpid()}-{int(time.time())}",
            log=args.out / f"server-{label}.log",
        )
        async with server:
            run = await play(
                label, server.url, trace, policy, seed=args.seed,
                progress_every=0.0 if args.quiet else 6.0, say=say,
            )  # fmt: skip
        say(f"{label}: done in {run.elapsed:.0f} s")
        runs.append(run)
    summaries = [summarise(run, scenario) for run in runs]
    print()
    print(table(summaries, scenario, policy.timeout))
    print()
    for line in verdict(summaries[0], summaries[1], scenario):
        print(line)
    for s in summaries:
        if s.loop_lag_p99 is not None and s.loop_lag_p99 > 0.1:
            print(
                f"note: the load generator was short of CPU in the {s.label} run (its event "
                f"loop woke up to {s.loop_lag_p99:.2f} s late, p99); latencies include that."
            )
    title = (
        f"Image API, {FLEET_GPUS} simulated GPUs, {backend} backend: a "
        f"{scenario.spike_factor:g}x surge without and with ratelimit"
    )
    path = write_chart(
        runs,
        scenario,
        timeout=policy.timeout,
        capacity=FLEET_GPUS / mean_work,
        path=args.out / "surge.png",
        title=title,
    )
    print(f"\nchart: {_shown(path)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the demo, return the exit status."""
    args = parse_args(argv)
    try:
        return asyncio.run(run_demo(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
