"""`ratelimit override set|list|clear`: live overrides in the fleet's store."""

from __future__ import annotations

import getpass
import socket

from .._errors import ConfigError
from ..core.live import removed, snapshot
from ..policy.effective import check_override
from ..policy.overrides import Override
from .context import Context, Refused, known_rules
from .output import clean, human_seconds, iso, override_data
from .parser import OK, usage


async def cmd_override_set(ctx: Context) -> int:
    a = ctx.args
    kinds = []
    if any(v is not None for v in (a.rate, a.burst, a.slots, a.queue, a.timeout)):
        kinds.append("--rate/--burst/--slots/--queue/--timeout")
    if a.factor is not None:
        kinds.append("--factor")
    if a.block:
        kinds.append("--block")
    if a.shadow or a.enforce:
        kinds.append("--shadow/--enforce" if not (a.shadow and a.enforce) else "--shadow --enforce")
    if len(kinds) != 1 or (a.shadow and a.enforce):
        usage(
            "override set: give exactly one kind of change: --rate [--burst], --burst, "
            "--slots/--queue/--timeout, --factor, --block, --shadow or --enforce"
            + (f" (got {', '.join(kinds)})" if kinds else "")
        )
    if a.message is not None and not a.block:
        usage("override set: --message goes with --block")
    store = ctx.store()
    try:
        now = await store.sync_clock()
        override = Override(
            a.rule,
            a.limit,
            rate=a.rate,
            burst=a.burst,
            slots=a.slots,
            queue=a.queue,
            timeout=a.timeout,
            factor=a.factor,
            block=a.block,
            message=a.message,
            shadow=True if a.shadow else (False if a.enforce else None),
            expires_at=None if a.until_cleared else now + a.duration,
            reason=a.reason,
            created_at=now,
            created_by=_who(),
        )
    except ConfigError as exc:
        raise Refused(f"override refused: {exc}", exc.field) from None
    rules, source = await known_rules(ctx)
    if rules is not None:
        try:
            check_override(override, rules)
        except ConfigError as exc:
            raise Refused(
                f"override refused: {exc} (checked against {source})", exc.field
            ) from None
    version = await store.put(override.slot, override.to_json())
    out = ctx.out
    if out.json:
        out.document(
            {"override": override_data(override, now), "version": version, "checked": bool(rules)}
        )
        return OK
    target = f"{override.rule}/{override.limit}" if override.limit else override.rule
    out.line(
        f"set {out.paint(target, 'bold')}: {out.paint(override.describe(), 'cyan')} "
        f"{_lasting(override, now)} (version {version})"
    )
    if rules is None:
        out.line(
            out.paint(
                "note: not checked against the rules (no --config, and no worker reports)", "dim"
            )
        )
    return OK


def _lasting(o: Override, now: float) -> str:
    if o.expires_at is None:
        return "until cleared"
    return f"for {human_seconds(o.time_left(now))} (until {iso(o.expires_at)})"


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name (a container without passwd): the host is still useful
        user = "?"
    return f"{user}@{socket.gethostname()}"


async def cmd_override_list(ctx: Context) -> int:
    store = ctx.store()
    stored = snapshot(await store.load())
    now = store.now()
    live = [o for o in stored.overrides if not o.expired(now)]
    out = ctx.out
    if out.json:
        out.document(
            {
                "version": stored.version,
                "overrides": [override_data(o, now) for o in live],
                "unreadable": [{"slot": s, "error": str(e)} for s, e in stored.unreadable],
            }
        )
        return OK
    if not live:
        out.line("no overrides in force")
    else:
        out.table(
            ["RULE", "LIMIT", "CHANGE", "LEFT", "REASON", "BY"],
            [
                [
                    o.rule,
                    o.limit or ("*" if o.kind in ("set", "factor") else "-"),
                    (o.describe(), "red" if o.kind == "block" else "cyan"),
                    human_seconds(o.time_left(now)),
                    clean(o.reason or ""),
                    clean(o.created_by or ""),
                ]
                for o in live
            ],
        )
    for slot, exc in stored.unreadable:
        out.line(out.paint(f"unreadable entry {clean(slot)}: {clean(str(exc))}", "red"))
    return OK


async def cmd_override_clear(ctx: Context) -> int:
    a = ctx.args
    store = ctx.store()
    gone, version = await store.clear(a.rule, a.limit)
    cleared = removed(gone)
    now = store.now()
    out = ctx.out
    if out.json:
        out.document({"removed": [override_data(o, now) for o in cleared], "version": version})
        return OK
    target = f"{a.rule}/{a.limit}" if a.limit else a.rule
    if not cleared:
        out.line(f"no override on {clean(target)}")
    for o in cleared:
        out.line(f"cleared {o.slot}: {o.describe()}")
    return OK
