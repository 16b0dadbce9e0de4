"""Accuracy on Redis: how far past its limit each library admits when processes race for one key.

Four OS processes (each with several asyncio tasks, or threads for a
synchronous library) ask for the same caller's key as fast as they can for a
fixed time, against one local redis-server. A correct limiter admits at most
what its configured limit allows over the elapsed time:

    allowed = burst + rate x elapsed

with `burst` the bucket size (for a window: the window's count, since a
window admits that many at once) and `rate` the count per period; `elapsed`
runs from the first call of any process to the last return of any process.
Every library is given the same limit (`count` per second), set up the way
its documentation recommends, its Redis algorithms side by side; each row
reports admitted, allowed, their ratio and the excess past allowed. A window
that admits less than allowed is not wrong (it has no burst on top of its
count); only the excess is over-admission.

Concurrency: this library's `Concurrency(limit, key=GLOBAL)` with every
admitted task holding its slot a few milliseconds; the most slots ever in
flight at once (counted fleet-wide on a separate Redis counter) against the
limit. No peer offers a concurrency limit; the table says so per peer.

    python -m benchmarks.accuracy            # ~1.5 minutes
    python -m benchmarks.accuracy --quick    # ~35 seconds
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import _support

SECTION = "accuracy"
WORKER = _support.HERE / "_accuracy_worker.py"


@dataclass(frozen=True)
class Subject:
    """One library's limiter on Redis (rate names match `_redis_worker.BUILDERS`)."""

    name: str
    #: The distribution whose version is shown, and the venv it runs in.
    package: str
    venv: str
    what: str
    #: "rate" or "concurrency".
    kind: str = "rate"
    ours: bool = False
    #: The name shown in the tables, when not `name`.
    label: str = ""

    @property
    def shown(self) -> str:
        return self.label or self.name


SUBJECTS: tuple[Subject, ...] = (
    Subject(
        "Engine.decide bucket",
        "surgelimit",
        "bench",
        "`TokenBucket(rate, burst=count)` through `Engine.decide` on `RedisBackend` (GCRA, Lua)",
        ours=True,
        label="ratelimit TokenBucket",
    ),
    Subject(
        "limits fixed window",
        "limits",
        "bench",
        "`limits.aio` `FixedWindowRateLimiter` on its async Redis storage (coredis)",
    ),
    Subject(
        "limits moving window",
        "limits",
        "bench",
        "`MovingWindowRateLimiter` (Lua, a list entry per request), same storage",
    ),
    Subject(
        "limits sliding window",
        "limits",
        "bench",
        "`SlidingWindowCounterRateLimiter` (two weighted counters), same storage",
    ),
    Subject(
        "slowapi",
        "slowapi",
        "bench",
        "`Limiter(storage_uri=redis://...)` check of a `@limiter.limit` route "
        "(limits' sync storage, fixed window; threads, as it is synchronous)",
    ),
    Subject(
        "fastapi-limiter",
        "fastapi-limiter",
        "bench",
        "0.1.6 `RateLimiter(times, seconds)`: its Lua fixed window on redis.asyncio",
    ),
    Subject(
        "throttled-py token bucket",
        "throttled-py",
        "bench",
        "`Throttled(using=TOKEN_BUCKET, quota='N/s burst N', store=RedisStore)`",
    ),
    Subject("throttled-py GCRA", "throttled-py", "bench", "the same with `using=GCRA`"),
    Subject(
        "pyrate-limiter RedisBucket",
        "pyrate-limiter",
        "bench",
        "`Limiter(RedisBucket.init([Rate(N, SECOND)], redis.asyncio, key))` (sliding log)",
    ),
    Subject(
        "pyrate-limiter GCRA",
        "pyrate-limiter",
        "bench",
        "`Limiter(StateBucket(rates, store=RedisStateStore(...)))`",
    ),
    Subject(
        "asgi-ratelimit fixed window",
        "asgi-ratelimit",
        "asgi-ratelimit",
        "`RedisBackend(StrictRedis)`, `Rule(second=N)`; admitted when `retry_after(...) == 0`, "
        "as its middleware decides",
    ),
    Subject(
        "asgi-ratelimit sliding window",
        "asgi-ratelimit",
        "asgi-ratelimit",
        "`SlidingRedisBackend(StrictRedis)`, same rule and test",
    ),
    Subject(
        "Concurrency",
        "surgelimit",
        "bench",
        "`Concurrency(limit, key=keys.GLOBAL)` through `Engine.decide`/`release` on "
        "`RedisBackend` (leases in a sorted set, Lua)",
        kind="concurrency",
        ours=True,
        label="ratelimit Concurrency",
    ),
)
BY_NAME = {s.name: s for s in SUBJECTS}

#: Why a subject admits past its limit, read in its source; shown when a run measures excess.
WHY = {
    "fastapi-limiter": "its script answers a refusal with the key's `PTTL`, and its dependency "
    "admits whenever that answer is 0, which `PTTL` returns in the window's last millisecond: "
    "every call in that millisecond is admitted uncounted",
    "asgi-ratelimit sliding window": "`retry_after` rounds the seconds until the oldest entry "
    "leaves the window to an integer, and its middleware admits when that is 0: a refusal less "
    "than half a second from the window's end becomes an admission, uncounted",
}

#: What each peer offers for a concurrency limit (checked in its documentation and source).
NO_CONCURRENCY = {
    "limits": "rate limits only (fixed, moving, sliding window)",
    "slowapi": "rate limits only (built on limits)",
    "fastapi-limiter": "rate limits only",
    "throttled-py": "rate limits only (fixed/sliding window, leaky/token bucket, GCRA)",
    "pyrate-limiter": "rate limits only (buckets of rates)",
    "asgi-ratelimit": "rate limits only (per-period rules, blocking time)",
}


@dataclass(frozen=True)
class Settings:
    """How hard and how long to hammer."""

    processes: int = 4
    #: asyncio tasks (or threads) per process.
    tasks: int = 8
    #: Seconds each subject is hammered, and the pause between subjects.
    duration: float = 5.0
    gap: float = 0.7
    #: The rate limit every library gets: `count` per second, burst `count`.
    count: int = 100
    #: The concurrency limit, and how long each admitted task holds its slot.
    concurrency: int = 8
    hold: float = 0.005
    subjects: tuple[str, ...] = tuple(s.name for s in SUBJECTS)
    fresh_venvs: bool = False

    @classmethod
    def quick(cls) -> Settings:
        """About 35 seconds: 2 s per subject (the ratios are the same kind, shorter)."""
        return cls(duration=2.0, gap=0.5)


@dataclass(frozen=True)
class Row:
    """One subject, all processes added up."""

    subject: str
    version: str
    admitted: int
    refused: int
    failed: int
    elapsed: float
    #: Rate subjects: burst + rate x elapsed. Concurrency: the limit.
    allowed: float
    max_in_flight: int = 0
    errors: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        return self.admitted / self.allowed if self.allowed else 0.0

    @property
    def excess(self) -> float:
        return max(0.0, self.admitted - self.allowed)


@dataclass(frozen=True)
class Environment:
    """Prepared once: the venvs' pythons, redis-server, versions."""

    pythons: dict[str, Path]
    redis_server: str
    redis_version: str
    versions: dict[str, str]
    code: str


@dataclass
class Report:
    rows: list[Row]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def prepare(settings: Settings, log: Callable[[str], None] = print) -> Environment:
    """Create or reuse the venvs the chosen subjects need; find redis-server; read versions."""
    venvs = _support.standard_venvs()
    needed = sorted({BY_NAME[n].venv for n in settings.subjects})
    pythons = {n: _support.ensure_venv(venvs[n], fresh=settings.fresh_venvs) for n in needed}
    redis_server = _support.ensure_tool("redis-server")
    versions: dict[str, str] = {}
    for venv, python in pythons.items():
        mine = [BY_NAME[n] for n in settings.subjects if BY_NAME[n].venv == venv]
        packages = sorted({s.package for s in mine})
        versions.update(_support.versions(python, [*packages, "redis"]))
    return Environment(
        pythons,
        redis_server,
        _support.redis_version(redis_server),
        versions,
        _support.code_revision("ratelimit"),
    )


def run(
    settings: Settings | None = None,
    env: Environment | None = None,
    log: Callable[[str], None] = print,
    redis: tuple[int, int] | None = None,
) -> Report:
    """Hammer every subject in turn, all processes at once; `redis` = (port, pid) to reuse."""
    settings = settings or Settings()
    env = env or prepare(settings, log)
    started = time.monotonic()
    with ExitStack() as stack:
        if redis is None:
            redis = stack.enter_context(_support.redis_server(env.redis_server))
        port = redis[0]
        tallies = _hammer(env, settings, port, log)
    rows = []
    for name in settings.subjects:
        s, got = BY_NAME[name], tallies.get(name, [])
        first = min((t["first"] for t in got if t["first"]), default=0.0)
        last = max((t["last"] for t in got if t["last"]), default=0.0)
        elapsed = max(0.0, last - first)
        allowed = (
            float(settings.concurrency)
            if s.kind == "concurrency"
            else settings.count + settings.count * elapsed
        )
        rows.append(
            Row(
                subject=name,
                version=env.versions.get(s.package, "?"),
                admitted=sum(t["admitted"] for t in got),
                refused=sum(t["refused"] for t in got),
                failed=sum(t["failed"] for t in got),
                elapsed=elapsed,
                allowed=allowed,
                max_in_flight=max((t["max_in_flight"] for t in got), default=0),
                errors=tuple(sorted({t["error"] for t in got if t["error"]})),
            )
        )
    for r in rows:
        what = (
            f"max in flight {r.max_in_flight} / limit {r.allowed:.0f}"
            if BY_NAME[r.subject].kind == "concurrency"
            else f"admitted {r.admitted} / allowed {r.allowed:.0f} ({r.ratio:.3f})"
        )
        log(f"  {r.subject:<32} {what}" + (f"  errors: {r.errors[0]}" if r.errors else ""))
    return Report(rows, time.monotonic() - started)


def _hammer(
    env: Environment, settings: Settings, port: int, log: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """Start `processes` workers per venv with one shared schedule; gather their tallies."""
    # Imports take a few seconds on a busy 2-core machine: the first subject starts later.
    t0 = time.time() + 4.0
    schedule = []
    run_id = f"acc{int(t0)}"
    for k, name in enumerate(settings.subjects):
        s = BY_NAME[name]
        schedule.append(
            {
                "name": name,
                "kind": s.kind,
                "venv": s.venv,
                "start": t0 + k * (settings.duration + settings.gap),
                "duration": settings.duration,
                "prefix": f"{run_id}-{k}",
                "count": settings.count,
                "seconds": 1,
                "limit": settings.concurrency,
                "hold": settings.hold,
            }
        )
    total = len(schedule) * (settings.duration + settings.gap) + 4.0
    log(
        f"accuracy: {len(schedule)} subjects x {settings.duration:g} s, "
        f"{settings.processes} processes x {settings.tasks} tasks on one key (~{total:.0f} s)"
    )
    tallies: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="accuracy-") as tmp:
        procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        for venv, python in env.pythons.items():
            mine = [item for item in schedule if item["venv"] == venv]
            if not mine:
                continue
            spec = {"port": port, "tasks": settings.tasks, "schedule": mine}
            for i in range(settings.processes):
                spec_path = Path(tmp) / f"{venv}-{i}.json"
                result_path = Path(tmp) / f"{venv}-{i}.result.json"
                spec_path.write_text(json.dumps(spec))
                cmd = [str(python), str(WORKER), str(spec_path), str(result_path)]
                proc = subprocess.Popen(cmd, cwd=_support.HERE, env=_support.child_env())
                procs.append((proc, result_path))
        try:
            for proc, result_path in procs:
                if proc.wait(timeout=total + 120) != 0:
                    raise RuntimeError(f"accuracy worker exited with {proc.returncode}")
                for tally in json.loads(result_path.read_text()):
                    tallies.setdefault(tally["subject"], []).append(tally)
        finally:
            for proc, _ in procs:
                _support.stop_process(proc)
    return tallies


# -- the section ----------------------------------------------------------------------------


def render(report: Report, env: Environment, settings: Settings, command: str) -> str:
    """The markdown section: the rate table, the concurrency table, how it was measured."""
    rate = [r for r in report.rows if BY_NAME[r.subject].kind == "rate"]
    conc = [r for r in report.rows if BY_NAME[r.subject].kind == "concurrency"]
    lines = [
        "## Accuracy on Redis: admitted vs allowed, processes racing for one key",
        "",
        f"{settings.processes} processes x {settings.tasks} tasks hammer **one** key for "
        f"{settings.duration:g} s per library, all with the same limit: {settings.count}/second "
        f"(burst {settings.count}). *Allowed* = burst + rate x elapsed (elapsed from the first "
        "call of any process to the last return). *Excess* is what was admitted past allowed: "
        "over-admission. A ratio under 1 is not an error for a window (no burst on top of its "
        "count); over 1 is.",
        "",
        "| library | version | admitted | allowed | admitted / allowed | excess | refused "
        "| failed calls |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rate:
        shown = BY_NAME[r.subject].shown
        name = f"**{shown}**" if BY_NAME[r.subject].ours else shown
        lines.append(
            f"| {name} | {r.version} | {r.admitted:,} | {r.allowed:,.0f} | {r.ratio:.3f} "
            f"| {r.excess:,.0f} | {r.refused:,} | {r.failed:,} |"
        )
    lines.append("")
    lines += [f"- **{BY_NAME[r.subject].shown}**: {BY_NAME[r.subject].what}." for r in rate]
    for r in rate:
        if r.excess > 0 and r.subject in WHY:
            lines.append(f"- Why **{r.subject}** over-admits: {WHY[r.subject]}.")
        if r.errors:
            lines.append(f"- **{r.subject}** errors: `{r.errors[0]}`")
    lines += [
        "",
        f"Concurrency: every admitted task holds its slot {settings.hold * 1000:g} ms; the "
        "most slots in flight at once is counted fleet-wide (an INCR on a separate Redis "
        "counter after admission, a DECR before release, so it never over-counts).",
        "",
        "| library | version | limit | max in flight | overshoot | admitted | refused |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in conc:
        lines.append(
            f"| **{BY_NAME[r.subject].shown}** | {r.version} | {r.allowed:.0f} | {r.max_in_flight} "
            f"| {max(0, r.max_in_flight - int(r.allowed))} | {r.admitted:,} | {r.refused:,} |"
        )
    for peer, what in NO_CONCURRENCY.items():
        version = env.versions.get(peer, "")
        lines.append(f"| {peer} | {version} | cannot: {what} | - | - | - | - |")
    for r in conc:
        if r.errors:
            lines.append(f"\n- **{r.subject}** errors: `{r.errors[0]}`")
    lines += [
        "",
        f"- Command: `{command}` ({report.seconds:.0f} s)",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Code measured: {env.code}",
        f"- Redis: redis-server {env.redis_version} on loopback, no persistence; "
        f"redis-py {env.versions.get('redis', '?')}",
        "- Each library runs from the benchmark venvs (asgi-ratelimit from its own, since it "
        "installs a top-level `ratelimit`); every subject starts on a fresh key at the same "
        "wall-clock moment in every process",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run, print the section and write it to RESULTS.md."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="~35 s: 2 s per subject")
    parser.add_argument("--duration", type=float, help="seconds per subject (default 5)")
    parser.add_argument("--processes", type=int, help="processes racing (default 4)")
    parser.add_argument("--subjects", help="comma-separated subset of: " + ", ".join(BY_NAME))
    parser.add_argument("--fresh-venvs", action="store_true", help="recreate the venvs")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    overrides: dict[str, Any] = {"fresh_venvs": args.fresh_venvs}
    if args.duration is not None:
        overrides["duration"] = args.duration
    if args.processes is not None:
        overrides["processes"] = args.processes
    if args.subjects:
        overrides["subjects"] = _support.pick(parser, args.subjects, BY_NAME, "subjects")
    settings = replace(settings, **overrides)
    env = prepare(settings)
    report = run(settings, env)
    argv_text = shlex.join(sys.argv[1:] if argv is None else list(argv))
    section = render(report, env, settings, f"python -m benchmarks.accuracy {argv_text}".strip())
    print()
    print(section)
    _support.OUT.mkdir(exist_ok=True)
    raw = {"settings": asdict(settings), "rows": [asdict(r) for r in report.rows]}
    (_support.OUT / "accuracy.json").write_text(json.dumps(raw, indent=1))
    if not args.no_write:
        _support.write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
