"""What a limiter costs per HTTP request: req/s and p99 of one app, bare and behind each limiter.

Every variant serves the same Starlette handler (benchmarks/apps/) with a
limit on the benchmarked path that is never reached, under the same uvicorn
(1 worker, same loop and HTTP parser), driven by `wrk` over loopback. Runs are
interleaved round by round and each variant's median is reported, because a
2-core machine is noisy; uvicorn and wrk are pinned to different cores when
`taskset` exists. The table goes to this script's section of RESULTS.md.

    python -m benchmarks.http_overhead            # ~4 minutes
    python -m benchmarks.http_overhead --quick    # ~40 seconds
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from . import _support

SECTION = "http_overhead"
APPS = _support.HERE / "apps"
#: Must match benchmarks/apps/_common.py (the apps run in other venvs; no import).
PATH = "/hello"
PROBE = "/probe"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Variant:
    """One app under test: its module in benchmarks/apps, the venv it runs in, what it is."""

    name: str
    app: str
    venv: str
    #: The distribution whose version the table shows.
    package: str
    description: str
    #: Whether the app limits anything (all but the bare baseline).
    limited: bool = True


def _project_name() -> str:
    m = re.search(r'^name\s*=\s*"([^"]+)"', (_support.REPO / "pyproject.toml").read_text(), re.M)
    return m.group(1) if m else "ratelimit"


VARIANTS: tuple[Variant, ...] = (
    Variant("bare", "bare:app", "bench", "starlette", "Starlette, no limiter", limited=False),
    Variant(
        "bare-again",
        "bare:app",
        "bench",
        "starlette",
        "the bare app again, an A/A control: its ratio to bare is this run's noise",
        limited=False,
    ),
    Variant(
        "noop-middleware",
        "noop_middleware:app",
        "bench",
        "starlette",
        "a pure ASGI middleware that only calls the app: the floor of any middleware",
        limited=False,
    ),
    Variant(
        "ratelimit",
        "ours:app",
        "bench",
        _project_name(),
        "RateLimitMiddleware: TokenBucket per client IP + Concurrency(10000) global, memory",
    ),
    Variant(
        "ratelimit-bucket",
        "ours_bucket:app",
        "bench",
        _project_name(),
        "RateLimitMiddleware: TokenBucket per client IP only (like for like with the peers)",
    ),
    Variant(
        "ratelimit-no-headers",
        "ours_noheaders:app",
        "bench",
        _project_name(),
        "RateLimitMiddleware(headers=False): TokenBucket per client IP only "
        "(like for like with the peers, which send no header fields)",
    ),
    Variant(
        "slowapi",
        "slowapi_app:app",
        "bench",
        "slowapi",
        "Limiter(get_remote_address), @limiter.limit, fixed window, memory:// "
        "(no concurrency limit)",
    ),
    Variant(
        "asgi-ratelimit",
        "asgi_ratelimit_app:app",
        "asgi-ratelimit",
        "asgi-ratelimit",
        "RateLimitMiddleware, MemoryBackend, Rule(second=...) per IP (no concurrency limit)",
    ),
)
BY_NAME = {v.name: v for v in VARIANTS}
#: Variants that limit nothing: the baseline and its controls.
CONTROLS = tuple(v.name for v in VARIANTS if not v.limited)
#: The variant whose ratio the summary quotes, every variant of ours the verdict
#: judges, and the peers they must beat.
OURS = "ratelimit"
OUR_VARIANTS = ("ratelimit", "ratelimit-bucket", "ratelimit-no-headers")
PEERS = ("slowapi", "asgi-ratelimit")
TARGET_RATIO = 0.95
DISTURBED = _support.DISTURBED


@dataclass(frozen=True)
class Settings:
    """How long and how hard to measure."""

    duration: int = 4
    warmup: int = 1
    rounds: int = 5
    connections: int = 32
    threads: int = 1
    variants: tuple[str, ...] = tuple(v.name for v in VARIANTS)
    fresh_venvs: bool = False
    #: Use uvloop and httptools when every venv has them (they do: requirements.txt);
    #: False forces the pure-Python asyncio + h11 server, where a limiter's share is smaller.
    fast_server: bool = True
    #: Seconds to wait for a quiet machine before each run, and whether a disturbed
    #: run is measured once more.
    quiet_wait: float = 10.0
    retry: bool = True
    #: In-process timing (`_inprocess_worker.py`): calls per round, and rounds.
    inprocess_requests: int = 20_000
    inprocess_rounds: int = 5
    #: Processes that serve the app too (a Redis server): their CPU is part of the
    #: system measured, not a disturbance.
    helper_pids: tuple[int, ...] = ()

    @classmethod
    def quick(cls) -> Settings:
        """About 40 seconds: fewer, shorter rounds (a smoke run; the ratios are rougher)."""
        return cls(
            duration=2,
            rounds=2,
            quiet_wait=1.0,
            retry=False,
            inprocess_requests=5_000,
            inprocess_rounds=3,
        )


@dataclass(frozen=True)
class Sample:
    """One wrk run against one fresh server."""

    round: int
    rps: float
    p99_ms: float
    requests: int
    #: Non-2xx responses plus socket errors: must be 0 (no limit may be reached).
    errors: int
    #: CPU seconds the server used during the measured run.
    server_cpu: float
    #: Cores' worth of CPU used meanwhile by processes other than the server and wrk.
    others: float

    @property
    def per_cpu(self) -> float:
        """Requests per CPU-second of the server: its cost per request, robust to CPU theft."""
        return self.requests / self.server_cpu if self.server_cpu > 0 else 0.0


@dataclass(frozen=True)
class Row:
    """One variant's result over all rounds."""

    variant: str
    description: str
    version: str
    rps: float
    rps_min: float
    rps_max: float
    p99_ms: float
    #: Median over rounds of this variant's req/s over the bare run of the same round.
    ratio: float | None
    #: Median requests per server CPU-second, and its ratio to bare like `ratio`.
    per_cpu: float
    per_cpu_ratio: float | None
    errors: int
    #: Runs still disturbed by other processes after one retry.
    disturbed: int
    samples: tuple[Sample, ...] = field(repr=False)
    #: CPU microseconds per request called in-process (no server), and what that adds to
    #: the bare app measured in the same process; None when not measured.
    inprocess_us: float | None = None
    added_us: float | None = None


@dataclass(frozen=True)
class Environment:
    """Everything prepared once per run: interpreters, tools, server options, versions."""

    pythons: dict[str, Path]
    wrk: str
    server_options: tuple[str, ...]
    server_pin: tuple[str, ...]
    load_pin: tuple[str, ...]
    versions: dict[str, dict[str, str]]
    wrk_version: str
    #: The commit of this repository measured, with a note if ratelimit/ had local changes.
    code: str


def prepare(
    settings: Settings,
    log: Callable[[str], None] = print,
    venvs_needed: Sequence[str] = (),
) -> Environment:
    """Create the venvs the chosen variants need, find wrk and taskset, pick server options.

    `venvs_needed` adds venvs for variants defined elsewhere (redis_decisions').
    """
    venvs = _support.standard_venvs()
    needed = sorted({BY_NAME[name].venv for name in settings.variants} | set(venvs_needed))
    pythons = {
        name: _support.ensure_venv(venvs[name], fresh=settings.fresh_venvs) for name in needed
    }
    wrk = _support.ensure_tool("wrk")
    # The same server options for every variant: uvloop/httptools only if every venv has them.
    fast = settings.fast_server and all(
        _support.python_can_import(py, ["uvloop", "httptools"]) for py in pythons.values()
    )
    server_options = (
        "--workers", "1", "--no-access-log", "--log-level", "warning",
        "--loop", "uvloop" if fast else "asyncio",
        "--http", "httptools" if fast else "h11",
    )  # fmt: skip
    server_pin, load_pin = _support.pin(0), _support.pin(1)
    pinned = bool(server_pin)
    wanted = ["uvicorn", "uvloop", "httptools", "starlette", "limits"]
    versions = {}
    for name in settings.variants:
        v = BY_NAME[name]
        versions[name] = _support.versions(pythons[v.venv], [v.package, *wanted])
    probe = subprocess.run([wrk, "-v"], capture_output=True, text=True)
    wrk_version = (
        (probe.stdout + probe.stderr).strip().splitlines()[0]
        if probe.stdout + probe.stderr
        else "wrk"
    )
    log(f"server: uvicorn {' '.join(server_options)}; pinning: {'yes' if pinned else 'no'}")
    return Environment(
        pythons,
        wrk,
        server_options,
        server_pin,
        load_pin,
        versions,
        wrk_version.split(" [")[0],
        _support.code_revision("ratelimit"),
    )


# -- one measurement -----------------------------------------------------------


def _start_server(
    env: Environment, variant: Variant, port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    """Start uvicorn for `variant` on `port`, pinned to its core.

    The working directory and `--app-dir` are benchmarks/apps, so the
    repository root (and our `ratelimit/`) is not on the server's `sys.path`.
    """
    cmd = [
        *env.server_pin,
        str(env.pythons[variant.venv]), "-m", "uvicorn", variant.app,
        "--app-dir", str(APPS), "--host", HOST, "--port", str(port),
        *env.server_options,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        return subprocess.Popen(
            cmd, cwd=APPS, env=_support.child_env(), stdout=log, stderr=subprocess.STDOUT
        )


def _get(url: str) -> int:
    """Status code of a GET to `url` (HTTP errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_ready(
    proc: subprocess.Popen[bytes],
    port: int,
    log_path: Path,
    *,
    limited: bool,
    timeout: float = 30.0,
) -> None:
    """Wait until the benchmarked path answers 200, then check the limiter is really on.

    `PROBE` allows one request a minute in every limited variant: a second
    request must be refused with 429, or the variant would be measuring nothing.
    """
    base = f"http://{HOST}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}"
            )
        try:
            if _get(base + PATH) == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"server not ready after {timeout:.0f}s:\n{log_path.read_text()[-2000:]}"
            )
        time.sleep(0.05)
    got = _get(base + PROBE), _get(base + PROBE)
    want = (200, 429) if limited else (200, 200)
    if got != want:
        raise RuntimeError(f"{PROBE} answered {got}, want {want}: is the limiter in the path?")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(output: str) -> tuple[float, float, int, int]:
    """(req/s, p99 in ms, requests, errors) from `wrk --latency` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    total = re.search(r"^\s*(\d+) requests in", output, re.M)
    if not (rps and p99 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return (
        float(rps.group(1)),
        float(p99.group(1)) * _UNITS[p99.group(2)],
        int(total.group(1)),
        errors,
    )


def _wrk(env: Environment, settings: Settings, port: int, seconds: int) -> str:
    cmd = [
        *env.load_pin, env.wrk, f"-t{settings.threads}", f"-c{settings.connections}",
        f"-d{seconds}s", "--latency", f"http://{HOST}:{port}{PATH}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return result.stdout


def measure_once(env: Environment, settings: Settings, variant: Variant, rnd: int) -> Sample:
    """Start a fresh server for `variant`, check it, warm it up, measure it, stop it."""
    _support.OUT.mkdir(exist_ok=True)
    log_path = _support.OUT / f"http_overhead-{variant.app.split(':')[0]}.log"
    _support.wait_for_quiet(max_wait=settings.quiet_wait)
    port = _support.free_port()
    proc = _start_server(env, variant, port, log_path)
    try:
        _wait_ready(proc, port, log_path, limited=variant.limited)
        if settings.warmup > 0:
            _wrk(env, settings, port, settings.warmup)
        # CPU accounting around the measured run: the server's own CPU time, wrk's
        # (a reaped child), and the whole machine's, to see what else ran meanwhile.
        server0, busy0, wrk0 = _support.process_cpu_seconds(proc.pid), *_cpu_now()
        helpers0 = sum(_support.process_cpu_seconds(pid) for pid in settings.helper_pids)
        started = time.monotonic()
        output = _wrk(env, settings, port, settings.duration)
        elapsed = time.monotonic() - started
        server1, busy1, wrk1 = _support.process_cpu_seconds(proc.pid), *_cpu_now()
        helpers1 = sum(_support.process_cpu_seconds(pid) for pid in settings.helper_pids)
        if proc.poll() is not None:
            raise RuntimeError(
                f"{variant.name} server died during the run:\n{log_path.read_text()[-2000:]}"
            )
    finally:
        _support.stop_process(proc)
    rps, p99, requests, errors = parse_wrk(output)
    server_cpu = server1 - server0
    helpers = helpers1 - helpers0
    others = max(0.0, (busy1 - busy0) - server_cpu - (wrk1 - wrk0) - helpers) / elapsed
    return Sample(rnd, rps, p99, requests, errors, server_cpu, others)


def _cpu_now() -> tuple[float, float]:
    """(busy CPU seconds of the machine, CPU seconds of our reaped children)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return _support.cpu_busy_seconds(), children.ru_utime + children.ru_stime


# -- the benchmark -------------------------------------------------------------


def run(
    settings: Settings | None = None,
    env: Environment | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Measure every variant in `settings`, interleaved by round; one row per variant."""
    settings = settings or Settings()
    env = env or prepare(settings, log)
    variants = [BY_NAME[name] for name in settings.variants]
    rows = measure_variants(
        env, settings, variants, lambda v: env.versions.get(v.name, {}).get(v.package, "?"), log
    )
    costs = measure_in_process(env, settings, variants, log)
    return [replace(r, **costs.get(r.variant, {})) for r in rows]


def measure_in_process(
    env: Environment,
    settings: Settings,
    variants: Sequence[Variant],
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """CPU per request of each variant's app called in-process, and what it adds to bare.

    One worker process per venv times its variants and a bare app side by side
    (`_inprocess_worker.py`), so each limiter is compared with bare in its own
    interpreter: the limiter's own cost, without a server, sockets or wrk.
    """
    by_venv: dict[str, list[Variant]] = {}
    for v in variants:
        by_venv.setdefault(v.venv, []).append(v)
    out: dict[str, dict[str, float]] = {}
    for venv, group in by_venv.items():
        modules = ["bare", *(v.app.split(":")[0] for v in group if v.limited)]
        _support.wait_for_quiet(max_wait=settings.quiet_wait)
        result = subprocess.run(
            [
                str(env.pythons[venv]),
                str(_support.HERE / "_inprocess_worker.py"),
                str(settings.inprocess_requests),
                str(settings.inprocess_rounds),
                *modules,
            ],
            cwd=APPS,
            env=_support.child_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"in-process timing in {venv} failed:\n{result.stderr[-2000:]}")
        us = json.loads(result.stdout)
        for v in group:
            if not v.limited and v.name != "bare":
                continue  # controls: the floor they show is the server's, not in-process
            mine = us[v.app.split(":")[0]]
            out[v.name] = {"inprocess_us": mine, "added_us": mine - us["bare"]}
            log(f"in-process  {v.name:<24} {mine:6.2f} us/request (+{mine - us['bare']:.2f})")
    return out


def measure_variants(
    env: Environment,
    settings: Settings,
    variants: Sequence[Variant],
    version_of: Callable[[Variant], str],
    log: Callable[[str], None] = print,
    label: str = "",
) -> list[Row]:
    """`variants` interleaved by round (`_support.interleaved`); one row per variant.

    Ratios are to the "bare" variant of the same round, when it is among them.
    """
    by_name = {v.name: v for v in variants}

    def describe(s: Sample) -> str:
        flag = f"  ({s.errors} errors!)" if s.errors else ""
        return f"{s.rps:>9.0f} req/s  p99 {s.p99_ms:6.2f} ms  {s.per_cpu:>7.0f} req/CPU-s{flag}"

    samples = _support.interleaved(
        list(by_name),
        settings.rounds,
        lambda name, rnd: measure_once(env, settings, by_name[name], rnd),
        lambda s: s.others,
        describe,
        log,
        label,
        retry=settings.retry,
    )
    bare = {s.round: s for s in samples.get("bare", [])}
    rows = []
    for name, got in samples.items():
        v = by_name[name]
        rates = [s.rps for s in got]
        ratios = [s.rps / bare[s.round].rps for s in got if s.round in bare]
        cpu_ratios = [
            s.per_cpu / bare[s.round].per_cpu
            for s in got
            if s.round in bare and bare[s.round].per_cpu
        ]
        rows.append(
            Row(
                variant=name,
                description=v.description,
                version=version_of(v),
                rps=statistics.median(rates),
                rps_min=min(rates),
                rps_max=max(rates),
                p99_ms=statistics.median(s.p99_ms for s in got),
                ratio=statistics.median(ratios) if ratios else None,
                per_cpu=statistics.median(s.per_cpu for s in got),
                per_cpu_ratio=statistics.median(cpu_ratios) if cpu_ratios else None,
                errors=sum(s.errors for s in got),
                disturbed=sum(s.others > DISTURBED for s in got),
                samples=tuple(got),
            )
        )
    return rows


def verdict(rows: Sequence[Row]) -> str | None:
    """Whether each of our variants meets the target: >= 0.95 of bare, ahead of every peer.

    Every variant of ours is judged, not only `OURS`: the issue's app has a limit
    never reached, which the bucket-only rows match like for like. In-process
    costs are compared too: they rank the limiters without the server's noise.
    """
    by = {r.variant: r for r in rows}
    peers = [by[p] for p in PEERS if p in by and by[p].ratio is not None]
    best = max(peers, key=lambda p: p.rps, default=None)
    cheapest = min(
        (p for p in peers if p.added_us is not None), key=lambda p: p.added_us or 0.0, default=None
    )
    lines = []
    for name in OUR_VARIANTS:
        ours = by.get(name)
        if ours is None or ours.ratio is None:
            continue
        meets = ours.ratio >= TARGET_RATIO
        text = (
            f"- {name}: {ours.ratio:.2f}x bare, target >= {TARGET_RATIO:.2f} "
            f"**{'met' if meets else 'not met'}**"
        )
        if best is not None:
            ahead = all(ours.rps > p.rps for p in peers)
            text += (
                f"; ahead of every peer over HTTP: **{'yes' if ahead else 'no'}** "
                f"(best peer {best.variant} at {best.ratio or 0:.2f}x)"
            )
        if cheapest is not None and ours.added_us is not None and cheapest.added_us is not None:
            cheaper = ours.added_us < cheapest.added_us
            text += (
                f"; in-process it adds {ours.added_us:.2f} µs per request, "
                f"{'less' if cheaper else 'more'} than the cheapest peer "
                f"({cheapest.variant}, {cheapest.added_us:.2f} µs)"
            )
        lines.append(text + ".")
    return "\n".join(lines) if lines else None


def render(rows: Sequence[Row], env: Environment, settings: Settings, command: str) -> str:
    """The markdown section: table, verdict, what each variant is, how it was measured."""
    lines = [
        "## HTTP overhead: one app, bare and behind each limiter",
        "",
        "Requests/s and p99 latency of the same Starlette endpoint under uvicorn, bare and",
        "behind each limiter with a limit on the path that is never reached: the cost of the",
        "limiter alone. *req/CPU-s* is requests per CPU-second of the server process, the same",
        "cost seen without the noise of whatever else the machine ran. *vs best peer* is",
        "req/s over the best peer's median req/s. *In-process µs/request* is the CPU one",
        "request costs when the app is called directly, with no server (the fastest of",
        "several rounds); *added µs* is that minus the bare app's in the same process:",
        "the limiter's own cost, free of server and machine noise.",
        "",
    ]
    lines += table(rows, PEERS)
    lines.append("")
    v = verdict(rows)
    if v:
        lines += [v, ""]
    bad = [r.variant for r in rows if r.errors]
    if bad:
        lines += [f"**Invalid:** non-2xx responses or socket errors in {', '.join(bad)}.", ""]
    lines += [f"- **{r.variant}**: {r.description}" for r in rows]
    lines.append("")
    any_versions = next(iter(env.versions.values()), {})
    stack = ", ".join(
        f"{k} {any_versions[k]}"
        for k in ("uvicorn", "uvloop", "httptools", "starlette")
        if k in any_versions
    )
    pin = (
        "uvicorn pinned to CPU 0 and wrk to CPU 1 with `taskset`"
        if env.server_pin
        else "no CPU pinning (`taskset` missing or one core)"
    )
    disturbed = sum(r.disturbed for r in rows)
    lines += [
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Code measured: {env.code}",
        *_support.machine_lines(),
        f"- Server: uvicorn `{' '.join(env.server_options)}` for every variant ({stack})",
        f"- Load: {env.wrk_version} `-t{settings.threads} -c{settings.connections} "
        f"-d{settings.duration}s --latency` over loopback, after a {settings.warmup} s warm-up, "
        "a fresh server per run",
        f"- Rounds: {settings.rounds}, interleaved (each round runs every variant once, starting "
        "one place later than the last); req/s, p99 and req/CPU-s are medians over rounds; "
        "*vs bare* is the median of each round's ratio to that round's bare run",
        f"- Pinning: {pin}",
        f"- Noise: each run waits up to {settings.quiet_wait:g} s for the machine to be quiet; "
        f"a run during which other processes used over {DISTURBED} of a core "
        + ("is measured once more" if settings.retry else "is kept (quick run: no retry)")
        + f" ({disturbed} run(s) disturbed in the table)",
        "- Every limited server is first checked to refuse a second request to a 1/minute path "
        "with 429, so a limiter that is not in the request path cannot look fast",
        f"- In-process: `benchmarks/_inprocess_worker.py`, {settings.inprocess_requests:,} calls "
        f"per round, {settings.inprocess_rounds} rounds interleaved, the fastest kept; the scope "
        "uvicorn builds for wrk's request; the same 429 check first",
        "- The code under test runs from venvs the script creates (benchmarks/.venv-*); "
        "asgi-ratelimit in one of its own, since it installs a top-level `ratelimit` module",
    ]
    return "\n".join(lines)


def best_peer(rows: Sequence[Row], peers: Sequence[str]) -> Row | None:
    """The peer row with the most req/s (error-free), if any peer was measured."""
    measured = [r for r in rows if r.variant in peers and not r.errors]
    return max(measured, key=lambda r: r.rps, default=None)


def table(rows: Sequence[Row], peers: Sequence[str]) -> list[str]:
    """The markdown table of `rows`: req/s, p99, ratios to bare and to the best of `peers`."""
    best = best_peer(rows, peers)
    out = [
        "| variant | version | req/s (median) | req/s (min-max) | p99 (median) | vs bare "
        "| vs best peer | req/CPU-s | vs bare | in-process µs/request | added µs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        limited = r.variant not in CONTROLS
        vs_peer = _ratio(r.rps / best.rps if best and best.rps and limited else None)
        bad = f" ({r.errors} errors!)" if r.errors else ""
        out.append(
            f"| {r.variant}{bad} | {r.version} | {r.rps:,.0f} | {r.rps_min:,.0f}-{r.rps_max:,.0f} "
            f"| {r.p99_ms:.2f} ms | {_ratio(r.ratio)} | {vs_peer} "
            f"| {r.per_cpu:,.0f} | {_ratio(r.per_cpu_ratio)} "
            f"| {_us(r.inprocess_us)} | {_us(r.added_us, sign=True)} |"
        )
    return out


def _us(value: float | None, *, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run, print the table and write it to RESULTS.md."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="~40 s: 2 rounds of 2 s")
    parser.add_argument("--duration", type=int, help="seconds of load per run (default 4)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up load per run (default 1)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    parser.add_argument("--connections", type=int, help="wrk connections (default 32)")
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(BY_NAME)}")
    parser.add_argument("--fresh-venvs", action="store_true", help="recreate the benchmark venvs")
    parser.add_argument(
        "--pure-python-server",
        action="store_true",
        help="run uvicorn with --loop asyncio --http h11 instead of uvloop/httptools",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave RESULTS.md alone"
    )
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    overrides = {
        k: getattr(args, k)
        for k in ("duration", "warmup", "rounds", "connections")
        if getattr(args, k) is not None
    }
    if args.variants:
        overrides["variants"] = _support.pick(parser, args.variants, BY_NAME, "variants")
    settings = replace(
        settings,
        **overrides,
        fresh_venvs=args.fresh_venvs,
        fast_server=not args.pure_python_server,
    )
    started = time.monotonic()
    env = prepare(settings)
    rows = run(settings, env)
    argv_text = shlex.join(sys.argv[1:] if argv is None else list(argv))
    command = f"python -m benchmarks.http_overhead {argv_text}".strip()
    section = render(rows, env, settings, command)
    print()
    print(section)
    _support.OUT.mkdir(exist_ok=True)
    raw = {"settings": asdict(settings), "rows": [asdict(r) for r in rows]}
    (_support.OUT / "http_overhead.json").write_text(json.dumps(raw, indent=2, default=str))
    if not args.no_write:
        _support.write_section(SECTION, section)
        where = _support.RESULTS.relative_to(_support.REPO)
        print(f"\nwrote {where} in {time.monotonic() - started:.0f} s")
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
