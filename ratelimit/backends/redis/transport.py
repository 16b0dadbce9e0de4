"""How script calls reach Redis: pipelined connections of our own, or a redis-py client.

`PipelinedTransport` is the default: script calls share one long-lived
connection per event loop (a `lane.Lane`), written in batches and answered in
order. Many concurrent decisions then share round trips instead of paying one
each, Redis works while the process builds the next batch, and no connection is
opened while under load. The connection notices at once when the server closes
it (a restart), so the next call reconnects instead of failing on a stale socket.

`cluster.ClusterTransport` does the same on a Redis Cluster: one pipelined
connection per node, each call sent to the node serving its keys' slot.

`ClientTransport` sends calls through a redis-py client, one call per pooled
connection: a client passed in by the user (`Redis` or `RedisCluster`, which
routes calls and follows redirects itself), and TLS URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from redis import exceptions as rx
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import parse_url

from ..._errors import ConfigError
from .lane import ASKING, PING, Done, Lane, retrieve, running_loop
from .resp import pack, pack_script_call
from .scripts import Script


class Transport(Protocol):
    """Runs one script call and returns its raw reply; raises redis-py exceptions.

    `packed`, when given, is that same `EVALSHA` already in RESP bytes
    (`pack_script_call`): a caller that makes the same call again and again may
    pack it once; a transport that writes no raw RESP ignores it.
    """

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        packed: bytes | None = None,
    ) -> Any: ...

    def send(self, packed: bytes) -> asyncio.Future[Any] | None:
        """A packed `EVALSHA` (`pack_script_call`) put on a live connection at once: the
        future gets its raw reply, errors (NOSCRIPT included) as they come. None when
        no connection is at hand: await `evalsha`, which connects and reloads."""
        ...

    def post(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        done: Done,
        packed: bytes | None = None,
    ) -> bool:
        """Send the same call without waiting for it: `done(reply, error)` gets the answer.

        False, having sent nothing, when it cannot be sent at once (no live
        connection): the caller then awaits `evalsha` instead.
        """
        ...

    async def aclose(self) -> None: ...


class AwaitedOnly:
    """For transports whose every call is awaited: none is sent or posted ahead."""

    def send(self, packed: bytes) -> asyncio.Future[Any] | None:
        """Never (see `Transport.send`): await `evalsha`."""
        return None

    def post(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        done: Done,
        packed: bytes | None = None,
    ) -> bool:
        """Never (see `Transport.post`): await `evalsha`."""
        return False


class ClientTransport(AwaitedOnly):
    """Script calls through a redis-py client (one server, or a cluster) and its connections.

    redis-py writes its own commands and answers only the caller that awaits.
    """

    def __init__(self, client: Redis | RedisCluster) -> None:
        self.client = client

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        packed: bytes | None = None,
    ) -> Any:
        """EVALSHA; on NOSCRIPT (the server lost its scripts) EVAL the source once.

        EVAL goes where the EVALSHA went (on a cluster, the node of the keys'
        slot), loading the script there: each node reloads what it lost.
        """
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except rx.NoScriptError:
            return await self.client.eval(script.source, len(keys), *keys, *args)

    async def aclose(self) -> None:
        """Nothing to close: the client belongs to whoever made it."""


#: Seconds a host name lookup may take. The lookup runs on a thread, whose answer a busy
#: event loop may see late; it happens once per host and again only after a failed connect.
_RESOLVE_TIMEOUT = 1.0


class PipelinedTransport:
    """Script calls pipelined on one connection per event loop (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        connect_timeout: float,
        lane: Callable[[asyncio.AbstractEventLoop, float], Lane] | None = None,
        scripts: Sequence[Script] = (),
    ) -> None:
        #: Builds the connection's protocol (a subscriber's lane takes pushed messages).
        self._lane_factory = lane
        #: SCRIPT LOAD of each script, sent first on every new connection (see `Lane`).
        self._loads = tuple(pack("SCRIPT", "LOAD", script.source) for script in scripts)
        try:
            params: dict[str, Any] = dict(parse_url(url))
        except ValueError as exc:
            raise ConfigError("url", f"a redis:// or unix:// URL ({exc})", url) from None
        self.path: str | None = params.pop("path", None)
        self.host: str = params.pop("host", "localhost")
        self.port: int = params.pop("port", 6379)
        self.db = int(params.pop("db", 0) or 0)
        self.username: str | None = params.pop("username", None)
        self.password: str | None = params.pop("password", None)
        params.pop("connection_class", None)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._addresses: list[tuple[int, Any]] = []
        self._lane: Lane | None = None
        self._connecting: asyncio.Task[Lane] | None = None
        #: True while `aclose` waits for answers: no new connection is opened meanwhile.
        self._closing = False

    @staticmethod
    def supports(url: str) -> bool:
        """Whether this transport can serve `url` (TLS goes through redis-py instead)."""
        return url.startswith(("redis://", "unix://"))

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        packed: bytes | None = None,
        *,
        asking: bool = False,
    ) -> Any:
        """EVALSHA in the next batch (see `lane.BATCH`); on NOSCRIPT, EVAL the source once.

        `asking` sends ASKING right before it, in the same write (a cluster's
        ASK redirect: the slot is migrating to this node).
        """
        lane = self._live()
        if lane is None:
            if self._closing:  # no new connection for a transport being closed
                raise rx.ConnectionError("Redis connection closed by the client")
            lane = await self._connect()
        try:
            if asking:
                lane.call(ASKING).add_done_callback(retrieve)
            if packed is None:
                packed = pack_script_call("EVALSHA", script.sha, keys, args)
            return await lane.call(packed)
        except rx.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # The server lost its scripts again (a SCRIPT FLUSH after the lane's reload): load
        # them all, not only this one, so a release posted next meets no NOSCRIPT and is
        # not re-sent behind a later decision; EVAL runs this call whatever comes between.
        if self._loads and not asking:
            lane.load_scripts(self._loads).add_done_callback(retrieve)
        if asking:
            lane.call(ASKING).add_done_callback(retrieve)
        return await lane.call(pack_script_call("EVAL", script.source, keys, args))

    def send(self, packed: bytes) -> asyncio.Future[Any] | None:
        """`packed` in the next batch (see `Transport.send`)."""
        lane = self._live()
        return None if lane is None else lane.call(packed)

    def post(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        done: Done,
        packed: bytes | None = None,
    ) -> bool:
        """EVALSHA in the next batch, answered to `done` (see `Transport.post`).

        No future and no waiting task: `done` runs as the reply is read. A
        NOSCRIPT reply goes to `done` like any error (the caller may retry
        through `evalsha`, which reloads the script).
        """
        lane = self._live()
        if lane is None:
            return False
        if packed is None:
            packed = pack_script_call("EVALSHA", script.sha, keys, args)
        lane.post(packed, done)
        return True

    def _live(self) -> Lane | None:
        """The connection, if it is open and belongs to the running event loop."""
        lane = self._lane
        if lane is None or lane.broken or lane.loop is not running_loop():
            return None
        return lane

    async def aclose(self) -> None:
        """Close the connection once calls already made are answered (posted ones too,
        within the timeout); calls made meanwhile fail with ConnectionError. A later
        call opens a new connection."""
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
        lane, self._lane = self._lane, None
        if lane is None:
            return
        self._closing = True
        try:
            # Replies come in order: once this one is back, every earlier call is (a call
            # re-sent after a NOSCRIPT may come after it: then once more).
            for _ in range(3):
                if not (lane.pending and not lane.broken and lane.loop is running_loop()):
                    break
                with contextlib.suppress(rx.RedisError):
                    await lane.call(PING)
        finally:  # cancelled too: the socket is closed, never left behind
            self._closing = False
            lane.close()

    async def _connect(self) -> Lane:
        """The live lane, connecting it once however many callers are waiting."""
        loop = asyncio.get_running_loop()
        task = self._connecting
        if task is None or task.get_loop() is not loop:
            task = self._connecting = loop.create_task(self._open(loop))
            # Callers may all be cancelled: the outcome is still retrieved, never logged.
            task.add_done_callback(retrieve)
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> Lane:
        old, self._lane = self._lane, None
        if old is not None:
            old.close()  # broken already, or bound to another (perhaps closed) loop
        try:
            sock = await self._dial(loop)
        except OSError as exc:
            raise rx.ConnectionError(f"Error connecting to {self._where()}: {exc}") from exc
        # The set-up calls (AUTH, SELECT, loading every script: Redis compiles each) are
        # part of connecting: they get the connect budget, the lane's calls its timeout.
        factory = partial(self._lane_factory or Lane, loop, max(self.timeout, self.connect_timeout))
        if self.path is not None:
            _, lane = await loop.create_unix_connection(factory, sock=sock)
        else:
            _, lane = await loop.create_connection(factory, sock=sock)
        # AUTH and SELECT are the first calls on the lane: its deadline covers them.
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            await self._handshake(lane, pack("AUTH", *auth))
        if self.db:
            await self._handshake(lane, pack("SELECT", str(self.db)))
        if self._loads:
            # Before any call: a fresh server (first start, restart, failover) knows no
            # script, and a NOSCRIPT retried later would run after calls made meanwhile.
            await self._handshake(lane, lane.load_scripts(self._loads))
        lane.timeout = self.timeout
        self._lane = lane
        return lane

    async def _dial(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """A connected non-blocking socket: each resolved address in turn, as asyncio does."""
        if self.path is not None:
            return await self._dial_one(loop, socket.AF_UNIX, self.path)
        addresses = self._addresses or await self._resolve(loop)
        error: OSError = OSError(f"{self.host} did not resolve")
        for family, address in addresses:
            try:  # a refusal tries the next address; a timeout (not an OSError) stops
                return await self._dial_one(loop, family, address)
            except OSError as exc:
                error = exc
        self._addresses = []  # resolve again next time: the server may have moved
        raise error

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, Any]]:
        """The host's addresses; an IP literal needs no lookup (no thread, no delay)."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM),
                max(self.connect_timeout, _RESOLVE_TIMEOUT),
            )
            self._addresses = [(family, address) for family, _, _, _, address in infos]
        else:
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            self._addresses = [(family, (self.host, self.port))]
        return self._addresses

    async def _dial_one(
        self, loop: asyncio.AbstractEventLoop, family: int, address: Any
    ) -> socket.socket:
        """Connect one socket within `connect_timeout`.

        At the deadline the kernel is asked whether the socket connected, so a
        connection that completed while this event loop was busy still counts.
        """
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            status = sock.connect_ex(address)
            if status not in (0, errno.EINPROGRESS, errno.EAGAIN):
                raise OSError(status, os.strerror(status))
            if status != 0:
                await self._writable(loop, sock)
            status = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if status:
                raise OSError(status, os.strerror(status))
            try:
                sock.getpeername()
            except OSError:
                raise rx.TimeoutError(f"Timeout connecting to {self._where()}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _writable(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """Wait until `sock` is writable (connected or failed) or the connect deadline."""
        done = loop.create_future()

        def wake() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_writer(sock, wake)
        timer = loop.call_later(self.connect_timeout, wake)
        try:
            await done
        finally:
            loop.remove_writer(sock)
            timer.cancel()

    async def _handshake(self, lane: Lane, command: bytes | asyncio.Future[Any]) -> None:
        try:
            await (lane.call(command) if isinstance(command, bytes) else command)
        except BaseException:
            lane.close()
            raise

    def _where(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"
