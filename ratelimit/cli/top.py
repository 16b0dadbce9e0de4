"""`ratelimit top`: the heaviest callers right now, merged over the live workers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.top import read_fleet
from .context import Context, Refused
from .output import Out, clean, iso, plural, redact, show
from .parser import OK, usage


async def top_data(ctx: Context) -> dict[str, Any]:
    """Everything `top` shows, as its `--json` document."""
    a = ctx.args
    fleet = await read_fleet(ctx.backend().top_store(), name=a.name, n=a.n)
    tables: dict[str, Any] = {}
    for name, t in fleet.tables.items():
        tables[name] = {
            "total": t.total,
            "workers": t.workers,
            "keys_shown": t.keys_shown,
            "callers": [
                {
                    "caller": c.item,
                    "count": c.estimate,
                    "error": c.error,
                    "share": round(c.estimate / t.total, 4) if t.total else 0.0,
                }
                for c in t.callers
            ],
        }
    workers = [
        {
            "id": w.get("worker"),
            "pid": w.get("pid"),
            "every": w.get("every"),
            "window_start": iso(w.get("start")),
            "window_end": iso(w.get("end")),
            "age": None if w.get("end") is None else round(max(0.0, fleet.time - w["end"]), 3),
        }
        for w in fleet.workers
    ]
    return {
        "redis": redact(ctx.url or ""),
        "prefix": ctx.prefix,
        "time": iso(fleet.time),
        "workers": sorted(workers, key=lambda w: str(w["id"])),
        "tables": tables,
    }


def print_top(out: Out, data: Mapping[str, Any]) -> None:
    workers = data["workers"]
    if not workers:
        out.line(
            "no worker publishes its heaviest callers: track keys with TopCallers and pass "
            "RateLimitMiddleware(top=...) with a RedisBackend"
        )
        return
    ages = [w["age"] for w in workers if w["age"] is not None]
    every = sorted({w["every"] for w in workers if w["every"] is not None})
    window = "/".join(f"{e:g}s" for e in every) or "?"
    line = f"{data['redis']} prefix {data['prefix']}  {plural(len(workers), 'worker')}, "
    line += f"windows of {window}"
    if ages:
        line += f" ended {min(ages):.1f}-{max(ages):.1f}s ago"
    out.line(line)
    for name, t in data["tables"].items():
        out.line()
        what = "keys" if t["keys_shown"] else "key digests"
        out.line(
            f"{out.paint(clean(name), 'bold')}: {plural(t['total'], 'request')} over "
            f"{plural(t['workers'], 'worker')} ({what})"
        )
        if not t["callers"]:
            out.line(out.paint("  no callers in this window", "dim"))
            continue
        out.table(
            ["CALLER", "COUNT", "±ERROR", "SHARE"],
            [
                [
                    clean(c["caller"]),
                    str(c["count"]),
                    str(c["error"]),
                    f"{100 * c['share']:.1f}%",
                ]
                for c in t["callers"]
            ],
        )


async def cmd_top(ctx: Context) -> int:
    out = ctx.out
    a = ctx.args
    if a.n < 1:
        usage("top: -n takes a number of callers >= 1")
    if a.watch is not None and not a.watch > 0:
        usage("top: --watch takes a number of seconds > 0")

    async def read() -> dict[str, Any]:
        data = await top_data(ctx)
        if a.watch is None and a.name is not None and data["workers"] and not data["tables"]:
            raise Refused(f"no live worker tracks {a.name!r}")
        return data

    await show(out, a.watch, read, print_top)
    return OK
