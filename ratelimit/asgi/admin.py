"""The admin endpoints (`top_app`, `metrics_app`): reading their input strictly, answering.

Bad input (a malformed or repeated parameter, an unreadable header) is the
client's mistake: it gets a 400 with a short plain-text message saying what
was expected, never a 500 and never the input echoed back.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import parse_qsl

from .._types import Scope, Send

#: Longest number read as written; longer ones are past any capacity and read as "most".
_DIGITS = 9


class BadRequest(Exception):
    """The request's input cannot be read; the message says what was expected."""


def query_params(scope: Scope, known: Collection[str]) -> dict[str, str]:
    """The `known` parameters of the query string, each given at most once.

    Other parameters are ignored (a cache buster does no harm). Raises
    `BadRequest` for a query that is not UTF-8 or a known parameter repeated.
    """
    raw = bytes(scope.get("query_string", b""))
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the query string is not valid UTF-8") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in known:
            if name in params:
                raise BadRequest(f"{name}: given more than once")
            params[name] = value
    return params


def count_param(name: str, value: str, most: int) -> int:
    """`value` as a whole number from 1 up; numbers past `most` read as `most`.

    Only ASCII digits: `int()` alone would take "²"-like digits, signs,
    underscores and spaces, or raise on them.
    """
    if not value.isascii() or not value.isdigit():
        raise BadRequest(f"{name}: expected a whole number from 1 to {most}")
    number = int(value) if len(value) <= _DIGITS else most
    if number < 1:
        raise BadRequest(f"{name}: expected a whole number from 1 to {most}")
    return min(number, most)


async def send_bad_request(send: Send, message: str) -> None:
    """Answer 400 with `message` as plain text."""
    await send_answer(send, 400, b"text/plain; charset=utf-8", f"{message}\n".encode())


async def send_answer(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    """Answer `status` with `body`, never to be cached (an admin answer is of the moment)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
