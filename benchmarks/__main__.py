"""The benchmark suite: every benchmark, this library beside its peers, in one run.

    python3 -m benchmarks            # everything, ~11 minutes on 2 cores
    python3 -m benchmarks --quick    # a rougher smoke run, under 3 minutes
    python3 -m benchmarks --only accuracy
    python3 -m benchmarks --list

Sets up its own environment: the venvs of `_support` (this library and the
peers that coexist with it in `benchmarks/.venv-bench`; asgi-ratelimit,
which installs a top-level `ratelimit`, in one of its own), redis-server and
wrk with apt-get when missing. Waits for a quiet machine, starts one
redis-server on loopback for every Redis benchmark, runs the benchmarks one
after another and rewrites `benchmarks/RESULTS.md`: a header with the
machine, the versions of every package and the load while it ran, a summary
of this library against the best peer, then each benchmark's section.
With `--only`, just those sections are replaced and the rest is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import _support, accuracy, http_overhead, redis_decisions


@dataclass
class Run:
    """What one suite run shares between benchmarks, and what they leave for the summary."""

    quick: bool
    fresh_venvs: bool
    redis: tuple[int, int] | None = None
    log: Callable[[str], None] = print
    sections: dict[str, str] = field(default_factory=dict)
    #: Per benchmark: (measurement, ours, best peer, ratio text) rows for the summary.
    summary: list[tuple[str, str, str, str]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    disturbed: dict[str, int] = field(default_factory=dict)
    redis_version: str = "?"
    wrk_version: str = "?"


@dataclass(frozen=True)
class Benchmark:
    name: str
    what: str
    full: str
    quick: str
    needs_redis: bool
    run: Callable[[Run], None]


# -- each benchmark ------------------------------------------------------------------------


def _argv(run: Run) -> str:
    return " --quick" if run.quick else ""


def run_accuracy(run: Run) -> None:
    settings = accuracy.Settings.quick() if run.quick else accuracy.Settings()
    settings = replace(settings, fresh_venvs=run.fresh_venvs)
    env = accuracy.prepare(settings, run.log)
    report = accuracy.run(settings, env, run.log, redis=run.redis)
    command = f"python3 -m benchmarks --only accuracy{_argv(run)}"
    run.sections[accuracy.SECTION] = accuracy.render(report, env, settings, command)
    run.versions.update(env.versions)
    rates = [r for r in report.rows if accuracy.BY_NAME[r.subject].kind == "rate"]
    ours = [r for r in rates if accuracy.BY_NAME[r.subject].ours]
    peers = [r for r in rates if not accuracy.BY_NAME[r.subject].ours]
    for r in ours:
        over = [p for p in peers if p.excess > 0]
        exact = [p.subject for p in peers if p.excess == 0]
        peer_text = (
            f"{len(exact)} of {len(peers)} peer algorithms never over-admit; "
            + ", ".join(f"{p.subject} {p.ratio:.2f}x allowed (+{p.excess:,.0f})" for p in over)
        ).rstrip("; ")
        run.summary.append(
            (
                f"Over-admission, {settings.processes} processes on one key "
                f"({settings.count}/s, {settings.duration:g} s): admitted / allowed",
                f"{r.ratio:.3f} (excess {r.excess:,.0f})",
                peer_text,
                "exact" if r.excess == 0 else "**over-admits**",
            )
        )
    for r in report.rows:
        if accuracy.BY_NAME[r.subject].kind == "concurrency":
            run.summary.append(
                (
                    f"Concurrency limit {r.allowed:.0f}: most in flight at once",
                    f"{r.max_in_flight}",
                    "no peer has a concurrency limit",
                    "no overshoot" if r.max_in_flight <= r.allowed else "**overshoot**",
                )
            )


def run_http(run: Run) -> None:
    settings = http_overhead.Settings.quick() if run.quick else http_overhead.Settings()
    # The suite waited for quiet at its start; per run it waits less than the script
    # alone would (a busy machine otherwise stretches the suite past 15 minutes).
    settings = replace(
        settings, fresh_venvs=run.fresh_venvs, quiet_wait=min(settings.quiet_wait, 3.0)
    )
    env = http_overhead.prepare(settings, run.log)
    rows = http_overhead.run(settings, env, run.log)
    command = f"python3 -m benchmarks --only http_overhead{_argv(run)}"
    run.sections[http_overhead.SECTION] = http_overhead.render(rows, env, settings, command)
    for v in env.versions.values():
        run.versions.update(v)
    for row in rows:
        run.versions[http_overhead.BY_NAME[row.variant].package] = row.version
    run.wrk_version = env.wrk_version
    run.disturbed["http_overhead"] = sum(r.disturbed for r in rows)
    best = http_overhead.best_peer(rows, http_overhead.PEERS)
    by = {r.variant: r for r in rows}
    for name, label in (
        ("ratelimit", "bucket + concurrency slot, header fields"),
        ("ratelimit-bucket", "bucket, header fields (the default)"),
        ("ratelimit-no-headers", "bucket, no header fields (like the peers)"),
    ):
        r = by.get(name)
        if r is not None and best is not None:
            run.summary.append(
                (
                    f"HTTP req/s, memory backend: {label}",
                    f"{r.rps:,.0f} ({_x(r.ratio)} bare)",
                    f"{best.variant} {best.rps:,.0f} ({_x(best.ratio)} bare)",
                    f"{r.rps / best.rps:.2f}",
                )
            )
    again, noop = by.get("bare-again"), by.get("noop-middleware")
    if again is not None and noop is not None:
        run.summary.append(
            (
                "HTTP controls: the bare app again (noise); a pass-through middleware (floor)",
                f"{_x(again.ratio)} bare; {_x(noop.ratio)} bare",
                "-",
                "-",
            )
        )
    ours = by.get("ratelimit-bucket")
    peers = [by[p] for p in http_overhead.PEERS if p in by and by[p].added_us is not None]
    cheapest = min(peers, key=lambda p: p.added_us or 0.0, default=None)
    if ours is not None and ours.added_us is not None and cheapest is not None:
        run.summary.append(
            (
                "Limiter CPU per request, in-process (bucket, header fields)",
                f"+{ours.added_us:.2f} µs",
                f"{cheapest.variant} +{cheapest.added_us or 0.0:.2f} µs",
                f"{ours.added_us / (cheapest.added_us or 1.0):.2f} (lower is better)",
            )
        )


def run_redis(run: Run) -> None:
    settings = redis_decisions.Settings.quick() if run.quick else redis_decisions.Settings()
    # Less waiting per cell than the script alone: the suite must stay under 15 minutes
    # (3 with --quick) on a busy machine too.
    settings = replace(settings, quiet_wait=min(settings.quiet_wait, 1.0))
    if run.quick:
        settings = replace(settings, quiet_wait=0.3, breaker_seconds=0.6)
    settings = replace(settings, fresh_venvs=run.fresh_venvs)
    env = redis_decisions.prepare(settings, run.log)
    report = redis_decisions.run(settings, env, run.log, redis=run.redis)
    command = f"python3 -m benchmarks --only redis_decisions{_argv(run)}"
    section = redis_decisions.render(report, env, settings, command)
    run.sections[redis_decisions.SECTION] = section
    run.versions.update(report.versions)
    run.redis_version = env.redis_version
    run.disturbed["redis_decisions"] = sum(r.disturbed for r in report.rows) + sum(
        r.disturbed for r in report.http
    )
    for c in settings.concurrencies:
        ours = redis_decisions._row(report, "Engine.decide bucket", c)
        best = redis_decisions.best_peer(report, c)
        if ours is None:
            run.summary.append((f"Redis decisions/s at concurrency {c}", "**failed**", "-", "-"))
        elif best and best.rate:
            if ours.failed_rounds:
                run.summary.append(
                    (
                        f"Redis decisions/s at concurrency {c}: rounds that failed",
                        f"**{ours.failed_rounds}**: `{ours.failure}`",
                        "-",
                        "-",
                    )
                )
            run.summary.append(
                (
                    f"Redis decisions/s at concurrency {c} (token bucket, one process)",
                    f"{ours.rate:,.0f}/s (p50 {redis_decisions._us(ours.p50_us)})",
                    f"{best.subject} {best.rate:,.0f}/s (p50 {redis_decisions._us(best.p50_us)})",
                    f"{ours.rate / best.rate:.2f}",
                )
            )
    best_http = http_overhead.best_peer(report.http, redis_decisions.HTTP_PEERS)
    for r in report.http:
        if r.variant.startswith("ratelimit") and best_http is not None:
            run.summary.append(
                (
                    f"HTTP req/s on Redis: {r.variant}",
                    f"{r.rps:,.0f} ({_x(r.ratio)} bare)",
                    f"{best_http.variant} {best_http.rps:,.0f} ({_x(best_http.ratio)} bare)",
                    f"{r.rps / best_http.rps:.2f}",
                )
            )


def run_metrics(run: Run) -> None:
    """In the bench venv's python (it imports this library and prometheus_client)."""
    python = _support.ensure_venv(_support.standard_venvs()["bench"], fresh=False)
    cmd = [str(python), "-m", "benchmarks.metrics_overhead", "--no-write"]
    if run.quick:
        cmd.append("--quick")
    result = subprocess.run(
        cmd, cwd=_support.REPO, env=_support.child_env(), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"metrics_overhead failed:\n{result.stderr[-2000:]}")
    body = result.stdout.strip()
    command = f"python3 -m benchmarks --only metrics_overhead{_argv(run)}"
    run.sections["metrics_overhead"] = body + f"\n- Command: `{command}`"
    run.summary.append(
        (
            "Prometheus metrics, cost per request (in-process)",
            "see the metrics_overhead section",
            "no peer exports metrics",
            "-",
        )
    )


def _bench_module(run: Run, module: str, args: list[str], ok: tuple[int, ...] = (0,)) -> str:
    """Run `python -m benchmarks.<module> --no-write ARGS` in the bench venv; its section."""
    python = _support.ensure_venv(_support.standard_venvs()["bench"], fresh=False)
    cmd = [str(python), "-m", f"benchmarks.{module}", "--no-write", *args]
    result = subprocess.run(
        cmd, cwd=_support.REPO, env=_support.child_env(), capture_output=True, text=True
    )
    if result.returncode not in ok:
        raise RuntimeError(f"{module} failed:\n{result.stderr[-2000:]}")
    return result.stdout.strip()


def run_queue_goodput(run: Run) -> None:
    """A 2 s endpoint at 10x overload behind the waiting line (memory, and Redis)."""
    args = ["--quick"] if run.quick else ["--duration", "12", "--patience", "25"]
    if run.redis is not None and not run.quick:
        args += ["--redis", f"redis://127.0.0.1:{run.redis[0]}/0"]
    body = _bench_module(run, "queue_goodput", args)
    command = f"python3 -m benchmarks --only queue_goodput{_argv(run)}"
    run.sections["queue_goodput"] = body + f"\n- Command: `{command}`"
    run.summary.append(
        (
            "Waiting line at 10x overload: slot use, Retry-After honesty",
            "see the queue_goodput section",
            "no peer has a waiting line",
            "-",
        )
    )


def run_queue_handoff(run: Run) -> None:
    """Release in one process to admission in another, through Redis (own redis-server)."""
    rounds = "200" if run.quick else "1000"
    # Exit status 1 means the p99 target was missed: still a result to report.
    body = _bench_module(run, "queue_handoff", ["--rounds", rounds], ok=(0, 1))
    command = f"python3 -m benchmarks --only queue_handoff{_argv(run)}"
    run.sections["queue_handoff"] = body + f"\n- Command: `{command}`"


def run_key_flood(run: Run) -> None:
    """Per-decision cost on the memory backend while distinct keys flood it."""
    args = ["--quick"] if run.quick else []
    body = _bench_module(run, "key_flood", args)
    command = f"python3 -m benchmarks --only key_flood{_argv(run)}"
    run.sections["key_flood"] = body + f"\n- Command: `{command}`"
    run.summary.append(
        (
            "Key flood (rotating IPs), memory backend: µs per decision vs steady state",
            "see the key_flood section",
            "-",
            "-",
        )
    )


def run_weighted_slots(run: Run) -> None:
    """Light and heavy requests in one line: three hand-off policies on simulated time."""
    body = _bench_module(run, "weighted_slots", ["--quick"] if run.quick else [])
    command = f"python3 -m benchmarks --only weighted_slots{_argv(run)}"
    run.sections["weighted_slots"] = body + f"\n- Command: `{command}`"


def run_token_accuracy(run: Run) -> None:
    """64 callers on one key: tokens admitted against the limit, reserve-then-settle
    against charging after the response (`limits`), on the suite's redis-server."""
    args = ["--quick"] if run.quick else []
    if run.redis is not None:
        args += ["--redis", f"redis://127.0.0.1:{run.redis[0]}/0"]
    body = _bench_module(run, "token_accuracy", args)
    command = f"python3 -m benchmarks --only token_accuracy{_argv(run)}"
    run.sections["token_accuracy"] = body + f"\n- Command: `{command}`"
    run.summary.append(
        (
            "Token limit, 64 concurrent callers of one key: admitted tokens over the limit",
            "see the token_accuracy section",
            "limits, charged after the response: see the token_accuracy section",
            "-",
        )
    )


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "accuracy",
        "admitted vs allowed with 4 processes on one Redis key; concurrency overshoot",
        "~1.5 min",
        "~35 s",
        True,
        run_accuracy,
    ),
    Benchmark(
        "http_overhead",
        "req/s and p99 under uvicorn + wrk, bare and behind each limiter, memory backends",
        "~4 min",
        "~1.5 min",
        False,
        run_http,
    ),
    Benchmark(
        "redis_decisions",
        "decisions/s and latency on Redis beside the peers and the floor; HTTP on Redis",
        "~5 min",
        "~1.2 min",
        True,
        run_redis,
    ),
    Benchmark(
        "metrics_overhead",
        "what Prometheus metrics add per request (this library only)",
        "~30 s",
        "~10 s",
        False,
        run_metrics,
    ),
    Benchmark(
        "queue_goodput",
        "a 2 s endpoint at 10x overload behind Concurrency(8, queue=16, timeout=5)",
        "~3 min",
        "~30 s",
        True,
        run_queue_goodput,
    ),
    Benchmark(
        "queue_handoff",
        "Redis waiting line: release in one process to admission in another, p50/p99",
        "~15 s",
        "~5 s",
        False,
        run_queue_handoff,
    ),
    Benchmark(
        "key_flood",
        "memory backend: µs per decision during a flood of 10^4-10^6 distinct keys vs steady",
        "~1.5 min",
        "~15 s",
        False,
        run_key_flood,
    ),
    Benchmark(
        "weighted_slots",
        "weighted pool of 8: light and heavy requests in one line, three hand-off policies",
        "~15 s",
        "~3 s",
        False,
        run_weighted_slots,
    ),
    Benchmark(
        "token_accuracy",
        "64 callers, one key: tokens admitted vs the limit, reserve-then-settle vs charged "
        "after (limits); settle's cost",
        "~1.5 min",
        "~20 s",
        True,
        run_token_accuracy,
    ),
)
BY_NAME = {b.name: b for b in BENCHMARKS}
#: Seconds from the start of the measurements during which disturbed ones are repeated.
RETRY_BUDGET = 10 * 60.0


# -- the header and the file ------------------------------------------------------------------


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def _load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "?"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


#: Packages named in the header, in this order: this library, the peers, the stack.
OURS = ("surgelimit",)
PEERS = (
    "slowapi",
    "limits",
    "fastapi-limiter",
    "throttled-py",
    "pyrate-limiter",
    "asgi-ratelimit",
)
STACK = ("redis", "hiredis", "coredis", "uvicorn", "uvloop", "httptools", "starlette")


def header(run: Run, *, command: str, total: float, load: dict[str, Any]) -> str:
    """The suite's header section: machine, versions, load, the summary table."""
    v = run.versions
    lines = [
        "## The run",
        "",
        f"Produced by `{command}` in {total / 60:.1f} minutes "
        f"({', '.join(f'{k} {s:.0f} s' for k, s in run.seconds.items())}), "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{_support.code_revision('ratelimit', 'benchmarks')}.",
        "",
        f"- Machine: {os.cpu_count()} cores, {_support.cpu_model()}; {_os_name()}, "
        f"{platform.system()} {platform.release()}",
        f"- Python: {platform.python_implementation()} {platform.python_version()}; "
        f"Redis: redis-server {run.redis_version} (loopback, no persistence, started by the "
        f"suite); load generator: {run.wrk_version}",
        "- This library: " + ", ".join(f"{d} {v[d]}" for d in OURS if d in v),
        "- Peers: " + ", ".join(f"{d} {v[d]}" for d in PEERS if d in v),
        "- Stack: " + ", ".join(f"{d} {v[d]}" for d in STACK if d in v),
        f"- Load: other processes used {load['others']:.2f} core on average during the run "
        f"(load average before {load['before']}, after {load['after']}); the start waited "
        f"{load['waited']:.0f} s for a quiet machine and found {load['busy']:.2f} core busy. "
        "Each measurement waits for quiet again"
        + (
            ""
            if run.quick
            else f" and is repeated once if disturbed (in the first {RETRY_BUDGET / 60:.0f} "
            "minutes)"
        )
        + "; "
        + (
            ", ".join(f"{k}: {n} still disturbed" for k, n in run.disturbed.items())
            if run.disturbed
            else "no measurement counted"
        ),
        "",
        "This library against the best peer measured in the same run (the sections below "
        "have every peer and the details):",
        "",
        "| measurement | this library | best peer | ratio |",
        "| --- | --- | --- | ---: |",
    ]
    lines += [f"| {m} | {o} | {p} | {r} |" for m, o, p, r in run.summary]
    return "\n".join(lines)


INTRO = """# Benchmark results

Written by `python3 -m benchmarks` (the whole suite, one run) or
`python3 -m benchmarks --only NAME` (one section); run it again rather than
editing numbers by hand. Each section says how it was measured.
"""


def write_results(run: Run, header_text: str | None, path: Path = _support.RESULTS) -> None:
    """A full run rewrites the file; `--only` (no header) replaces just its sections."""
    if header_text is not None:
        blocks = [INTRO.strip(), f"<!-- suite:start -->\n{header_text}\n<!-- suite:end -->"]
        for b in BENCHMARKS:
            if b.name in run.sections:
                body = run.sections[b.name].strip()
                blocks.append(f"<!-- {b.name}:start -->\n{body}\n<!-- {b.name}:end -->")
        path.write_text("\n\n".join(blocks) + "\n")
        return
    for name, body in run.sections.items():
        _support.write_section(name, body, path)


# -- main ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="benchmarks: "
        + "; ".join(f"{b.name} ({b.full}, quick {b.quick})" for b in BENCHMARKS),
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs: under 3 minutes")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only NAME (repeatable, or a,b)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--fresh-venvs", action="store_true", help="recreate the venvs")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait at the start for other work to stop (default 120; quick 10)",
    )
    args = parser.parse_args(argv)
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:<18} {b.full:>9} (quick {b.quick:>7})  {b.what}")
        return 0
    chosen = _support.pick(parser, ",".join(args.only or []), BY_NAME, "benchmarks")
    todo = [b for b in BENCHMARKS if not chosen or b.name in chosen]

    started = time.monotonic()
    run = Run(quick=args.quick, fresh_venvs=args.fresh_venvs)
    print("setting up: venvs, redis-server, wrk ...", flush=True)
    for venv in _support.standard_venvs().values():
        _support.ensure_venv(venv, fresh=args.fresh_venvs)
    redis_server = _support.ensure_tool("redis-server")
    _support.ensure_tool("wrk")
    run.redis_version = _support.redis_version(redis_server)

    quiet_wait = args.quiet_wait if args.quiet_wait is not None else 10.0 if args.quick else 120.0
    print(f"waiting up to {quiet_wait:.0f} s for a quiet machine ...", flush=True)
    waited = time.monotonic()
    busy = _support.wait_for_quiet(quiet_wait, window=2.0)
    load = {"before": _load_average(), "busy": busy, "waited": time.monotonic() - waited}
    print(f"  {busy:.2f} core busy after {load['waited']:.0f} s", flush=True)
    # Past this point a disturbed measurement is kept rather than repeated, so a busy
    # machine cannot push the whole run past 15 minutes (12 for the benchmarks' own work).
    _support.retry_until = time.time() + RETRY_BUDGET
    cpu0 = _support.cpu_busy_seconds()
    own0 = _own_cpu()
    wall0 = time.monotonic()
    with ExitStack() as stack:
        if any(b.needs_redis for b in todo):
            run.redis = stack.enter_context(
                _support.redis_server(redis_server, prefix=_support.pin(1))
            )
            print(f"redis-server {run.redis_version} on port {run.redis[0]}", flush=True)
        failed: list[str] = []
        for b in todo:
            print(f"\n== {b.name}: {b.what}", flush=True)
            t = time.monotonic()
            try:
                b.run(run)
            except Exception as exc:  # the others' measurements are kept and written
                failed.append(b.name)
                print(f"== {b.name} FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            run.seconds[b.name] = time.monotonic() - t
            print(f"== {b.name} done in {run.seconds[b.name]:.0f} s", flush=True)
    wall = time.monotonic() - wall0
    others = max(0.0, (_support.cpu_busy_seconds() - cpu0) - (_own_cpu() - own0)) / wall
    load.update(after=_load_average(), others=others)
    total = time.monotonic() - started
    command = "python3 -m benchmarks" + (" --quick" if args.quick else "")
    # A run with a failed benchmark replaces only the sections it measured (as --only does).
    whole = not chosen and not failed
    header_text = header(run, command=command, total=total, load=load) if whole else None
    if header_text:
        print("\n" + header_text)
    if not args.no_write:
        write_results(run, header_text)
        print(f"\nwrote {_support.RESULTS.relative_to(_support.REPO)}")
    print(f"suite done in {total:.0f} s ({total / 60:.1f} min)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _own_cpu() -> float:
    """CPU seconds of this process and of its reaped children (servers, workers, wrk)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    sys.exit(main())
