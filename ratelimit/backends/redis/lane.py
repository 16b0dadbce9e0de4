"""One pipelined connection to Redis: commands written in batches, replies matched in order.

Script calls share one long-lived connection, each still its own `EVALSHA`: a
call finding Redis with nothing of ours to do is written at once, and calls
made while Redis works are written together, eight at a time or at the end of
the loop turn (`BATCH`); replies come back in order and are matched to their
callers as they arrive, inside the protocol's `data_received`.

A call times out when its reply has not arrived `timeout` seconds after its
bytes were written. Replies that arrived are always processed before the
timer is checked (I/O callbacks run before timers in each loop turn), so a
stalled event loop never times out a call that Redis answered in time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from redis import exceptions as rx

from .resp import RespReader, pack

_HiredisReader: Any
try:
    from hiredis import Reader as _HiredisReader
except ImportError:  # pragma: no cover - hiredis is an optional extra
    _HiredisReader = None

logger = logging.getLogger("ratelimit")

#: What a posted call's answer goes to: (reply, None), or (None, the error).
Done = Callable[[Any, "BaseException | None"], None]

ASKING = pack("ASKING")
PING = pack("PING")
#: Calls written together at the most. A loop turn of a busy server builds dozens of
#: decisions; written as one batch at the turn's end, Redis would sit idle while the
#: turn ran, then the server while Redis ran the batch. Batches of 8 overlap the two:
#: one uvicorn worker behind a Redis token bucket served 14-20 % more requests per
#: second (wrk -c32, 2 cores), and one process decided 65,000 -> 110,000 times a
#: second at concurrency 32, for about 0.9 us more CPU per call (more writes).
BATCH = 8


class Lane(asyncio.Protocol):
    """One connection: commands written in batches (see `BATCH`), replies matched in order."""

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
        #: Each loaded script's source by its SHA1: a re-sent call goes as EVAL (see `_resend`).
        self._sources: dict[bytes, bytes] = {}
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
        """Queue `command` for the next write (see `BATCH`); the future gets its reply."""
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
        self._sources = dict(_script_source(command) for command in loads)
        for command in loads:
            self._queue(command, _Posted(_ignore))
        self._loaded_at = self._written + len(self._out)
        return self.call(PING)

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
        commands.append(_Again(_as_eval(command, self._sources)))
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
        if len(self._out) >= BATCH or self._written == self._answered:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def close(self) -> None:
        """Close the connection; pending calls fail. From another loop, only mark it broken.

        A lane left behind by another event loop (a backend reused across
        `asyncio.run` calls) is not ours to touch: its loop may be closed.
        """
        if running_loop() is not self.loop:
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
    """A command re-sent after a NOSCRIPT reply (see `Lane._resend`): never re-sent twice."""

    __slots__ = ()


_EVALSHA = b"$7\r\nEVALSHA\r\n$40\r\n"


def _script_source(load: bytes) -> tuple[bytes, bytes]:
    """(SHA1, source) of a packed `SCRIPT LOAD <source>` command."""
    _, _, rest = load.partition(b"LOAD\r\n$")
    size, _, body = rest.partition(b"\r\n")
    source = body[: int(size)]
    return hashlib.sha1(source).hexdigest().encode(), source


def _as_eval(command: bytes, sources: dict[bytes, bytes]) -> bytes:
    """`command` as EVAL of the script's source if it is an EVALSHA of a known script:
    EVAL cannot be answered NOSCRIPT, so a re-sent call runs whatever flush came between."""
    start = command.find(b"\r\n") + 2
    if not command.startswith(_EVALSHA, start):
        return command
    at = start + len(_EVALSHA)
    source = sources.get(command[at : at + 40])
    if source is None:
        return command
    return b"".join(
        (command[:start], b"$4\r\nEVAL\r\n$%d\r\n" % len(source), source, command[at + 40 :])
    )


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


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (its callers saw it, or were cancelled)."""
    if not future.cancelled():
        future.exception()
