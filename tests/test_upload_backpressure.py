"""Under a real uvicorn, a request waiting in line leaves its upload with the server.

The limiter reads a waiting request's body only up to 64 KiB (to notice a
disconnect); the rest stays in the socket, held back by the server's flow
control, and reaches the app intact once the request is admitted.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from _servers import uvicorn_app

MiB = 1024 * 1024
UPLOAD = 50 * MiB


@pytest.fixture(params=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, psutil.Process]]:
    """A fresh uvicorn (one worker, the given HTTP parser, if installed) serving apps.upload_app."""
    if request.param != "h11":
        pytest.importorskip(request.param)
    with uvicorn_app("apps.upload_app:app", "--http", request.param) as (url, pid):
        yield url, psutil.Process(pid)


def _until(server: str, **want: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        state = httpx.get(f"{server}/state", timeout=2).json()
        if all(state[k] == v for k, v in want.items()):
            return
        assert time.monotonic() < deadline, f"state never reached {want}: {state}"
        time.sleep(0.02)


class Uploader(threading.Thread):
    """Streams UPLOAD bytes as fast as the socket takes them, then reads the answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.sent = 0
        self.digest = hashlib.sha256()
        self.answer = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            block = os.urandom(MiB)
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
                s.sendall(
                    b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n" % UPLOAD
                )
                for i in range(UPLOAD // MiB):
                    chunk = i.to_bytes(4, "big") + block[4:]
                    self.digest.update(chunk)
                    for start in range(0, MiB, 64 * 1024):
                        s.sendall(chunk[start : start + 64 * 1024])
                        self.sent += 64 * 1024
                while data := s.recv(65536):
                    self.answer += data
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.slow
def test_a_waiting_50_mib_upload_is_not_buffered_and_arrives_intact(
    server: tuple[str, psutil.Process],
) -> None:
    """While it waits for the held slot, the server's RSS grows < 8 MiB; once admitted the
    app reads all 50 MiB, byte for byte."""
    url, proc = server
    port = int(url.rsplit(":", 1)[1])
    holder = threading.Thread(
        target=httpx.post, args=(f"{url}/upload?hold=1",), kwargs={"timeout": 60}, daemon=True
    )
    holder.start()
    _until(url, in_use=1)
    rss_before = proc.memory_info().rss
    uploader = Uploader(port)
    uploader.start()
    _until(url, waiting=1)
    # Wait for the upload to stall against the server's flow control (or, if the server
    # reads it all, to be sent completely).
    last, since = -1, time.monotonic()
    while uploader.sent < UPLOAD and time.monotonic() - since < 1.0:
        if uploader.sent != last:
            last, since = uploader.sent, time.monotonic()
        time.sleep(0.05)
    growth = proc.memory_info().rss - rss_before
    assert uploader.sent < UPLOAD / 2, f"the server took {uploader.sent / MiB:.0f} MiB unadmitted"
    assert growth < 8 * MiB, f"server RSS grew {growth / MiB:.1f} MiB while the upload waited"
    httpx.post(f"{url}/open", timeout=5)
    uploader.join(60)
    holder.join(10)
    assert uploader.error is None, uploader.error
    head, _, body = uploader.answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body) == {"bytes": UPLOAD, "sha256": uploader.digest.hexdigest()}
