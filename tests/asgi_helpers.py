"""Hand-built ASGI plumbing for tests that must see streaming, disconnects and cancels."""

from __future__ import annotations

import asyncio
from typing import Any

from ratelimit._types import ASGIApp, Message


def http_scope(
    path: str = "/",
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    client: tuple[str, int] | None = ("127.0.0.1", 5000),
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "client": client,
        "server": ("testserver", 80),
    }


class Exchange:
    """One request driven by hand: we choose when the client disconnects."""

    def __init__(self, app: ASGIApp, scope: dict[str, Any], body: bytes = b"") -> None:
        self.app = app
        self.scope = scope
        self.sent: list[Message] = []
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._inbox.put_nowait({"type": "http.request", "body": body, "more_body": False})
        self.started = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def receive(self) -> Message:
        return await self._inbox.get()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.start":
            self.started.set()

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.get_running_loop().create_task(
            self.app(self.scope, self.receive, self.send)
        )
        return self.task

    def disconnect(self) -> None:
        self._inbox.put_nowait({"type": "http.disconnect"})

    @property
    def status(self) -> int | None:
        for m in self.sent:
            if m["type"] == "http.response.start":
                return int(m["status"])
        return None

    def header(self, name: bytes) -> bytes | None:
        for m in self.sent:
            if m["type"] == "http.response.start":
                for k, v in m.get("headers", []):
                    if k.lower() == name:
                        return bytes(v)
        return None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def eventually(predicate: Any, timeout: float = 2.0) -> None:
    """Wait until `predicate()` is true (for releases done in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
