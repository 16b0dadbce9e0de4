"""`Inbox`: the one reader of a request's messages before the app runs.

A request that may wait in line is watched for its client leaving; a request
whose rule reads the JSON body (see `policy.body`) has that body read and
parsed before the decision. Either way the messages read are kept and handed
to the app first, unchanged (the same dicts, `more_body` flags and a
disconnect included), then `receive` reads live: the app sees what it would
have seen without the middleware.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .._errors import CallableError
from .._types import Message, Receive, Scope
from ..policy.body import SCOPE_KEY, parse
from ..policy.rules import Rule

#: Body bytes a waiting request's inbox reads ahead at most (plus the message that
#: crosses it): past it the upload stays with the server, whose back-pressure holds it.
_READ_AHEAD = 64 * 1024


class BodyTooLarge(CallableError):
    """The request's body is longer than its rule's `body_limit`: refused with 413."""


class Inbox:
    """The server's `receive` for a request that may wait in line or whose body is read.

    While it waits, `until_gone` reads ahead to notice a disconnect, keeping what
    it reads; the app's `receive` gets the kept messages first, then reads live,
    so the app sees the body unchanged. Nothing is read ahead unless the request
    waits, and at most `_READ_AHEAD` body bytes (plus the message that crosses it):
    a 400 MiB upload must not be buffered here while it waits. Past that,
    `until_gone` stops reading: the server then stops reading the socket too
    (uvicorn pauses past 64 KiB of unread body) and notices a disconnect only
    when reading resumes, i.e. once the wait ends (admitted: the app's reads;
    timed out or refused: the answer's write). A body read whole by `read_json`
    (bounded by the rule) leaves only the disconnect to read ahead.
    """

    __slots__ = ("_kept", "_read", "_receive")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._kept: deque[Message] = deque()
        self._read = 0

    async def until_gone(self) -> None:
        """Return once the client has disconnected (a cancelled read loses nothing);
        never, once `_READ_AHEAD` bytes are kept (the wait's own timeout still applies)."""
        while self._read < _READ_AHEAD:
            message = await self._receive()
            self._kept.append(message)
            if message["type"] in ("http.disconnect", "websocket.disconnect"):
                return
            self._read += len(message.get("body") or message.get("bytes") or b"") + len(
                message.get("text") or ""
            )
        await asyncio.get_running_loop().create_future()  # cancelled when the wait ends

    async def read_json(self, rule: Rule, scope: Scope) -> None:
        """Read the request's whole body (at most `rule.body_limit` bytes), parse it and
        keep it in `scope` for the rule's cost and keys (`policy.body.SCOPE_KEY`).

        Raises `BodyTooLarge` past the limit (by its content-length, or once read
        past it) and `CallableError` for a body that is not a JSON object or that
        ended early (the client left mid-upload): refused, nothing consumed.
        """
        func = (
            rule.cost
            if rule.cost_reads_body
            else next(lim.key for lim in rule.limits if getattr(lim.key, "reads_body", False))
        )
        limit = rule.body_limit
        if scope["type"] != "http":
            raise CallableError("body", func, rule.name, "", "a websocket has no JSON body")
        content_type = length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = bytes(value).decode("latin-1")
            elif name == b"content-length":
                length = value
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLarge("body", func, rule.name, "", f"longer than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            self._kept.append(message)
            if message["type"] != "http.request":
                raise CallableError(
                    "body", func, rule.name, "", "the client left before the body's end"
                )
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge("body", func, rule.name, "", f"longer than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            scope[SCOPE_KEY] = parse(b"".join(chunks), content_type)
        except ValueError as exc:
            raise CallableError("body", func, rule.name, "", f"the body {exc}") from None

    async def receive(self) -> Message:
        if self._kept:
            return self._kept.popleft()
        return await self._receive()
