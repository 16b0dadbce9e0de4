"""End to end under a real uvicorn: real sockets, real disconnects."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from _servers import uvicorn_app


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with uvicorn_app("apps.e2e_app:app") as (url, _):
        yield url


def test_real_server_refuses_with_429_and_header_fields(server: str) -> None:
    """Over real HTTP the fourth request of one key is a 429 with Retry-After and fields."""
    with httpx.Client(base_url=server) as c:
        codes = [c.post("/v1/images/generations", headers={"x-api-key": "e2e"}) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    refused = codes[-1]
    assert refused.headers["retry-after"] == "20"
    assert refused.headers["ratelimit-policy"] == '"per-key";q=3;w=60'
    assert refused.headers["ratelimit"] == '"per-key";r=0;t=20'
    assert refused.headers["content-type"] == "application/problem+json"
    assert codes[0].headers["ratelimit"] == '"per-key";r=2;t=20'


def _in_use(server: str) -> int:
    return int(httpx.get(f"{server}/state", timeout=2).json()["stream_in_use"])


def test_client_disconnect_mid_stream_frees_the_slot(server: str) -> None:
    """A client that hangs up mid-stream gives its slot back; the next caller gets in."""
    host, port = server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200")
    assert _in_use(server) == 1
    blocked = httpx.get(f"{server}/stream", timeout=5)
    assert blocked.status_code == 503
    assert blocked.headers["retry-after"] == "1"
    sock.close()
    deadline = time.monotonic() + 5
    while _in_use(server) != 0:
        assert time.monotonic() < deadline, "slot was not released after the disconnect"
        time.sleep(0.05)
    with httpx.stream("GET", f"{server}/stream", timeout=5) as r:
        assert r.status_code == 200


def _response(sock: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body) read from `sock`."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def _state(server: str) -> dict[str, int]:
    return dict(httpx.get(f"{server}/state", timeout=2).json())


def _until(server: str, **want: int) -> None:
    deadline = time.monotonic() + 5
    while {k: _state(server)[k] for k in want} != want:
        assert time.monotonic() < deadline, f"state never reached {want}: {_state(server)}"
        time.sleep(0.02)


def test_a_client_that_hangs_up_while_waiting_leaves_the_line(server: str) -> None:
    """Over real sockets: a waiting request whose client closes the connection leaves the
    line at once; a waiting request that stays gets the slot, and its body reaches the app."""
    host, port = server.removeprefix("http://").split(":")
    holder = socket.create_connection((host, int(port)))
    holder.sendall(b"POST /line HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nA")
    _until(server, line_in_use=1, line_waiting=0)
    quitter = socket.create_connection((host, int(port)))
    quitter.sendall(b"POST /line HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nB")
    _until(server, line_waiting=1)
    patient = socket.create_connection((host, int(port)))
    patient.sendall(b"POST /line HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nC")
    _until(server, line_waiting=2)
    quitter.close()
    _until(server, line_in_use=1, line_waiting=1)
    httpx.post(f"{server}/line/open", timeout=2)
    assert _response(holder).startswith(b"HTTP/1.1 200")
    reply = _response(patient)
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"served:C")
    holder.close()
    patient.close()
    _until(server, line_in_use=0, line_waiting=0)
