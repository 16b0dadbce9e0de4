"""`ratelimit status`: effective limits, overrides in force and slots in use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.live import snapshot
from ..policy.effective import describe_limit, resolve
from ..policy.limits import Concurrency
from .context import Context, rules_from_reports
from .output import (
    Cell,
    Out,
    clean,
    human_seconds,
    iso,
    limit_numbers,
    override_data,
    redact,
    show,
)
from .parser import OK, usage


async def status_data(ctx: Context) -> dict[str, Any]:
    """Everything `status` shows, as its `--json` document."""
    store = ctx.store()
    reports = await store.reports()
    stored = snapshot(await store.load())
    now = store.now()
    source: str
    if ctx.settings is not None:
        rules = list(ctx.settings.rules)
        source = "config"
    else:
        rules = rules_from_reports(reports)
        source = "workers"
    resolution = resolve(rules, stored.overrides, now)
    admin = ctx.backend().admin()
    data_rules = []
    for e in resolution.rules:
        limits = []
        names = e.configured.limit_names()
        for name, conf, eff, shaper in zip(
            names, e.configured.limits, e.rule.limits, e.by_limit, strict=True
        ):
            item: dict[str, Any] = {
                "name": name,
                "kind": conf.kind,
                "configured": describe_limit(conf),
                "effective": describe_limit(eff),
                "override": None if shaper is None else override_data(shaper, now),
            }
            if isinstance(conf, Concurrency):
                item["in_use"] = await admin.in_use(e.rule.name, name, conf.shared)
                item["waiting"] = await admin.waiting(e.rule.name, name, conf.shared)
            limits.append(item)
        data_rules.append(
            {
                "name": e.rule.name,
                "path": e.rule.path,
                "shadow": e.rule.shadow,
                "blocked": e.block is not None,
                "block": None if e.block is None else override_data(e.block, now),
                "limits": limits,
            }
        )
    current = sum(1 for r in reports.values() if r.get("version") == stored.version)
    return {
        "redis": redact(ctx.url or ""),
        "prefix": ctx.prefix,
        "time": iso(now),
        "version": stored.version,
        "rules_from": source,
        "workers": {
            "live": len(reports),
            "current": current,
            "ids": sorted(reports),
        },
        "rules": data_rules,
        "problems": [{"slot": o.slot, "error": str(exc)} for o, exc in resolution.problems]
        + [{"slot": s, "error": str(exc)} for s, exc in stored.unreadable],
    }


def print_status(out: Out, data: Mapping[str, Any]) -> None:
    workers = data["workers"]
    live, current = workers["live"], workers["current"]
    state = f"{current}/{live} at this version" if live else "no worker reports"
    # The overrides' version counts their changes; a store never written to has none.
    version = data["version"]
    overrides = "overrides: none set yet" if version is None else f"overrides version {version}"
    out.line(
        f"{data['redis']} prefix {data['prefix']}  {overrides}  "
        f"workers: {out.paint(state, 'green' if live and live == current else 'yellow')}"
    )
    rows: list[list[Cell]] = []
    for r in data["rules"]:
        mode: Cell = ""
        if r["blocked"]:
            b = r["block"]
            mode = (f"BLOCKED {human_seconds(b['time_left'])}", "red")
        elif r["shadow"]:
            mode = ("shadow", "yellow")
        for i, lim in enumerate(r["limits"]):
            o = lim["override"]
            effective = limit_numbers(lim["effective"])
            rows.append(
                [
                    r["name"] if i == 0 else "",
                    mode if i == 0 else "",
                    lim["name"],
                    limit_numbers(lim["configured"]),
                    (effective, "cyan") if o else effective,
                    f"{o['change']} ({o['slot']})" if o else "",
                    human_seconds(o["time_left"]) if o else "",
                    str(lim["in_use"]) if "in_use" in lim else "",
                    str(lim["waiting"]) if "waiting" in lim else "",
                    clean(o.get("reason") or "") if o else "",
                ]
            )
    if rows:
        out.table(
            ["RULE", "MODE", "LIMIT", "CONFIGURED", "EFFECTIVE", "OVERRIDE", "LEFT", "IN USE",
             "WAITING", "REASON"],
            rows,
        )  # fmt: skip
    else:
        out.line("no rules known: pass --config, or start the app (its workers report their rules)")
    for p in data["problems"]:
        out.line(out.paint(f"ignored {clean(p['slot'])}: {clean(p['error'])}", "red"))


async def cmd_status(ctx: Context) -> int:
    out = ctx.out
    every = ctx.args.watch
    if every is not None and not every > 0:
        usage("status: --watch takes a number of seconds > 0")
    await show(out, every, lambda: status_data(ctx), print_status)
    return OK
