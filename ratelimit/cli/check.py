"""`ratelimit check CONFIG`: validate a config file and print the rules as understood."""

from __future__ import annotations

from typing import Any

from ..policy.effective import describe_limit
from ..policy.limits import Concurrency
from ..policy.rules import Rule
from .context import Context
from .output import Cell, limit_numbers, plural
from .parser import OK


def cmd_check(ctx: Context) -> int:
    settings = ctx.settings
    assert settings is not None
    data = {
        "ok": True,
        "config": ctx.args.config,
        "backend": dict(settings.backend) if settings.backend else {"type": "memory"},
        "fail": settings.fail,
        "headers": settings.headers,
        "rules": [_rule_data(r) for r in settings.rules],
    }
    out = ctx.out
    if out.json:
        out.document(data)
        return OK
    backend = data["backend"]
    out.line(
        f"{ctx.args.config}: {out.paint('ok', 'green')}, {plural(len(settings.rules), 'rule')}, "
        f"backend {backend.get('type')}" + (f" {backend['url']}" if backend.get("url") else "")
    )
    rows: list[list[Cell]] = []
    for r in data["rules"]:
        for i, lim in enumerate(r["limits"]):
            first = i == 0
            rows.append(
                [
                    r["name"] if first else "",
                    r["path"] if first else "",
                    ",".join(r["methods"] or ["*"]) if first else "",
                    str(r["cost"]) if first else "",
                    (r["fail"] or "-") if first else "",
                    (("shadow", "yellow") if r["shadow"] else "") if first else "",
                    lim["name"],
                    lim["kind"],
                    limit_numbers(lim),
                    lim["key"],
                ]
            )
    out.table(
        ["RULE", "PATH", "METHODS", "COST", "FAIL", "MODE", "LIMIT", "KIND", "NUMBERS", "KEY"],
        rows,
    )
    return OK


def _rule_data(rule: Rule) -> dict[str, Any]:
    limits = []
    for name, lim in zip(rule.limit_names(), rule.limits, strict=True):
        d = describe_limit(lim)
        d["name"] = name
        d["key"] = repr(lim.key)
        if isinstance(lim, Concurrency):
            d["lease"] = lim.lease
        limits.append(d)
    return {
        "name": rule.name,
        "path": rule.path,
        "methods": sorted(rule.methods) if rule.methods else None,
        "cost": rule.cost if isinstance(rule.cost, int) else repr(rule.cost),
        "fail": rule.fail,
        "shadow": rule.shadow,
        "limits": limits,
    }
