"""How script calls reach Redis: one pipelined connection, or a redis-py client.

`PipelinedTransport` is the default. Script calls share one long-lived
connection, each still its own `EVALSHA`: a call finding Redis with nothing of
ours to do is written at once, and calls made while Redis works are written
together, eight at a time or at the end of the loop turn (`_BATCH`); replies
come back in order and are matched to their callers as they arrive, inside the
protocol's `data_received`. Many concurrent decisions then share round trips
instead of paying one each, Redis works while the process builds the next
batch, and no connection is opened while under load. The connection notices at once when
the server closes it (a restart), so the next call reconnects instead of
failing on a stale socket.

A call times out when its reply has not arrived `timeout` seconds after its
bytes were written. Replies that arrived are always processed before the
timer is checked (I/O callbacks run before timers in each loop turn), so a
stalled event loop never times out a call that Redis answered in time.

`ClusterTransport` does the same on a Redis Cluster: one pipelined connection
per node, each call sent to the node serving its keys' slot. The slot map comes
from redis-py's `RedisCluster` (discovery, `CLUSTER SLOTS`, refreshes), which
never carries a script call itself: its one-connection-per-call model would
open hundreds of connections in a surge, and time calls out on a stalled
event loop, turning load into failures.

`ClientTransport` sends calls through a redis-py client, one call per pooled
connection: a client passed in by the user (`Redis` or `RedisCluster`, which
routes calls and follows redirects itself), and TLS URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import random
import socket
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, cast
from urllib.parse import quote

from redis import exceptions as rx
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import parse_url

from ..._errors import ConfigError
from .scripts import Script

_HiredisReader: Any
try:
    from hiredis import Reader as _HiredisReader
except ImportError:  # pragma: no cover - hiredis is an optional extra
    _HiredisReader = None

logger = logging.getLogger("ratelimit")


#: What a posted call's answer goes to: (reply, None), or (None, the error).
Done = Callable[[Any, "BaseException | None"], None]


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


class _AwaitedOnly:
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


class ClientTransport(_AwaitedOnly):
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


def pack(*parts: str | bytes) -> bytes:
    """One command in the Redis protocol (RESP2)."""
    texts = [part for part in parts if isinstance(part, str)]
    if len(texts) == len(parts):
        out = [f"*{len(texts)}\r\n"]
        for text in texts:
            out.append(f"${len(text)}\r\n{text}\r\n")
        command = "".join(out)
        if command.isascii():  # the common case: lengths in characters are lengths in bytes
            return command.encode()
    chunks = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        chunks.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(chunks)


def pack_script_call(command: str, script: str, keys: Sequence[str], args: Sequence[str]) -> bytes:
    """`command script numkeys *keys *args` (EVALSHA or EVAL) in RESP2, as `pack` would.

    Every decision is one of these, so it is `pack` without the generality: one
    f-string per part and one join (twice as fast as `pack` for a bucket's call).
    """
    n = str(len(keys))
    out = [
        f"*{3 + len(keys) + len(args)}\r\n${len(command)}\r\n{command}\r\n"
        f"${len(script)}\r\n{script}\r\n${len(n)}\r\n{n}\r\n"
    ]
    for part in keys:
        out.append(f"${len(part)}\r\n{part}\r\n")
    for part in args:
        out.append(f"${len(part)}\r\n{part}\r\n")
    text = "".join(out)
    if text.isascii():  # lengths in characters are lengths in bytes
        return text.encode()
    return pack(command, script, n, *keys, *args)


class PipelinedTransport:
    """Script calls pipelined on one connection per event loop (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        connect_timeout: float,
        lane: Callable[[asyncio.AbstractEventLoop, float], _Lane] | None = None,
        scripts: Sequence[Script] = (),
    ) -> None:
        #: Builds the connection's protocol (a subscriber's lane takes pushed messages).
        self._lane_factory = lane
        #: SCRIPT LOAD of each script, sent first on every new connection (see `_Lane`).
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
        self._lane: _Lane | None = None
        self._connecting: asyncio.Task[_Lane] | None = None
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
        """EVALSHA in the next batch (see `_BATCH`); on NOSCRIPT, EVAL the source once.

        `asking` sends ASKING right before it, in the same write (a cluster's
        ASK redirect: the slot is migrating to this node).
        """
        lane = self._lane
        if lane is None or lane.broken or lane.loop is not asyncio.get_running_loop():
            if self._closing:  # no new connection for a transport being closed
                raise rx.ConnectionError("Redis connection closed by the client")
            lane = await self._connect()
        try:
            if asking:
                lane.call(_ASKING).add_done_callback(_retrieve)
            if packed is None:
                packed = pack_script_call("EVALSHA", script.sha, keys, args)
            return await lane.call(packed)
        except rx.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # The server lost its scripts (restart, SCRIPT FLUSH): EVAL loads and runs it.
        if asking:
            lane.call(_ASKING).add_done_callback(_retrieve)
        return await lane.call(pack_script_call("EVAL", script.source, keys, args))

    def send(self, packed: bytes) -> asyncio.Future[Any] | None:
        """`packed` in the next batch (see `Transport.send`)."""
        lane = self._lane
        if lane is None or lane.broken or lane.loop is not asyncio.get_running_loop():
            return None
        return lane.call(packed)

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
        lane = self._lane
        if lane is None or lane.broken or lane.loop is not _running_loop():
            return False
        if packed is None:
            packed = pack_script_call("EVALSHA", script.sha, keys, args)
        lane.post(packed, done)
        return True

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
                if not (lane.pending and not lane.broken and lane.loop is _running_loop()):
                    break
                with contextlib.suppress(rx.RedisError):
                    await lane.call(_PING)
        finally:  # cancelled too: the socket is closed, never left behind
            self._closing = False
            lane.close()

    async def _connect(self) -> _Lane:
        """The live lane, connecting it once however many callers are waiting."""
        loop = asyncio.get_running_loop()
        task = self._connecting
        if task is None or task.get_loop() is not loop:
            task = self._connecting = loop.create_task(self._open(loop))
            # Callers may all be cancelled: the outcome is still retrieved, never logged.
            task.add_done_callback(_retrieve)
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Lane:
        old, self._lane = self._lane, None
        if old is not None:
            old.close()  # broken already, or bound to another (perhaps closed) loop
        try:
            sock = await self._dial(loop)
        except OSError as exc:
            raise rx.ConnectionError(f"Error connecting to {self._where()}: {exc}") from exc
        factory = partial(self._lane_factory or _Lane, loop, self.timeout)
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

    async def _handshake(self, lane: _Lane, command: bytes | asyncio.Future[Any]) -> None:
        try:
            await (lane.call(command) if isinstance(command, bytes) else command)
        except BaseException:
            lane.close()
            raise

    def _where(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"


_ASKING = pack("ASKING")
_PING = pack("PING")
#: Calls written together at the most. A loop turn of a busy server builds dozens of
#: decisions; written as one batch at the turn's end, Redis would sit idle while the
#: turn ran, then the server while Redis ran the batch. Batches of 8 overlap the two:
#: one uvicorn worker behind a Redis token bucket served 14-20 % more requests per
#: second (wrk -c32, 2 cores), and one process decided 65,000 -> 110,000 times a
#: second at concurrency 32, for about 0.9 us more CPU per call (more writes).
_BATCH = 8

#: Redirects one call may follow (a slot moves at most once or twice during a resharding).
_MAX_REDIRECTS = 5


class ClusterTransport(_AwaitedOnly):
    """Script calls on a Redis Cluster, pipelined on one connection per node.

    `client` is used for topology only: `initialize()` discovers the nodes
    and slots, `get_node_from_key` maps a call's first key to its node (every
    key of a call shares one slot), and `nodes_manager.initialize()` re-reads
    the map after a MOVED redirect or a failure to reach a node (a failover
    may have moved its slots). MOVED and ASK redirects are followed at once;
    CLUSTERDOWN is reported as `ClusterDownError` (the slot has no serving
    node: the store is unreachable for it). Releases are posted to their node;
    nothing is `send`-ed ahead, since a packed call names no node.
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        timeout: float,
        connect_timeout: float,
        username: str | None = None,
        password: str | None = None,
        scripts: Sequence[Script] = (),
    ) -> None:
        self.client = client
        self._scripts = tuple(scripts)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        auth = ""
        if password is not None:
            auth = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
        self._auth = auth
        self._nodes: dict[tuple[str, int], PipelinedTransport] = {}
        self._ready = False
        self._discovered = False
        self._refreshing: asyncio.Task[None] | None = None

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        packed: bytes | None = None,
    ) -> Any:
        """EVALSHA on the node serving `keys` (reloaded there on NOSCRIPT), following redirects."""
        if not self._ready:
            await self._refresh()
        node = self.client.get_node_from_key(keys[0])
        assert node is not None
        address = (node.host, int(node.port))
        asking = False
        for _ in range(_MAX_REDIRECTS):
            try:
                node_call = self._node(address).evalsha
                return await node_call(script, keys, args, packed, asking=asking)
            except rx.ResponseError as exc:
                kind, _, rest = str(exc).partition(" ")
                if kind == "CLUSTERDOWN":
                    raise rx.ClusterDownError(str(exc)) from None
                if kind not in ("MOVED", "ASK"):
                    raise
                _, _, target = rest.partition(" ")
                host, _, port = target.rpartition(":")
                address = (host or node.host, int(port))
                asking = kind == "ASK"
                if kind == "MOVED":  # the slot lives elsewhere now: re-read the map
                    self._ready = False
            except (rx.ConnectionError, rx.TimeoutError):
                self._ready = False  # a failover may have moved this node's slots
                raise
        raise rx.ClusterError(f"too many redirects for a call on {keys[0]!r}")

    def post(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        done: Done,
        packed: bytes | None = None,
    ) -> bool:
        """EVALSHA on the node serving `keys`, answered to `done` (see `Transport.post`).

        Only to a node already connected, with the slot map read: otherwise
        False. A MOVED or ASK reply goes to `done` as an error (retry through
        `evalsha`, which follows redirects).
        """
        if not self._ready:
            return False
        node = self.client.get_node_from_key(keys[0])
        if node is None:
            return False
        transport = self._nodes.get((node.host, int(node.port)))
        return transport is not None and transport.post(script, keys, args, done, packed)

    async def aclose(self) -> None:
        """Close every node's connection (the topology client is closed by its owner)."""
        refreshing, self._refreshing = self._refreshing, None
        if refreshing is not None and not refreshing.done():
            refreshing.cancel()
        nodes, self._nodes = self._nodes, {}
        for transport in nodes.values():
            await transport.aclose()

    async def any_node_url(self) -> str:
        """A `redis://` URL of one master (with credentials), for connections that need
        no particular slot: a subscription (PUBLISH reaches every node of a cluster)."""
        await self._refresh()
        nodes = self.client.get_primaries() or self.client.get_nodes()
        node = random.choice(nodes)
        host = f"[{node.host}]" if ":" in node.host else node.host
        return f"redis://{self._auth}{host}:{node.port}/0"

    def _node(self, address: tuple[str, int]) -> PipelinedTransport:
        transport = self._nodes.get(address)
        if transport is None:
            host, port = address
            host = f"[{host}]" if ":" in host else host
            transport = self._nodes[address] = PipelinedTransport(
                f"redis://{self._auth}{host}:{port}/0",
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
                scripts=self._scripts,
            )
        return transport

    async def _refresh(self) -> None:
        """(Re)read the slot map, once however many callers are waiting for it."""
        loop = asyncio.get_running_loop()
        task = self._refreshing
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._refreshing = loop.create_task(self._read_map())
            task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def _read_map(self) -> None:
        client = self.client
        # Discovery first (connects the client); later, a refresh of the slot map.
        reading = client.nodes_manager.initialize() if self._discovered else client.initialize()
        try:
            await asyncio.wait_for(reading, self.connect_timeout + self.timeout)
        except rx.RedisClusterException as exc:  # "cannot be connected": no node answered
            raise rx.ConnectionError(f"Redis Cluster unreachable: {exc}") from exc
        self._discovered = True
        self._ready = True


class _Lane(asyncio.Protocol):
    """One connection: commands written in batches (see `_BATCH`), replies matched in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.broken = False
        self._transport: asyncio.Transport | None = None
        self._reader: Any = (
            _HiredisReader(replyError=rx.ResponseError)
            if _HiredisReader is not None
            else RespReader()
        )
        self._waiting: deque[asyncio.Future[Any] | _Posted] = deque()
        #: The command of each waiter, in the same order: re-sent after a NOSCRIPT reply.
        self._sent: deque[bytes] = deque()
        #: SCRIPT LOAD commands (`load_scripts`), and the position in the stream of the
        #: last one written: a NOSCRIPT to a call written before it needs no new load.
        self._loads: tuple[bytes, ...] = ()
        self._loaded_at = 0
        self._out: list[bytes] = []
        self._flush_scheduled = False
        #: Commands written so far, replies read so far.
        self._written = 0
        self._answered = 0
        #: (commands written when the batch went out, its deadline), oldest first.
        self._batches: deque[tuple[int, float]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's TCP transport is no asyncio.Transport
        # subclass, and a refused assert here left every call waiting forever.
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        sent = self._sent
        while True:
            reply = reader.gets()
            if reply is False:
                break
            self._answered += 1
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self._fail(rx.ConnectionError("Redis sent a reply nobody asked for"))
                return
            future = waiting.popleft()
            command = sent.popleft()
            if future.done():  # the caller was cancelled; its reply is dropped in order
                continue
            if isinstance(reply, rx.ResponseError):
                if not (str(reply).startswith("NOSCRIPT") and self._resend(command, future)):
                    future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rx.ConnectionError(f"Connection to Redis lost: {exc or 'closed by server'}"))

    # -- calls ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Calls made and not answered yet."""
        return len(self._waiting)

    def call(self, command: bytes) -> asyncio.Future[Any]:
        """Queue `command` for the next write (see `_BATCH`); the future gets its reply."""
        future = self.loop.create_future()
        if self.broken:
            future.set_exception(rx.ConnectionError("Connection to Redis lost"))
            return future
        self._queue(command, future)
        return future

    def post(self, command: bytes, done: Done) -> None:
        """Queue `command` like `call`, with `done(reply, error)` in place of a future."""
        if self.broken:
            _Posted(done).set_exception(rx.ConnectionError("Connection to Redis lost"))
            return
        self._queue(command, _Posted(done))

    def load_scripts(self, loads: tuple[bytes, ...]) -> asyncio.Future[Any]:
        """Queue `loads` (SCRIPT LOAD commands, kept for reloads); the future is answered
        once they are. A load's error reply is ignored: the EVALSHA fallback remains."""
        self._loads = loads
        for command in loads:
            self._queue(command, _Posted(_ignore))
        self._loaded_at = self._written + len(self._out)
        return self.call(_PING)

    def _resend(self, command: bytes, waiter: asyncio.Future[Any] | _Posted) -> bool:
        """Re-send a call Redis answered NOSCRIPT (it did not run), now, while its reply
        is read: after the calls written before it and before any call written later,
        so a release reloaded this way is never overtaken by a later decision.

        The scripts are loaded again first, unless that was already done after this
        call was written (the calls written before the load get NOSCRIPT too). A call
        is re-sent once; False, doing nothing, when it cannot be (already re-sent, no
        scripts to load, or the connection is gone).
        """
        if command.__class__ is _Again or not self._loads or self._transport is None:
            return False
        commands: list[bytes] = []
        waiters: list[asyncio.Future[Any] | _Posted] = []
        if self._answered > self._loaded_at:  # written after the last load: flushed since
            commands += self._loads
            waiters += [_Posted(_ignore) for _ in self._loads]
        commands.append(_Again(command))
        waiters.append(waiter)
        try:
            self._transport.write(b"".join(commands))
        except Exception as exc:
            self._fail(rx.ConnectionError(f"Connection to Redis lost: {exc}"))
            return False
        # In the stream after the calls written and before those not written yet.
        at = self._written - self._answered
        for n, (again, answer) in enumerate(zip(commands, waiters, strict=True)):
            self._waiting.insert(at + n, answer)
            self._sent.insert(at + n, again)
        self._written += len(commands)
        if len(commands) > 1:
            self._loaded_at = self._written - 1
        deadline = self.loop.time() + self.timeout
        self._batches.append((self._written, deadline))
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._check_deadline)
        return True

    def _queue(self, command: bytes, waiter: asyncio.Future[Any] | _Posted) -> None:
        self._waiting.append(waiter)
        self._sent.append(command)
        self._out.append(command)
        # At once when Redis has nothing of ours to work on, or a batch is full: Redis then
        # runs it while this loop builds the next, instead of waiting for the turn's end.
        if len(self._out) >= _BATCH or self._written == self._answered:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def close(self) -> None:
        """Close the connection; pending calls fail. From another loop, only mark it broken.

        A lane left behind by another event loop (a backend reused across
        `asyncio.run` calls) is not ours to touch: its loop may be closed.
        """
        if _running_loop() is not self.loop:
            self.broken = True
            return
        self._fail(rx.ConnectionError("Connection to Redis closed by the client"))

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.broken or not self._out:
            return
        if self._transport is None:  # never connected: fail the calls, don't strand them
            self._fail(rx.ConnectionError("Redis connection has no transport"))
            return
        out, self._out = self._out, []
        try:
            self._transport.write(b"".join(out))
        except Exception as exc:
            # A transport closed under us, its connection_lost not yet run (uvloop raises
            # here). This runs inside `call` and `post` too: fail the calls, never the caller.
            self._fail(rx.ConnectionError(f"Connection to Redis lost: {exc}"))
            return
        self._written += len(out)
        deadline = self.loop.time() + self.timeout
        self._batches.append((self._written, deadline))
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        """Fail the lane if the oldest unanswered batch is past its deadline."""
        self._timer = None
        batches = self._batches
        while batches and batches[0][0] <= self._answered:
            batches.popleft()
        if not batches or self.broken:
            return
        deadline = batches[0][1]
        if deadline <= self.loop.time():
            self._fail(rx.TimeoutError(f"Timeout reading from Redis after {self.timeout}s"))
        else:
            self._timer = self.loop.call_at(deadline, self._check_deadline)

    def _fail(self, exc: Exception) -> None:
        """Break the lane: every pending call fails with `exc`, the socket closes."""
        if self.broken:
            return
        self.broken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        self._sent.clear()
        self._out.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()


class _Again(bytes):
    """A command re-sent after a NOSCRIPT reply (see `_Lane._resend`): never re-sent twice."""

    __slots__ = ()


def _ignore(reply: Any, error: BaseException | None) -> None:
    """The answer to a call nobody waits for (a SCRIPT LOAD)."""


class _Posted:
    """A posted call's place among a lane's waiters: answered like a future, it calls `done`.

    Nobody can cancel it, and it is answered once: by its reply, or by the
    lane's failure; an answer after the first is ignored.
    """

    __slots__ = ("_answered", "_done")

    def __init__(self, done: Done) -> None:
        self._done = done
        self._answered = False

    def done(self) -> bool:
        return self._answered

    def set_result(self, reply: Any) -> None:
        self._answer(reply, None)

    def set_exception(self, exc: BaseException) -> None:
        self._answer(None, exc)

    def _answer(self, reply: Any, exc: BaseException | None) -> None:
        if self._answered:
            return
        self._answered = True
        # Runs inside the protocol's data_received: an error here must not break the lane.
        try:
            self._done(reply, exc)
        except Exception:
            logger.exception("ratelimit: handling a posted Redis call's answer failed")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (its callers saw it, or were cancelled)."""
    if not future.cancelled():
        future.exception()


_INCOMPLETE = object()


class RespReader:
    """A RESP2 reply parser with hiredis's `feed`/`gets` interface, for when it is absent.

    `gets()` returns the next complete reply, or False; error replies are
    returned as `ResponseError` values, like hiredis with `replyError=`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def gets(self) -> Any:
        value, pos = self._parse(self._pos)
        if value is _INCOMPLETE:
            return False
        self._pos = pos
        if pos > 65_536 or pos == len(self._buf):
            del self._buf[:pos]
            self._pos = 0
        return value

    def _parse(self, pos: int) -> tuple[Any, int]:
        buf = self._buf
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return _INCOMPLETE, pos
        kind, line, after = buf[pos], bytes(buf[pos + 1 : end]), end + 2
        if kind == 0x2B:  # +simple string
            return line, after
        if kind == 0x2D:  # -error
            return rx.ResponseError(line.decode("utf-8", "replace")), after
        if kind == 0x3A:  # :integer
            return int(line), after
        if kind == 0x24:  # $bulk string
            size = int(line)
            if size < 0:
                return None, after
            if len(buf) < after + size + 2:
                return _INCOMPLETE, pos
            return bytes(buf[after : after + size]), after + size + 2
        if kind == 0x2A:  # *array
            count = int(line)
            if count < 0:
                return None, after
            items = []
            for _ in range(count):
                item, after = self._parse(after)
                if item is _INCOMPLETE:
                    return _INCOMPLETE, pos
                items.append(item)
            return items, after
        raise rx.ConnectionError(f"Redis protocol error: unexpected byte {kind:#x}")
