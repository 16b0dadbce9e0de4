"""How the commands write: aligned tables and colours for people, JSON for scripts."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TextIO

from ..policy.overrides import Override


class Out:
    """Where a command writes: tables and colours for people, one JSON document for scripts."""

    def __init__(self, stream: TextIO, *, as_json: bool) -> None:
        self.stream = stream
        self.json = as_json
        self.color = (
            not as_json
            and stream.isatty()
            and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb"
        )

    def paint(self, text: str, style: str) -> str:
        codes = {"bold": "1", "red": "31", "yellow": "33", "cyan": "36", "dim": "2", "green": "32"}
        if not self.color or not text:
            return text
        return f"\x1b[{codes[style]}m{text}\x1b[0m"

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def document(self, data: Any) -> None:
        json.dump(data, self.stream, indent=2, sort_keys=True, ensure_ascii=False)
        self.stream.write("\n")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
        """Aligned columns (widths from the plain text, so colours never misalign them)."""
        plain = [[c if isinstance(c, str) else c[0] for c in row] for row in rows]
        widths = [len(h) for h in header]
        for texts in plain:
            for i, text in enumerate(texts):
                widths[i] = max(widths[i], len(text))
        self.line(
            "  ".join(
                self.paint(h.ljust(w), "bold") for h, w in zip(header, widths, strict=True)
            ).rstrip()
        )
        for row in rows:
            cells: list[str] = []
            for cell, w in zip(row, widths, strict=True):
                text, style = (cell, "") if isinstance(cell, str) else cell
                padded = text.ljust(w)
                cells.append(self.paint(padded, style) if style else padded)
            self.line("  ".join(cells).rstrip())


async def show(
    out: Out,
    every: float | None,
    read: Callable[[], Awaitable[Mapping[str, Any]]],
    draw: Callable[[Out, Mapping[str, Any]], None],
) -> None:
    """Write what `read` returns (one JSON line, or drawn by `draw`), once or, given
    `every`, every that many seconds until interrupted (a terminal cleared between)."""
    while True:
        data = await read()
        if out.json:
            json.dump(data, out.stream, sort_keys=True, ensure_ascii=False)
            out.line()
        else:
            if every is not None and out.stream.isatty():
                out.stream.write("\x1b[H\x1b[2J")
            draw(out, data)
        out.stream.flush()
        if every is None:
            return
        await asyncio.sleep(every)


#: A table cell: text, or (text, style).
Cell = str | tuple[str, str]


def clean(text: str) -> str:
    """Text from a store, safe to print on a terminal (no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def human_seconds(seconds: float | None) -> str:
    """`None` -> "until cleared"; 5430 -> "1h30m"; 42 -> "42s"."""
    if seconds is None:
        return "until cleared"
    s = int(seconds + 0.999)
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def plural(count: int, noun: str) -> str:
    """`1 slot`, `8 slots`, `0 rules`: a count with its noun agreeing (nouns taking -s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def limit_numbers(desc: Mapping[str, Any]) -> str:
    """A described limit in a few characters: `5/minute b5`, `1 slot`, `8 slots q64`,
    `1000/day (UTC)`, and what it counts if not requests: `8000/minute b8000 output_tokens`."""
    counts = f" {desc['counts']}" if desc.get("counts") else ""
    return _numbers(desc) + counts


def _numbers(desc: Mapping[str, Any]) -> str:
    if desc.get("kind") == "concurrency":
        text = plural(desc["limit"], "slot")
        if desc.get("queue"):
            text += f" q{desc['queue']} {desc.get('timeout', 0):g}s"
        return text
    if desc.get("kind") == "quota":
        return f"{desc['allowance']}/{desc['per']} (UTC)"
    text = str(desc.get("rate", "?"))
    if "burst" in desc:
        text += f" b{desc['burst']}"
    if desc.get("strategy") not in (None, "fixed"):
        text += f" {desc['strategy']}"
    return text


def redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", url)


def override_data(o: Override, now: float) -> dict[str, Any]:
    data = o.to_dict()
    data.pop("v", None)
    data["slot"] = o.slot
    data["kind"] = o.kind
    data["change"] = o.describe()
    data["time_left"] = o.time_left(now)
    data["expires"] = iso(o.expires_at)
    return data
