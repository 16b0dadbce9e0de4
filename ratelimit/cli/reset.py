"""`ratelimit reset KEY`: forgive one caller (delete its token-bucket state)."""

from __future__ import annotations

from .._errors import ConfigError
from ..policy.keys import digest as _digest
from ..policy.limits import check_name
from .context import Context, Refused
from .parser import OK, usage


async def cmd_reset(ctx: Context) -> int:
    a = ctx.args
    if a.limit and not a.rule:
        usage("reset: --limit needs --rule")
    for field, value in (("--rule", a.rule), ("--limit", a.limit)):
        if value is not None:
            try:
                check_name(field, value)
            except ConfigError as exc:
                raise Refused(str(exc)) from None
    if ctx.settings is not None and a.rule:
        by_name = {r.name: r for r in ctx.settings.rules}
        if a.rule not in by_name:
            raise Refused(f"--rule: expected one of the rules {sorted(by_name)}, got {a.rule!r}")
        if a.limit and a.limit not in by_name[a.rule].limit_names():
            raise Refused(
                f"--limit: expected one of {by_name[a.rule].limit_names()}, got {a.limit!r}"
            )
    digest = _digest(a.key)
    deleted = await ctx.backend().admin().forget(digest, a.rule or None, a.limit or None)
    out = ctx.out
    if out.json:
        out.document({"caller": digest, "deleted": deleted})
        return OK
    if deleted:
        for key in deleted:
            out.line(f"deleted {key}")
    else:
        out.line(
            "nothing stored for that caller (its buckets are full already, or the key text "
            "differs from what the key function returns)"
        )
    return OK
