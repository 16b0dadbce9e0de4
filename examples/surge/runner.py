"""Run the image API under uvicorn in a child process, and play a trace against it.

The server runs in its own process (or `workers` processes) so the load
generator and the service do not share an event loop: a slow service cannot
slow the arrivals down, and the client's clock measures the service alone.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from .client import Outcome, RetryPolicy, Tally, generate
from .trace import Arrival

#: The repository root: the child runs from here so `examples.imagegen` imports.
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(wanted: int = 8192) -> None:
    """Allow enough open sockets for a thousand hanging requests (children inherit it)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Server:
    """`uvicorn --factory examples.imagegen.app:from_env` on a free loopback port.

    `protect` puts the rate limiter in front; `redis_url` shares its state in
    Redis under `redis_prefix`; `workers` processes split `gpus` between them.
    Output goes to `log`. Used as an async context manager: ready on entry,
    stopped (terminated, then killed) on exit.
    """

    def __init__(
        self,
        *,
        protect: bool,
        gpus: int,
        log: Path,
        workers: int = 1,
        redis_url: str | None = None,
        redis_prefix: str = "imagegen",
    ) -> None:
        if workers < 1 or gpus % workers:
            raise ValueError(f"{gpus} GPUs cannot be split evenly between {workers} workers")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.workers = workers
        self._env = {
            **os.environ,
            "IMAGEGEN_PROTECT": "1" if protect else "0",
            "IMAGEGEN_GPUS": str(gpus // workers),
            "IMAGEGEN_REDIS_URL": redis_url or "",
            "IMAGEGEN_REDIS_PREFIX": redis_prefix,
        }
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The uvicorn command line."""
        cmd = [
            sys.executable, "-m", "uvicorn", "examples.imagegen.app:from_env", "--factory",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", "warning", "--no-access-log",
            # Longer than the client's 5 s keep-alive, so a reused connection is never
            # closed under a request by the server (which would show up as an error).
            "--timeout-keep-alive", "20",
        ]  # fmt: skip
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        return cmd

    def start(self) -> None:
        """Spawn uvicorn (a fork and exec: quick, and done before any load is sent)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self._process = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: workers stop with it
            )

    async def __aenter__(self) -> Server:
        self.start()
        try:
            await self._wait_ready(timeout=30.0)
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _wait_ready(self, timeout: float) -> None:
        """Poll `GET /v1/models` until every worker could answer."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"the server exited with {self._process.returncode}; see {self.log}:\n"
                        + self.log.read_text(errors="replace")[-2000:]
                    )
                try:
                    if (await client.get("/v1/models")).status_code == 200:
                        if self.workers > 1:
                            await asyncio.sleep(1.0)  # the other workers start alike
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        """Terminate the server's process group; kill it if it lingers."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            # Unfinished generations hold a graceful shutdown up: stop it hard.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5.0)
        except ProcessLookupError:
            pass


@dataclass(slots=True)
class Run:
    """What the clients saw in one run of the trace."""

    label: str
    outcomes: list[Outcome]
    #: Seconds from the start of the trace to the last answer.
    elapsed: float
    #: How late the load generator's event loop woke up (seconds), sampled every 50 ms.
    loop_lag: list[float] = field(default_factory=list)


async def _watch_lag(samples: list[float], every: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + every
        await asyncio.sleep(every)
        samples.append(max(0.0, loop.time() - expected))


async def _report_progress(
    tally: Tally, clock: Callable[[], float], every: float, say: Callable[[str], None]
) -> None:
    while True:
        await asyncio.sleep(every)
        say(
            f"  {clock():5.1f} s  attempts {tally.sent:5d}  served {tally.served:5d}  "
            f"refused {tally.refused:5d}  timed out {tally.timeouts:5d}  "
            f"errors {tally.errors:4d}  waiting {tally.in_flight:5d}"
        )


async def play(
    label: str,
    base_url: str,
    trace: list[Arrival],
    policy: RetryPolicy,
    *,
    seed: int,
    progress_every: float = 0.0,
    say: Callable[[str], None] = print,
) -> Run:
    """Send every arrival at its time (open loop) and wait for all of them to end."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    tally = Tally()
    lag: list[float] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    # The per-attempt deadline is the client's own (RetryPolicy.timeout); httpx's is a backstop.
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=policy.timeout + 5.0
    ) as client:
        t0 = loop.time()

        def clock() -> float:
            return loop.time() - t0

        watchers = [asyncio.create_task(_watch_lag(lag))]
        if progress_every > 0:
            watchers.append(
                asyncio.create_task(_report_progress(tally, clock, progress_every, say))
            )
        tasks: list[asyncio.Task[Outcome]] = []
        try:
            for arrival in trace:
                delay = arrival.at - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(
                    asyncio.create_task(
                        generate(client, arrival, policy, clock=clock, rng=rng, tally=tally)
                    )
                )
            outcomes = list(await asyncio.gather(*tasks))
        finally:
            for task in [*tasks, *watchers]:
                task.cancel()
            await asyncio.gather(*tasks, *watchers, return_exceptions=True)
        elapsed = clock()
    return Run(label, outcomes, elapsed, lag)
