"""The Redis protocol (RESP2): commands packed into bytes, replies parsed without hiredis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis import exceptions as rx


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
