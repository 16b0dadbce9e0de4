"""Fixtures that start real servers on free loopback ports and stop them by PID.

`redis_server` is one `redis-server` for the whole session; `redis_url` hands a
test that server's URL after `FLUSHALL`. Fault tests take `private_redis`, a
server of their own that they may stop and restart freely. `redis_cluster` is
a real 3-master Redis Cluster for the session (three `redis-server
--cluster-enabled yes` joined by `redis-cli --cluster create`), and
`redis_cluster_url` its seed URL with every master emptied. Without the
`redis-server` (or `redis-cli`) binary these fixtures skip, saying how to
install it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ratelimit.backends.base import LeaseCheck
from ratelimit.backends.redis import RedisBackend
from ratelimit.backends.redis.scripts import Script, load_scripts

__all__ = [
    "ManualClockRedisBackend",
    "ManualClockRedisClusterBackend",
    "RedisClusterServers",
    "RedisServer",
    "asleep",
    "debug_redis",
    "debug_sleep",
    "private_redis",
    "redis_cluster",
    "redis_cluster_url",
    "redis_server",
    "redis_url",
    "require_redis_server",
    "start_redis",
]

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
_START_TIMEOUT = 10.0


def require_redis_server() -> str:
    """The redis-server binary, or skip the test saying how to get one."""
    if REDIS_SERVER is None:
        _missing("redis-server is not installed (apt-get install redis-server)")
    assert REDIS_SERVER is not None
    return REDIS_SERVER


def require_redis_cli() -> str:
    """The redis-cli binary (to create a cluster), or skip the test saying how to get one."""
    if REDIS_CLI is None:
        _missing("redis-cli is not installed (apt-get install redis-tools)")
    assert REDIS_CLI is not None
    return REDIS_CLI


def _missing(reason: str) -> None:
    if os.environ.get("RATELIMIT_REQUIRE_REDIS"):  # CI: a missing server is a failure
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free loopback port P whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one command over a fresh connection; return the raw reply (for setup only)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(65536)


class RedisServer:
    """A `redis-server` subprocess on a loopback port, without persistence."""

    def __init__(self, binary: str, port: int | None = None, *options: str) -> None:
        self.binary = binary
        self.port = free_port() if port is None else port
        self.dir = tempfile.mkdtemp(prefix="ratelimit-redis-")
        #: Extra redis-server arguments, e.g. ("--requirepass", "secret").
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_socket(self) -> str:
        """The server also listens on this unix socket."""
        return os.path.join(self.dir, "redis.sock")

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": self.dir,
            "loglevel": "warning",
            "unixsocket": self.unix_socket,
            "unixsocketperm": "700",
        }
        argv = [self.binary]
        for name, value in options.items():
            argv += (f"--{name}", value)
        argv += self.options
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server on port {self.port} exited: {err.strip()}")
            with contextlib.suppress(OSError):
                reply = command(self.port, "PING", timeout=0.2)
                if reply.startswith((b"+PONG", b"-NOAUTH")):  # up (maybe asking for AUTH)
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def stop(self) -> None:
        """Stop the server (SIGTERM to its PID, then SIGKILL) and wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: no shutdown, connections simply die."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> None:
        """Stop and start on the same port: a fresh server, with no state and no scripts."""
        self.stop()
        self.start()

    def info(self, field: str) -> Any:
        """One field of INFO (ints parsed), e.g. "total_connections_received"."""
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0) as client:
            return client.info("everything")[field]

    def flushall(self) -> None:
        reply = command(self.port, "FLUSHALL")
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL failed: {reply!r}")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(*options: str) -> RedisServer:
    """A started server of the caller's own (close() it); retries if its port was taken."""
    binary = require_redis_server()
    for attempt in range(3):
        server = RedisServer(binary, None, *options)
        try:
            server.start()
        except RuntimeError:
            server.close()
            if attempt == 2:
                raise
        else:
            return server
    raise AssertionError("unreachable")


class RedisClusterServers:
    """A real Redis Cluster on loopback: `masters` redis-servers, slots split among them."""

    def __init__(self, masters: int = 3) -> None:
        self.binary = require_redis_server()
        self.cli = require_redis_cli()
        self.nodes: list[RedisServer] = []
        self.masters = masters

    @property
    def url(self) -> str:
        """A seed URL naming every node (any one would do: the client discovers the rest)."""
        return "redis://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        """Start the nodes, join them with `redis-cli --cluster create`, wait for state ok."""
        for _ in range(self.masters):
            port = free_cluster_port()
            node = RedisServer(self.binary, port)
            node.options = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", os.path.join(node.dir, f"nodes-{port}.conf"),
                "--cluster-node-timeout", "2000",
            )  # fmt: skip
            self.nodes.append(node)
            node.start()
        create = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout!r}")
        deadline = time.monotonic() + 30
        while not all(
            b"cluster_state:ok" in command(n.port, "CLUSTER", "INFO") for n in self.nodes
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def node_of(self, key: str) -> RedisServer:
        """The node serving `key`'s slot (the others answer MOVED)."""
        for node in self.nodes:
            if not command(node.port, "EXISTS", key).startswith(b"-MOVED"):
                return node
        raise LookupError(f"no node serves {key!r}")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A 3-master Redis Cluster on free loopback ports for the session, stopped by PID."""
    cluster = RedisClusterServers()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    """The session cluster's seed URL, every master emptied (FLUSHALL) for this test."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole test session (pid in `.pid`, stopped at the end)."""
    server = start_redis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied (FLUSHALL) for this test."""
    if redis_server.proc is None:  # a test stopped it: bring it back
        redis_server.start()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop, kill or restart in fault tests."""
    server = start_redis()
    try:
        yield server
    finally:
        server.close()


# -- a Redis backend on a manual clock ---------------------------------------------

#: The test clock prelude: scripts read "now" from a key the test sets.
MANUAL_CLOCK_LUA = (Path(__file__).parent / "manual_clock.lua").read_text(encoding="utf-8")
CLOCK_KEY = "ratelimit-test:clock"
TTL_KEY = "ratelimit-test:ttl"


class ManualClockRedisBackend(RedisBackend):
    """The Redis backend running its own scripts on tests/manual_clock.lua, not TIME."""

    scripts = load_scripts(clock=MANUAL_CLOCK_LUA)

    async def set_time(self, micros: int) -> None:
        """Set the scripts' clock to `micros` microseconds since the epoch."""
        sec, usec = divmod(micros, 1_000_000)
        await self.client.set(CLOCK_KEY, f"{sec} {usec}")


#: The cluster's test clock prelude: clock keys carry the hash tag of the call's keys.
MANUAL_CLOCK_CLUSTER_LUA = (Path(__file__).parent / "manual_clock_cluster.lua").read_text(
    encoding="utf-8"
)
_TAG = re.compile(r"\{[^}]*\}")


class ManualClockRedisClusterBackend(RedisBackend):
    """The cluster backend on a manual clock (tests/manual_clock_cluster.lua).

    A script may touch only keys of its own slot, so the clock lives in one
    key per hash tag; before each call the backend writes the current time to
    the clock key of that call's slot (test only: a second round trip).
    """

    scripts = load_scripts(clock=MANUAL_CLOCK_CLUSTER_LUA)

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, cluster=True, **options)
        self.micros = 0
        call = self.guard.call

        async def clocked(
            script: Script, keys: list[str], args: list[str], packed: bytes | None = None
        ) -> Any:
            match = _TAG.search(keys[0])
            assert match is not None
            sec, usec = divmod(self.micros, 1_000_000)
            await self.client.set(f"{CLOCK_KEY}:{match.group()}", f"{sec} {usec}")
            return await call(script, keys, args, packed)

        self.guard.call = clocked  # type: ignore[method-assign]

    async def set_time(self, micros: int) -> None:
        """Set the scripts' clock to `micros` microseconds since the epoch."""
        self.micros = micros

    def post_release(self, lease: LeaseCheck) -> bool:
        """Never posted: the clock of a release's slot is set before each awaited call."""
        return False

    async def asked_ttl_ms(self, key: str) -> int | None:
        """The ttl (ms) the scripts last asked for on `key`, or None."""
        value = await self.client.hget(TTL_KEY, key)
        return None if value is None else int(value)


@contextlib.contextmanager
def uvicorn_app(app: str, *options: str, probe: str = "/state") -> Iterator[tuple[str, int]]:
    """A real uvicorn serving `app` (a `tests/apps` module path) on a free loopback port,
    with `options`; yields (base url, server pid) once `probe` answers, stops it by PID."""
    import sys

    import httpx

    root = Path(__file__).resolve().parents[1]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{root / 'tests'}{os.pathsep}{root}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--host", "127.0.0.1",
         "--log-level", "warning", *options],
        env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}{probe}", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("uvicorn did not start") from None
                time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # still serving a test's stuck request
            proc.kill()
            proc.wait(timeout=5)


def asleep(port: int) -> bool:
    """Whether Redis is busy (a PING gets no answer within 50 ms)."""
    try:
        command(port, "PING", timeout=0.05)
    except TimeoutError:
        return True
    return False


@pytest.fixture
def debug_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own that accepts DEBUG SLEEP."""
    server = start_redis("--enable-debug-command", "yes")
    try:
        yield server
    finally:
        server.close()


async def debug_sleep(server: RedisServer, seconds: float) -> asyncio.Future[bytes]:
    """Start DEBUG SLEEP from another client; return once Redis is asleep. The future is
    answered when Redis answers again."""
    sleeping = asyncio.ensure_future(
        asyncio.to_thread(command, server.port, "DEBUG", "SLEEP", repr(seconds), timeout=10)
    )
    deadline = time.monotonic() + 5.0
    while not asleep(server.port):
        assert time.monotonic() < deadline, "Redis never fell asleep"
        await asyncio.sleep(0.005)
    return sleeping
