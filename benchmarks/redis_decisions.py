"""Decisions per second and latency on Redis: this library, its peers and the physical floor.

One run starts its own redis-server on a free loopback port (no persistence)
and measures against it, in one worker process on one event loop:

- the floor: a bare redis-py `PING`, a trivial `EVALSHA` (`return 1`), and
  the same `EVALSHA` pipelined per loop turn on one raw socket;
- this library's `RedisBackend.decide` (a token bucket; a bucket plus a
  global lease; the same split by hash slot as on a cluster), `Engine.decide`
  and the public `Limiter.check` / `Limiter.acquire`;
- the peers' Redis implementations, each set up as its documentation says:
  limits (fixed, moving, sliding window), slowapi, fastapi-limiter,
  throttled-py (token bucket, GCRA), pyrate-limiter (its Redis bucket, GCRA);

each at concurrency 1 and 32 (asyncio tasks; threads for slowapi, which is
synchronous), interleaved round by round. Also: Redis commands per decision
(`INFO commandstats` deltas, and `MONITOR` for which of them the client sent),
the cost of a decision with Redis dead and the circuit breaker open, and an
HTTP run (uvicorn, one worker, `wrk`) of the app bare and behind the
middleware on Redis, with http_overhead's server and load helpers. The
targets of issue 3 stand next to the measured values in this script's
section of RESULTS.md.

    python -m benchmarks.redis_decisions            # ~5 minutes
    python -m benchmarks.redis_decisions --quick    # ~90 seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import _support, http_overhead

SECTION = "redis_decisions"
WORKER = _support.HERE / "_redis_worker.py"
HOST = "127.0.0.1"
#: The environment variable the Redis apps in benchmarks/apps read their URL from.
URL_VARIABLE = "BENCH_REDIS_URL"


@dataclass(frozen=True)
class Subject:
    """One way to decide on Redis (names match `_redis_worker.BUILDERS`)."""

    name: str
    #: "floor", "ours" or "peer".
    group: str
    what: str
    #: What the reader must know: what the peer cannot do, how it was set up.
    note: str = ""
    #: Concurrency by OS threads (a synchronous library) instead of asyncio tasks.
    threads: bool = False


SUBJECTS: tuple[Subject, ...] = (
    Subject("redis-py PING", "floor", "`await Redis.ping()`, redis.asyncio"),
    Subject("redis-py EVALSHA", "floor", "`await Redis.evalsha(sha, 0)` of `return 1`"),
    Subject(
        "raw pipelined EVALSHA",
        "floor",
        "`EVALSHA` of `return 1` on one socket, all calls of a loop turn in one write",
    ),
    Subject(
        "RedisBackend.decide bucket",
        "ours",
        "`backend.decide([BucketCheck])`: one GCRA bucket per caller",
    ),
    Subject(
        "RedisBackend.decide bucket+lease",
        "ours",
        "`backend.decide([BucketCheck, LeaseCheck])`: per-caller bucket + global lease "
        "(two hash slots; one call on one server)",
        "leases are not released here: they expire after 1 s",
    ),
    Subject(
        "RedisBackend.decide bucket+lease split by slot",
        "ours",
        "the same with `split_by_slot=True`: one call per hash slot, as on Redis Cluster",
    ),
    Subject(
        "Engine.decide bucket",
        "ours",
        "`Engine.decide(rule, scope)`: TokenBucket per `x-api-key`, keys hashed, results mapped",
    ),
    Subject(
        "Engine.decide+release bucket+concurrency",
        "ours",
        "`Engine.decide` then `Engine.release` of TokenBucket + global Concurrency: "
        "a request's whole life (two calls)",
    ),
    Subject(
        "Limiter.check bucket",
        "ours",
        '`await limiter.check("bench", key=caller)`: the public core without a request, '
        "the fair peer of `hit()`/`try_acquire`",
    ),
    Subject(
        "Limiter.acquire bucket+concurrency",
        "ours",
        '`async with limiter.acquire("bench", key=caller)`: bucket + global slot, '
        "taken and released (two calls)",
    ),
    Subject(
        "limits fixed window",
        "peer",
        "`FixedWindowRateLimiter.hit` on `limits.aio` `RedisStorage` (`async+redis://`)",
        "coredis client, the documented `limits[async-redis]` default; no concurrency limit",
    ),
    Subject(
        "limits moving window",
        "peer",
        "`MovingWindowRateLimiter.hit`, same storage",
        "a list entry per request, up to the limit; no concurrency limit",
    ),
    Subject(
        "limits sliding window",
        "peer",
        "`SlidingWindowCounterRateLimiter.hit`, same storage",
        "no concurrency limit",
    ),
    Subject(
        "slowapi",
        "peer",
        "`Limiter(storage_uri=redis://...)`, one `@limiter.limit` route: "
        "`_check_request_limit(request, ...)`",
        "limits' synchronous Redis storage (fixed window): concurrency is by threads here "
        "(its best case: an async endpoint runs the check on the event loop, one at a time); "
        "no concurrency limit",
        threads=True,
    ),
    Subject(
        "fastapi-limiter",
        "peer",
        "0.1.6 `RateLimiter._check(key)`: its Lua fixed window (GET, INCR) on redis.asyncio",
        "0.1.6 is its last release with Redis code of its own; 0.2.0 hands every decision "
        "to pyrate-limiter (measured below); no concurrency limit",
    ),
    Subject(
        "throttled-py token bucket",
        "peer",
        "`throttled.asyncio.Throttled(using=TOKEN_BUCKET, store=RedisStore)`.limit(key)",
        "installed without its `[redis]` extra, which pins redis-py below 8; no concurrency limit",
    ),
    Subject(
        "throttled-py GCRA",
        "peer",
        "the same with `using=GCRA`",
        "no concurrency limit",
    ),
    Subject(
        "pyrate-limiter RedisBucket",
        "peer",
        "`Limiter(await RedisBucket.init(rates, redis.asyncio, key))`.try_acquire_async",
        "sliding-window log (a sorted-set entry per request, trimmed by a background leak); "
        "one bucket shared by every caller, as in its README; `try_acquire_async` holds one "
        "asyncio lock per Limiter across the Redis call, so concurrent decisions run one at "
        "a time; no concurrency limit",
    ),
    Subject(
        "pyrate-limiter GCRA",
        "peer",
        "`Limiter(StateBucket(rates, store=RedisStateStore(redis.asyncio, key)))`",
        "its documented Redis token bucket; same lock and single bucket; no concurrency limit",
    ),
)
BY_NAME = {s.name: s for s in SUBJECTS}
#: The subjects the targets are about.
OURS = "RedisBackend.decide bucket"
FLOOR_EVALSHA = "redis-py EVALSHA"

#: Issue 3's targets.
TARGET_P50_RATIO = 1.15
TARGET_PEER_RATIO = 2.0
TARGET_HTTP_RATIO = 0.6
TARGET_DEAD_US = 50.0

HTTP_VARIANTS: tuple[http_overhead.Variant, ...] = (
    http_overhead.Variant(
        "bare", "bare:app", "bench", "starlette", "Starlette, no limiter", limited=False
    ),
    http_overhead.Variant(
        "ratelimit-redis",
        "ours_redis:app",
        "bench",
        "surgelimit",
        "RateLimitMiddleware, RedisBackend: TokenBucket per client IP + Concurrency(10000) "
        "global (a decide and a release call per request), fail closed",
    ),
    http_overhead.Variant(
        "ratelimit-redis-bucket",
        "ours_redis_bucket:app",
        "bench",
        "surgelimit",
        "RateLimitMiddleware, RedisBackend: TokenBucket per client IP only, fail closed",
    ),
    http_overhead.Variant(
        "slowapi-redis",
        "slowapi_redis_app:app",
        "bench",
        "slowapi",
        "Limiter(get_remote_address, storage_uri=redis://...), @limiter.limit, fixed window "
        "(no concurrency limit)",
    ),
    http_overhead.Variant(
        "asgi-ratelimit-redis",
        "asgi_ratelimit_redis_app:app",
        "asgi-ratelimit",
        "asgi-ratelimit",
        "RateLimitMiddleware, RedisBackend(StrictRedis), Rule(second=...) per IP: its Lua "
        "fixed window, own venv (no concurrency limit)",
    ),
)
#: The peers among the HTTP variants.
HTTP_PEERS = ("slowapi-redis", "asgi-ratelimit-redis")
HTTP_BY_NAME = {v.name: v for v in HTTP_VARIANTS}
HTTP_OURS = "ratelimit-redis"

#: A cell during which other processes used more than this share of a core is measured again.
DISTURBED = _support.DISTURBED


@dataclass(frozen=True)
class Settings:
    """How long and how hard to measure."""

    #: Seconds measured per cell (one subject at one concurrency in one round).
    duration: float = 0.8
    warmup: float = 0.3
    rounds: int = 3
    concurrencies: tuple[int, ...] = (1, 32)
    subjects: tuple[str, ...] = tuple(s.name for s in SUBJECTS)
    #: Decisions whose Redis commands are counted per subject.
    count_decisions: int = 200
    #: Seconds of decide() with the breaker open, and in-process ASGI requests per round.
    breaker_seconds: float = 2.5
    breaker_requests: int = 5000
    #: "uvloop" or "asyncio": the event loop of the worker and of every HTTP server.
    #: uvloop by default: uvicorn runs on it whenever it is installed (`uvicorn[standard]`),
    #: and http_overhead measures on it too.
    loop: str = "uvloop"
    http_variants: tuple[str, ...] = tuple(v.name for v in HTTP_VARIANTS)
    http_duration: int = 4
    http_warmup: int = 1
    http_rounds: int = 5
    http_connections: int = 32
    #: Seconds to wait for a quiet machine before each cell.
    quiet_wait: float = 5.0
    #: Whether a disturbed cell or HTTP run is measured once more.
    retry: bool = True
    fresh_venvs: bool = False

    @classmethod
    def quick(cls) -> Settings:
        """About 90 seconds: one short round (a smoke run; the numbers are rougher)."""
        return cls(
            duration=0.3,
            warmup=0.1,
            rounds=1,
            count_decisions=100,
            breaker_seconds=1.2,
            breaker_requests=2000,
            http_duration=2,
            http_rounds=1,
            quiet_wait=1.0,
            retry=False,
        )


@dataclass(frozen=True)
class Environment:
    """Prepared once per run: the venv's python, redis-server, CPU pins, the HTTP set-up."""

    python: Path
    redis_server: str
    redis_version: str
    #: taskset prefixes: the worker and uvicorn on CPU 0, Redis (and wrk) on CPU 1.
    worker_pin: tuple[str, ...]
    redis_pin: tuple[str, ...]
    versions: dict[str, str]
    code: str
    #: http_overhead's environment with this run's event loop (None: no HTTP variants).
    http: http_overhead.Environment | None


@dataclass(frozen=True)
class Row:
    """One subject at one concurrency, over all rounds (medians)."""

    subject: str
    concurrency: int
    rate: float
    rate_min: float
    rate_max: float
    p50_us: float
    p99_us: float
    refused: int
    disturbed: int
    #: Set when every round failed: the row has no numbers.
    error: str | None = None
    #: Rounds that failed while others succeeded (the medians are of the rest), and why.
    failed_rounds: int = 0
    failure: str | None = None


@dataclass(frozen=True)
class Report:
    """Everything one run measured; `rows` are the decision measurements."""

    rows: list[Row]
    #: Per subject: {"sent": {CMD: per decision}, "scripted": ..., "commandstats": ...,
    #: "server_us": Redis's own microseconds per decision}.
    commands: dict[str, dict[str, Any]]
    #: Per subject: the two decisions under a 1/minute limit (must be [True, False]).
    probes: dict[str, list[bool]]
    errors: dict[str, str]
    breaker: dict[str, Any] | None
    http: list[http_overhead.Row]
    versions: dict[str, str]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def prepare(settings: Settings, log: Callable[[str], None] = print) -> Environment:
    """Create or reuse the bench venv, find redis-server (and wrk), read versions."""
    venv = _support.standard_venvs()["bench"]
    python = _support.ensure_venv(venv, fresh=settings.fresh_venvs)
    redis_server = _support.ensure_tool("redis-server")
    version = _support.redis_version(redis_server)
    wanted = [
        "surgelimit", "redis", "hiredis", "limits", "coredis", "slowapi", "fastapi-limiter",
        "throttled-py", "pyrate-limiter", "uvicorn", "uvloop", "httptools", "starlette",
    ]  # fmt: skip
    versions = _support.versions(python, wanted)
    http_env = None
    if settings.http_variants:
        hsettings = _http_settings(settings, None)
        # Its log line names its own server options; ours (the loop) are set just below.
        venvs = sorted({HTTP_BY_NAME[n].venv for n in settings.http_variants})
        http_env = http_overhead.prepare(
            replace(hsettings, variants=("bare",)), lambda _: None, venvs_needed=venvs
        )
        options = list(http_env.server_options)
        options[options.index("--loop") + 1] = settings.loop
        http_env = replace(http_env, server_options=tuple(options))
        for name, venv_python in http_env.pythons.items():
            if name != "bench":
                versions.update(_support.versions(venv_python, [name]))
    return Environment(
        python=python,
        redis_server=redis_server,
        redis_version=version,
        worker_pin=_support.pin(0),
        redis_pin=_support.pin(1),
        versions=versions,
        code=_support.code_revision("ratelimit"),
        http=http_env,
    )


def _http_settings(settings: Settings, redis_pid: int | None) -> http_overhead.Settings:
    return http_overhead.Settings(
        duration=settings.http_duration,
        warmup=settings.http_warmup,
        rounds=settings.http_rounds,
        connections=settings.http_connections,
        fresh_venvs=False,
        quiet_wait=settings.quiet_wait,
        retry=settings.retry,
        # Redis works for the limited apps: its CPU is theirs, not another load's.
        helper_pids=() if redis_pid is None else (redis_pid,),
    )


# -- the run ------------------------------------------------------------------------------


def run(
    settings: Settings | None = None,
    env: Environment | None = None,
    log: Callable[[str], None] = print,
    redis_port: int | None = None,
    redis: tuple[int, int] | None = None,
) -> Report:
    """Measure everything in `settings` against one redis-server of our own.

    `redis` is the (port, pid) of a server already running (the suite's);
    otherwise one is started on `redis_port` (a free one by default) and
    stopped when the run ends.
    """
    settings = settings or Settings()
    env = env or prepare(settings, log)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if redis is None:
            redis = stack.enter_context(
                _support.redis_server(env.redis_server, port=redis_port, prefix=env.redis_pin)
            )
        port, pid = redis
        log(f"redis-server {env.redis_version} on {HOST}:{port} (pid {pid})")
        result = _run_worker(env, settings, port, pid)
        http_rows = _run_http(env, settings, port, pid, log) if env.http is not None else []
    rows = _rows(result.get("cells", []))
    return Report(
        rows=rows,
        commands=result.get("commands", {}),
        probes=result.get("probes", {}),
        errors=result.get("errors", {}),
        breaker=result.get("breaker"),
        http=http_rows,
        versions={**env.versions, **result.get("versions", {})},
        seconds=time.monotonic() - started,
    )


def _run_worker(env: Environment, settings: Settings, port: int, pid: int) -> dict[str, Any]:
    """Run `_redis_worker.py` in the bench venv, pinned to CPU 0; return its JSON result."""
    spec = {
        "port": port,
        "redis_pid": pid,
        "subjects": list(settings.subjects),
        "concurrencies": list(settings.concurrencies),
        "rounds": settings.rounds,
        "duration": settings.duration,
        "warmup": settings.warmup,
        "quiet_wait": settings.quiet_wait,
        # A cell is measured again when others used more than this ("never" without retry).
        "disturbed": DISTURBED if settings.retry else 1e9,
        "retry_until": _support.retry_until,
        "count_decisions": settings.count_decisions,
        "breaker_seconds": settings.breaker_seconds,
        "breaker_requests": settings.breaker_requests,
        "loop": settings.loop,
    }
    with tempfile.TemporaryDirectory(prefix="redis_decisions-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        # The repository root stays off sys.path (as for the HTTP apps): the venv's
        # editable install is what imports `ratelimit`.
        cmd = [*env.worker_pin, str(env.python), str(WORKER), str(spec_path), str(result_path)]
        subprocess.run(cmd, cwd=_support.HERE, env=_support.child_env(), check=True)
        data: dict[str, Any] = json.loads(result_path.read_text())
        return data


def _run_http(
    env: Environment, settings: Settings, port: int, pid: int, log: Callable[[str], None]
) -> list[http_overhead.Row]:
    """The HTTP variants under uvicorn and wrk, interleaved by round, via http_overhead."""
    assert env.http is not None
    hsettings = _http_settings(settings, pid)
    variants = [HTTP_BY_NAME[name] for name in settings.http_variants]
    previous = os.environ.get(URL_VARIABLE)
    os.environ[URL_VARIABLE] = f"redis://{HOST}:{port}/0"  # the servers inherit it
    try:
        return http_overhead.measure_variants(
            env.http,
            hsettings,
            variants,
            lambda v: env.versions.get(v.package, "?"),
            log,
            label="http ",
        )
    finally:
        if previous is None:
            os.environ.pop(URL_VARIABLE, None)
        else:
            os.environ[URL_VARIABLE] = previous


def _rows(cells: list[dict[str, Any]]) -> list[Row]:
    """Medians over rounds per (subject, concurrency), in the order first measured."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for c in cells:
        grouped.setdefault((c["subject"], c["concurrency"]), []).append(c)
    rows = []
    for (subject, concurrency), got in grouped.items():
        ok = [c for c in got if not c["error"]]
        if not ok:
            rows.append(Row(subject, concurrency, 0, 0, 0, 0, 0, 0, 0, got[0]["error"]))
            continue
        rates = [c["decisions"] / c["elapsed"] for c in ok]
        rows.append(
            Row(
                subject=subject,
                concurrency=concurrency,
                rate=statistics.median(rates),
                rate_min=min(rates),
                rate_max=max(rates),
                p50_us=statistics.median(c["p50_us"] for c in ok),
                p99_us=statistics.median(c["p99_us"] for c in ok),
                refused=sum(c["refused"] for c in ok),
                disturbed=sum(c["others"] > DISTURBED for c in ok),
                failed_rounds=len(got) - len(ok),
                failure=next((c["error"] for c in got if c["error"]), None),
            )
        )
    return rows


# -- the section --------------------------------------------------------------------------


def _row(report: Report, subject: str, concurrency: int) -> Row | None:
    return next(
        (
            r
            for r in report.rows
            if r.subject == subject and r.concurrency == concurrency and r.error is None
        ),
        None,
    )


def best_peer(report: Report, concurrency: int) -> Row | None:
    """The peer with the most decisions/s at `concurrency`."""
    peers = [
        r
        for r in report.rows
        if r.concurrency == concurrency
        and r.error is None
        and BY_NAME.get(r.subject, Subject("", "", "")).group == "peer"
    ]
    return max(peers, key=lambda r: r.rate, default=None)


def _sent(report: Report, subject: str) -> str:
    """Commands the client sent per decision, e.g. `1 EVALSHA` (MONITOR)."""
    counts = report.commands.get(subject, {}).get("sent", {})
    return _commands(counts, skip=("HELLO", "CLIENT")) or "-"


def _scripted(report: Report, subject: str) -> str:
    """Commands run per decision as INFO commandstats counts them (inside scripts too)."""
    counts = report.commands.get(subject, {}).get("commandstats", {})
    return _commands(counts, skip=("hello", "client")) or "-"


def _commands(counts: dict[str, float], skip: Sequence[str]) -> str:
    parts = []
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if name in skip or n < 0.005:
            continue
        parts.append(f"{n:.2f}".rstrip("0").rstrip(".") + f" {name}")
    return ", ".join(parts)


def _us(value: float) -> str:
    return f"{value:,.0f} µs" if value >= 100 else f"{value:.1f} µs"


def targets(report: Report) -> list[tuple[str, str, str]]:
    """(target, measured, met) for each of issue 3's targets this run can judge."""
    out: list[tuple[str, str, str]] = []
    sent = {s: report.commands.get(s, {}).get("sent", {}) for s in BY_NAME}
    one = [
        ("RedisBackend.decide bucket", 1, "bucket"),
        ("RedisBackend.decide bucket+lease", 1, "bucket+lease on one server (2 slots, 1 call)"),
        ("RedisBackend.decide bucket+lease split by slot", 2, "split by slot (2 slots)"),
    ]
    measured, met = [], True
    for subject, want, label in one:
        if subject not in report.commands:
            continue
        counts = {k: v for k, v in sent[subject].items() if k not in ("HELLO", "CLIENT")}
        got = counts.get("EVALSHA", 0.0)
        ok = abs(got - want) < 0.01 and sum(counts.values()) - got < 0.01
        met = met and ok
        measured.append(f"{label}: {_commands(counts, ()) or 'nothing'}")
    if measured:
        out.append(
            (
                "Exactly one `EVALSHA` per decision per hash slot (nothing else sent)",
                "; ".join(measured),
                _met(met),
            )
        )
    ours1, floor1 = _row(report, OURS, 1), _row(report, FLOOR_EVALSHA, 1)
    if ours1 and floor1 and floor1.p50_us:
        ratio = ours1.p50_us / floor1.p50_us
        out.append(
            (
                f"Concurrency 1: p50 within {TARGET_P50_RATIO}x of redis-py's trivial `EVALSHA`",
                f"{_us(ours1.p50_us)} vs {_us(floor1.p50_us)}: {ratio:.2f}x",
                _met(ratio <= TARGET_P50_RATIO),
            )
        )
    ours32, peer32 = _row(report, OURS, 32), best_peer(report, 32)
    if ours32 and peer32 and peer32.rate:
        ratio = ours32.rate / peer32.rate
        out.append(
            (
                f"Concurrency 32: at least {TARGET_PEER_RATIO:g}x the decisions/s of the best peer",
                f"{ours32.rate:,.0f}/s vs {peer32.subject} {peer32.rate:,.0f}/s: {ratio:.2f}x",
                _met(ratio >= TARGET_PEER_RATIO),
            )
        )
    by_http = {r.variant: r for r in report.http}
    # Judged twice: the bucket alone is like for like with the peers (rate limits only);
    # the bucket plus a concurrency slot is two script calls per request, and no peer has it.
    for name, what in (
        ("ratelimit-redis-bucket", "bucket, like the peers"),
        (HTTP_OURS, "token bucket + concurrency slot (decide + release: 2 calls)"),
    ):
        row = by_http.get(name)
        if row is None or row.ratio is None:
            continue
        out.append(
            (
                f"HTTP (uvicorn, 1 worker, wrk): {TARGET_HTTP_RATIO}x bare's req/s or more: {what}",
                f"{row.ratio:.2f}x ({row.rps:,.0f} req/s)",
                _met(row.ratio >= TARGET_HTTP_RATIO and row.errors == 0),
            )
        )
    b = report.breaker
    if b:
        added = b["asgi_open_us"] - b["asgi_bare_us"]
        out.append(
            (
                f"Redis dead, breaker open: under {TARGET_DEAD_US:g} µs added per request",
                f"`decide()` {_us(b['decide_mean_us'])} mean (p50 {_us(b['decide_p50_us'])}, "
                f"p99 {_us(b['decide_p99_us'])}, probes included); through the middleware "
                f"(fail open) +{_us(added)} per request",
                _met(max(added, b["decide_mean_us"]) < TARGET_DEAD_US),
            )
        )
    return out


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(report: Report, env: Environment, settings: Settings, command: str) -> str:
    """The markdown section: targets, decisions, commands, breaker, HTTP, how it was measured."""
    conc = settings.concurrencies
    lines = [
        "## Redis: decisions per second and latency, beside the peers",
        "",
        "One process, one event loop, one local redis-server: each library takes rate-limit "
        "decisions for callers that never reach their limit. *Concurrency 32* is 32 asyncio "
        "tasks on the loop (32 threads for slowapi, which is synchronous), each deciding for "
        "its own caller; latency is per decision, as the caller waits for it.",
        "",
        "| target (issue 3) | measured | |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {t} | {m} | {ok} |" for t, m, ok in targets(report)]
    lines += ["", _decision_table(report, conc), ""]
    lines += [
        "*vs EVALSHA*: p50 over redis-py's trivial `EVALSHA` p50 at concurrency 1; "
        "*vs best peer*: decisions/s over the best peer's at the same concurrency "
        "(the floor rows are no limiters: they show the room above the peers). "
        "*Sent* is what the client wrote per decision (from `MONITOR`); the commands each "
        "run in Redis, scripts included, are below.",
        "",
    ]
    lines += _notes(report)
    lines += ["", *_commands_table(report), ""]
    lines += _breaker_lines(report)
    if report.http:
        lines += ["", *_http_lines(report, env, settings)]
    lines += ["", *_method_lines(report, env, settings, command)]
    return "\n".join(lines)


def _decision_table(report: Report, concurrencies: Sequence[int]) -> str:
    head = "| subject | sent per decision |"
    rule = "| --- | --- |"
    for c in concurrencies:
        head += f" c={c} decisions/s | c={c} p50 | c={c} p99 |"
        rule += " ---: | ---: | ---: |"
    head += " c=1 p50 vs EVALSHA |" + "".join(f" c={c} vs best peer |" for c in concurrencies)
    rule += " ---: |" * (1 + len(concurrencies))
    out = [head, rule]
    floor1 = _row(report, FLOOR_EVALSHA, 1)
    best = {c: best_peer(report, c) for c in concurrencies}
    measured = {r.subject for r in report.rows}
    for s in SUBJECTS:
        if s.name not in measured:
            continue
        name = f"**{s.name}**" if s.group == "ours" else s.name
        line = f"| {name} | {_sent(report, s.name)} |"
        for c in concurrencies:
            r = next((r for r in report.rows if r.subject == s.name and r.concurrency == c), None)
            if r is None:
                line += " - | - | - |"
            elif r.error:
                line += " failed | | |"
            else:
                flag = " (limit reached!)" if r.refused else ""
                if r.failed_rounds:
                    flag += f" ({r.failed_rounds} round(s) failed)"
                line += f" {r.rate:,.0f}{flag} | {_us(r.p50_us)} | {_us(r.p99_us)} |"
        r1 = _row(report, s.name, 1)
        vs_floor = f"{r1.p50_us / floor1.p50_us:.2f}" if r1 and floor1 and floor1.p50_us else "-"
        line += f" {vs_floor} |"
        for c in concurrencies:
            rc, bc = _row(report, s.name, c), best[c]
            line += f" {rc.rate / bc.rate:.2f} |" if rc and bc and bc.rate else " - |"
        out.append(line)
    return "\n".join(out)


def _notes(report: Report) -> list[str]:
    out = []
    for s in SUBJECTS:
        if not any(r.subject == s.name for r in report.rows) and s.name not in report.errors:
            continue
        text = f"- **{s.name}**: {s.what}"
        if s.note:
            text += f". {s.note[0].upper()}{s.note[1:]}"
        probe = report.probes.get(s.name)
        if probe is not None and probe != [True, False]:
            text += f". **Probe failed**: two decisions under 1/minute gave {probe}"
        error = report.errors.get(s.name) or next(
            (r.error for r in report.rows if r.subject == s.name and r.error), None
        )
        if error:
            text += f". **Failed**: `{error}`"
        for r in report.rows:
            if r.subject == s.name and r.failed_rounds:
                text += (
                    f". At c={r.concurrency}, {r.failed_rounds} round(s) **failed** "
                    f"(`{r.failure}`); the numbers are of the other rounds"
                )
        out.append(text + ".")
    out.append(
        "- No peer has a concurrency limit (a lease held while a request runs): "
        "the bucket+lease and bucket+concurrency rows have no like-for-like peer."
    )
    return out


def _commands_table(report: Report) -> list[str]:
    out = [
        "Redis commands per decision, counted over "
        "a few hundred decisions after a warm-up (script loading excluded):",
        "",
        "| subject | sent by the client (`MONITOR`) | run in Redis (`INFO commandstats` "
        "deltas, scripts' calls included) | Redis time per decision |",
        "| --- | --- | --- | ---: |",
    ]
    for s in SUBJECTS:
        got = report.commands.get(s.name)
        if got is not None:
            server = got.get("server_us")
            out.append(
                f"| {s.name} | {_sent(report, s.name)} | {_scripted(report, s.name)} "
                f"| {'-' if server is None else _us(server)} |"
            )
    out += [
        "",
        "*Redis time* is what `INFO commandstats` reports for the commands the client sent "
        "(a script's time includes its calls): the server's share of a decision's latency.",
    ]
    return out


def _breaker_lines(report: Report) -> list[str]:
    b = report.breaker
    if not b:
        error = report.errors.get("breaker")
        return [f"Redis dead: not measured ({error})."] if error else []
    added_open = b["asgi_open_us"] - b["asgi_bare_us"]
    added_closed = b["asgi_closed_us"] - b["asgi_bare_us"]
    return [
        "Redis dead (a loopback port nobody listens on), breaker open (defaults: 3 failures, "
        "1 s pause, then one probe):",
        "",
        "| path | p50 | p99 | mean | |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| `RedisBackend.decide` raising `BackendUnavailable` | {_us(b['decide_p50_us'])} | "
        f"{_us(b['decide_p99_us'])} | {_us(b['decide_mean_us'])} | {b['calls']:,} calls in "
        f"{b['seconds']:.1f} s, {b['probes']} probe(s) let through |",
        f"| middleware, fail open (200), in-process ASGI | | | {_us(b['asgi_open_us'])} | "
        f"+{_us(added_open)} over the bare app ({_us(b['asgi_bare_us'])}) |",
        f"| middleware, fail closed (503), in-process ASGI | | | {_us(b['asgi_closed_us'])} | "
        f"+{_us(added_closed)} over the bare app |",
    ]


def _http_lines(report: Report, env: Environment, settings: Settings) -> list[str]:
    out = [
        "Over HTTP: the same Starlette endpoint bare and behind each limiter on this Redis, "
        "with a limit never reached (*vs best peer*: req/s over the best peer's):",
        "",
    ]
    out += http_overhead.table(report.http, HTTP_PEERS)
    out.append("")
    out += [f"- **{r.variant}**: {r.description}" for r in report.http]
    return out


def _method_lines(report: Report, env: Environment, settings: Settings, command: str) -> list[str]:
    v = report.versions
    names = ("limits", "coredis", "slowapi", "fastapi-limiter", "throttled-py", "pyrate-limiter")
    peers = ", ".join(f"{d} {v[d]}" for d in names if d in v)
    client = ", ".join(f"{d} {v[d]}" for d in ("redis", "hiredis") if d in v)
    pin = (
        "the worker and uvicorn on CPU 0, redis-server and wrk on CPU 1 (`taskset`)"
        if env.worker_pin
        else "none (`taskset` missing or one core)"
    )
    disturbed = sum(r.disturbed for r in report.rows) + sum(r.disturbed for r in report.http)
    lines = [
        f"- Command: `{command}` ({report.seconds:.0f} s)",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Code measured: {env.code} (surgelimit {v.get('surgelimit', '?')})",
        *_support.machine_lines(),
        f"- Redis: redis-server {env.redis_version} started by the script on a free loopback "
        'port (`--save "" --appendonly no`), stopped by PID; clients: ' + client,
        f"- Peers: {peers}",
        f"- Event loop: {settings.loop} (the worker and every HTTP server, every subject "
        "alike). " + _LOOP_NOTE,
        f"- Decisions: {settings.rounds} interleaved round(s) (each starts one subject later); "
        f"per cell a fresh client, {settings.warmup} s warm-up, then {settings.duration} s "
        "measured; decisions/s, p50 and p99 are medians over rounds",
        f"- Limits: {100_000:,}/s per caller (never reached; a refusal would be flagged), "
        "and each limiter first shows it decides: under 1/minute, a caller's second "
        "decision is refused",
    ]
    if report.http and env.http is not None:
        h = env.http
        lines += [
            f"- HTTP: uvicorn `{' '.join(h.server_options)}`, {h.wrk_version} "
            f"`-t1 -c{settings.http_connections} -d{settings.http_duration}s --latency`, "
            f"{settings.http_rounds} interleaved round(s), a fresh server per run, each first "
            "checked to answer 429 on a 1/minute path; *vs bare* is the median of each round's "
            "ratio; our apps fail closed, so a Redis failure would show as errors",
        ]
    lines += [
        f"- Pinning: {pin}",
        f"- Noise: each cell waits up to {settings.quiet_wait:g} s for the machine to be quiet; "
        f"one during which other processes used over {DISTURBED} of a core "
        + ("is measured once more" if settings.retry else "is kept (quick run: no retry)")
        + f" ({disturbed} cell(s) disturbed in the tables)",
    ]
    return lines


_LOOP_NOTE = (
    "uvloop is what uvicorn runs on whenever it is installed (`uvicorn[standard]`); "
    "`--loop asyncio` measures the standard loop."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run, print the section and write it to RESULTS.md."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.redis_decisions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="~90 s: one short round")
    parser.add_argument("--duration", type=float, help="seconds measured per cell (default 0.8)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    parser.add_argument("--subjects", help="comma-separated subset of: " + ", ".join(BY_NAME))
    parser.add_argument(
        "--http-variants",
        help="comma-separated subset of: " + ", ".join(HTTP_BY_NAME) + " ('' for none)",
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), help="event loop (uvloop)")
    parser.add_argument("--port", type=int, help="port for the redis-server this run starts")
    parser.add_argument("--fresh-venvs", action="store_true", help="recreate the bench venv")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave RESULTS.md alone"
    )
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    overrides: dict[str, Any] = {}
    if args.duration is not None:
        overrides["duration"] = args.duration
    if args.rounds is not None:
        overrides["rounds"] = overrides["http_rounds"] = args.rounds
    if args.loop:
        overrides["loop"] = args.loop
    if args.subjects:
        overrides["subjects"] = _support.pick(parser, args.subjects, BY_NAME, "subjects")
    if args.http_variants is not None:
        overrides["http_variants"] = _support.pick(
            parser, args.http_variants, HTTP_BY_NAME, "HTTP variants"
        )
    settings = replace(settings, **overrides, fresh_venvs=args.fresh_venvs)
    env = prepare(settings)
    report = run(settings, env, redis_port=args.port)
    argv_text = shlex.join(sys.argv[1:] if argv is None else list(argv))
    command = f"python -m benchmarks.redis_decisions {argv_text}".strip()
    section = render(report, env, settings, command)
    print()
    print(section)
    _support.OUT.mkdir(exist_ok=True)
    raw = {"settings": asdict(settings), "report": asdict(report)}
    (_support.OUT / "redis_decisions.json").write_text(json.dumps(raw, indent=1, default=str))
    if not args.no_write:
        _support.write_section(SECTION, section)
        print(f"\nwrote {_support.RESULTS.relative_to(_support.REPO)}")
    invalid = any(r.refused or r.error or r.failed_rounds for r in report.rows)
    invalid = invalid or any(r.errors for r in report.http)
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
