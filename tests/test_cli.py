"""The `ratelimit` command, run as a subprocess against a real redis-server."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ratelimit import RedisBackend
from ratelimit.backends.base import BucketCheck, LeaseCheck, QueueCheck, StoreKey
from ratelimit.cli import Out, human_seconds, parse_duration
from ratelimit.cli.output import plural
from ratelimit.policy.keys import digest as _digest

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = "ratelimit:{overrides}"

CONFIG = """
[backend]
type = "redis"
url = "redis://127.0.0.1:1/0"   # the tests pass --redis / RATELIMIT_REDIS_URL, which win

[[rules]]
path = "/v1/images"
name = "images"

[[rules.limits]]
type = "token_bucket"
rate = "100/day"
burst = 20
key = "header:x-api-key"
name = "per-key"

[[rules.limits]]
type = "concurrency"
limit = 8
name = "gpu"

[[rules]]
path = "/v1/chat"
name = "chat"
shadow = true

[[rules.limits]]
type = "token_bucket"
rate = "10/second"
"""


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self) -> Any:
        return json.loads(self.out)


def ratelimit(
    *args: str, redis_url: str | None = None, env: dict[str, str] | None = None
) -> Result:
    """Run `python -m ratelimit ARGS` and capture what it printed and its exit code."""
    environ = {k: v for k, v in os.environ.items() if k != "RATELIMIT_REDIS_URL"}
    if redis_url is not None:
        environ["RATELIMIT_REDIS_URL"] = redis_url
    environ.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "ratelimit", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    return Result(proc)


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "ratelimit.toml"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# -- check ------------------------------------------------------------------------------------


def test_check_prints_the_rules_as_understood(config: str) -> None:
    """`check` exits 0 and shows every rule and limit with its numbers, as a table and as JSON."""
    r = ratelimit("check", config)
    assert r.code == 0, r.err
    assert "ok, 2 rules," in r.out
    assert "\x1b[" not in r.out  # not a terminal: no colours
    lines = r.out.splitlines()
    assert lines[1].split() == ["RULE", "PATH", "METHODS", "COST", "FAIL", "MODE", "LIMIT", "KIND",
                                "NUMBERS", "KEY"]  # fmt: skip
    assert "100/day b20" in r.out
    assert "8 slots" in r.out
    doc = ratelimit("check", config, "--json").json()
    assert doc["ok"] is True
    images, chat = doc["rules"]
    assert [(lim["name"], lim["kind"]) for lim in images["limits"]] == [
        ("per-key", "token-bucket"), ("gpu", "concurrency"),
    ]  # fmt: skip
    assert images["limits"][0]["key"] == "keys.header('x-api-key')"
    assert chat["shadow"] is True


def test_check_shows_what_each_limit_counts_when_not_requests(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(
        '[[rules]]\nname = "chat"\npath = "/v1/chat"\n'
        "cost = {input_tokens = 10, output_tokens = 100}\n"
        '[[rules.limits]]\ntype = "token_bucket"\nrate = "8000/minute"\n'
        'counts = "output_tokens"\n'
        '[[rules.limits]]\ntype = "window"\nrate = "5000/hour"\n'
        "counts = {input_tokens = 1, output_tokens = 4}\n"
    )
    r = ratelimit("check", str(path))
    assert r.code == 0, r.err
    assert "8000/minute b8000 output_tokens" in r.out
    assert "5000/hour input_tokens+4*output_tokens" in r.out
    limits = ratelimit("check", str(path), "--json").json()["rules"][0]["limits"]
    counted = [lim.get("counts") for lim in limits]
    assert counted == ["output_tokens", "input_tokens+4*output_tokens"]


def test_check_of_a_bad_file_exits_1_naming_the_field(tmp_path: Path) -> None:
    """A bad config is refused with exit code 1 and the field path, on stderr and in JSON."""
    path = tmp_path / "bad.toml"
    path.write_text(CONFIG.replace('rate = "100/day"', 'rate = "100 per fortnight"'))
    r = ratelimit("check", str(path))
    assert r.code == 1
    assert "rules[0].limits[0].rate: expected a rate like" in r.err
    doc = ratelimit("check", str(path), "--json").json()
    assert doc == {
        "ok": False, "error": "refused", "field": "rules[0].limits[0].rate",
        "message": doc["message"],
    }  # fmt: skip
    missing = ratelimit("check", str(tmp_path / "nope.toml"))
    assert missing.code == 1
    assert "nope.toml: expected a readable TOML file" in missing.err


# -- override ---------------------------------------------------------------------------------


@pytest.mark.redis
async def test_override_set_stores_one_entry_and_list_shows_it(
    redis_url: str, redis: Redis
) -> None:
    """`override set` writes the override (exit 0); `list --json` returns it with its time left."""
    r = ratelimit("override", "set", "images", "per-key", "--rate", "3/day", "--for", "6h",
                  "--reason", "free tier surge", "--json", redis_url=redis_url)  # fmt: skip
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["override"]["slot"] == "images/per-key"
    assert doc["override"]["change"] == "rate=3/day"
    assert doc["checked"] is False
    stored = await redis.hgetall(OVERRIDES)
    assert set(stored) == {b"images/per-key", b"#version"}
    entry = json.loads(stored[b"images/per-key"])
    assert entry["rate"] == "3/day"
    assert entry["reason"] == "free tier surge"
    assert entry["expires_at"] - entry["created_at"] == pytest.approx(6 * 3600)
    listed = ratelimit("override", "list", "--json", redis_url=redis_url).json()
    assert listed["version"] == doc["version"]
    (item,) = listed["overrides"]
    assert item["rule"] == "images"
    assert item["limit"] == "per-key"
    assert 6 * 3600 - 60 < item["time_left"] <= 6 * 3600
    table = ratelimit("override", "list", redis_url=redis_url)
    assert table.out.splitlines()[0].split() == ["RULE", "LIMIT", "CHANGE", "LEFT", "REASON", "BY"]
    assert "6h00m" in table.out or "5h59m" in table.out
    assert "free tier surge" in table.out


BAD_SETS = [
    # (arguments, exit code, what stderr says)
    (["images", "--rate", "5 per fortnight", "--for", "1h"], 1, "rate: expected a rate like"),
    (["images", "--factor", "0", "--for", "1h"], 1, "factor: expected a number > 0"),
    (["images", "gpu", "--block", "--for", "1h"], 1, "limit: expected no limit name"),
    (["images", "--burst", "0", "--for", "1h"], 1, "burst: expected a positive integer"),
    (
        ["images", "--block", "--message", "a\u0007b", "--for", "1h"],
        1,
        "message: expected one line",
    ),
    (["images", "--factor", "0.5", "--block", "--for", "1h"], 2, "exactly one kind of change"),
    (["images", "--for", "1h"], 2, "exactly one kind of change"),
    (["images", "--factor", "0.5"], 2, "one of the arguments --for --until-cleared is required"),
    (["images", "--factor", "0.5", "--for", "6x"], 2, "invalid duration '6x'"),
    (["images", "--factor", "0.5", "--for", "0s"], 2, "must be more than 0"),
    (["images", "--factor", "0.5", "--for", "1h", "--until-cleared"], 2, "not allowed with"),
    (["images", "--factor", "half", "--for", "1h"], 2, "invalid float value"),
    (
        ["images", "--message", "x", "--factor", "2", "--for", "1h"],
        2,
        "--message goes with --block",
    ),
]


@pytest.mark.redis
@pytest.mark.parametrize(("args", "code", "says"), BAD_SETS)
async def test_malformed_override_is_refused_and_never_reaches_redis(
    redis_url: str, redis: Redis, args: list[str], code: int, says: str
) -> None:
    """Bad values exit 1, bad usage exits 2, each with a clear message; Redis stays untouched."""
    r = ratelimit("override", "set", *args, redis_url=redis_url)
    assert r.code == code, r.err
    assert says in r.err
    assert await redis.exists(OVERRIDES) == 0


@pytest.mark.redis
async def test_override_that_does_not_fit_the_config_is_refused(
    redis_url: str, redis: Redis, config: str
) -> None:
    """With --config an override is checked against the rules: a misfit exits 1, naming why."""
    cases = [
        (["imgaes", "--factor", "0.5"], "rule: expected one of the rules 'chat', 'images'"),
        (["images", "gpu", "--rate", "1/minute"], "rate: expected a change a concurrency limit"),
        (["images", "cpu", "--slots", "2"], "limit: expected one of the limits of rule 'images'"),
    ]
    for args, says in cases:
        r = ratelimit("override", "set", *args, "--for", "1h", "--config", config,
                      redis_url=redis_url)  # fmt: skip
        assert r.code == 1, r.err
        assert says in r.err
        assert f"checked against the rules of {config}" in r.err
    assert await redis.exists(OVERRIDES) == 0
    ok = ratelimit("override", "set", "images", "gpu", "--slots", "4", "--for", "1h", "--config",
                   config, "--json", redis_url=redis_url)  # fmt: skip
    assert ok.code == 0, ok.err
    assert ok.json()["checked"] is True


@pytest.mark.redis
async def test_override_is_checked_against_the_rules_running_workers_report(
    redis_url: str, redis: Redis
) -> None:
    """Without --config, the rules the live workers report are what an override must fit."""
    from ratelimit import Concurrency, Rule
    from ratelimit.backends.redis.overrides import RedisOverrideStore
    from ratelimit.core.live import LiveOverrides

    rule = Rule("/v1/images", limits=[Concurrency(8, name="gpu")], name="images")
    live = LiveOverrides([rule], RedisOverrideStore(redis, "ratelimit"), lambda res: None)
    await live.start()
    try:
        await asyncio.sleep(0.05)  # its first report
        r = ratelimit("override", "set", "images", "gpu", "--rate", "3/day", "--for", "1h",
                      redis_url=redis_url)  # fmt: skip
        assert r.code == 1
        assert "checked against the rules of 1 running worker)" in r.err
        ok = ratelimit("override", "set", "images", "gpu", "--slots", "2", "--for", "1h",
                       "--json", redis_url=redis_url)  # fmt: skip
        assert ok.code == 0, ok.err
        assert ok.json()["checked"] is True
    finally:
        await live.aclose()


@pytest.mark.redis
async def test_override_clear_removes_and_is_idempotent(redis_url: str) -> None:
    """`clear RULE LIMIT` removes that limit's override; `clear RULE` the rest; again: nothing."""
    for args in (["images", "gpu", "--slots", "2"], ["images", "--factor", "0.5"]):
        assert ratelimit("override", "set", *args, "--until-cleared", redis_url=redis_url).code == 0
    one = ratelimit("override", "clear", "images", "gpu", "--json", redis_url=redis_url).json()
    assert [o["slot"] for o in one["removed"]] == ["images/gpu"]
    rest = ratelimit("override", "clear", "images", redis_url=redis_url)
    assert rest.code == 0
    assert "cleared images/*: x0.5" in rest.out
    again = ratelimit("override", "clear", "images", "--json", redis_url=redis_url)
    assert again.code == 0
    assert again.json()["removed"] == []
    assert ratelimit("override", "list", "--json", redis_url=redis_url).json()["overrides"] == []


@pytest.mark.redis
async def test_lapsed_overrides_are_not_listed(redis_url: str, redis: Redis) -> None:
    """An override past its expiry is gone from `list` (and dropped by the next write)."""
    r = ratelimit("override", "set", "images", "--factor", "2", "--for", "300ms",
                  redis_url=redis_url)  # fmt: skip
    assert r.code == 0, r.err
    await asyncio.sleep(0.4)
    assert ratelimit("override", "list", "--json", redis_url=redis_url).json()["overrides"] == []
    ratelimit("override", "set", "chat", "--shadow", "--until-cleared", redis_url=redis_url)
    assert set(await redis.hkeys(OVERRIDES)) == {b"chat/!", b"#version"}


# -- status -----------------------------------------------------------------------------------


@pytest.mark.redis
async def test_status_shows_effective_limits_overrides_and_slots_in_use(
    redis_url: str, config: str
) -> None:
    """Per rule and limit: configured and effective numbers, the override with time left, slots."""
    backend = RedisBackend(redis_url)
    gpu = StoreKey("images", "gpu", "*")
    verdict = await backend.decide(
        [LeaseCheck(gpu, 2, 60.0, "lease-a"), LeaseCheck(gpu, 2, 60.0, "lease-b")]
    )
    assert verdict.admitted
    # One request waits in line for the full pool, kept alive by its waiter's heartbeat.
    ticket = LeaseCheck(gpu, 2, 60.0, "0000~lease-c")
    line = QueueCheck(ticket, 4, 0, "", (), 4)
    assert (await backend.enqueue([ticket], line)).outcome == "queued"
    waiter = asyncio.ensure_future(backend.wait(line, 60.0))
    try:
        await asyncio.to_thread(
            ratelimit, "override", "set", "images", "gpu", "--slots", "4", "--for", "2h",
            "--reason", "half the GPUs", redis_url=redis_url,
        )  # fmt: skip
        await asyncio.to_thread(
            ratelimit, "override", "set", "chat", "--enforce", "--until-cleared",
            redis_url=redis_url,
        )  # fmt: skip
        doc = (
            await asyncio.to_thread(
                ratelimit, "status", "--config", config, "--json", redis_url=redis_url
            )
        ).json()
        table = await asyncio.to_thread(
            ratelimit, "status", "--config", config, redis_url=redis_url
        )
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await backend.aclose()
    assert doc["rules_from"] == "config"
    images = {lim["name"]: lim for lim in doc["rules"][0]["limits"]}
    assert images["gpu"]["configured"]["limit"] == 8
    assert images["gpu"]["effective"]["limit"] == 4
    assert images["gpu"]["in_use"] == 2
    assert images["gpu"]["waiting"] == 1
    assert images["gpu"]["override"]["reason"] == "half the GPUs"
    assert 2 * 3600 - 60 < images["gpu"]["override"]["time_left"] <= 2 * 3600
    assert images["per-key"]["override"] is None
    assert "in_use" not in images["per-key"]
    chat = doc["rules"][1]
    assert chat["shadow"] is False  # configured shadow, enforced by the override
    assert table.code == 0
    header = table.out.splitlines()[1]
    assert header.split()[:5] == ["RULE", "MODE", "LIMIT", "CONFIGURED", "EFFECTIVE"]
    gpu_row = next(line for line in table.out.splitlines() if " gpu " in line)
    assert gpu_row.split()[:6] == ["gpu", "8", "slots", "4", "slots", "slots=4"]
    assert header.index("WAITING") == gpu_row.index(" 1 ", header.index("IN USE")) + 1
    assert header.index("EFFECTIVE") == gpu_row.index("4 slots")  # aligned


@pytest.mark.redis
def test_status_watch_prints_one_document_per_refresh(redis_url: str, config: str) -> None:
    """`status --watch N --json` prints one JSON line per refresh until interrupted (exit 0)."""
    environ = {**os.environ, "RATELIMIT_REDIS_URL": redis_url}
    with subprocess.Popen(
        [sys.executable, "-m", "ratelimit", "status", "--config", config, "--json", "--watch",
         "0.2"],
        stdout=subprocess.PIPE, text=True, env=environ, cwd=ROOT,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            first = json.loads(proc.stdout.readline())
            second = json.loads(proc.stdout.readline())
            assert first["rules"][0]["name"] == second["rules"][0]["name"] == "images"
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0


# -- reset ------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_reset_forgives_one_caller_and_no_other(redis_url: str, redis: Redis) -> None:
    """`reset KEY` deletes that caller's buckets (key hashed as the engine does), nobody else's."""
    backend = RedisBackend(redis_url)

    def take(caller: str, rule: str = "images") -> BucketCheck:
        return BucketCheck(StoreKey(rule, "per-key", _digest(caller)), 3600.0, 2, 2)

    try:
        for check in (take("alice"), take("bob"), take("alice", "chat")):
            assert (await backend.decide([check])).admitted
        assert not (await backend.decide([take("alice")])).admitted
        r = ratelimit("reset", "alice", "--rule", "images", "--limit", "per-key", "--json",
                      redis_url=redis_url)  # fmt: skip
        assert r.code == 0, r.err
        assert r.json() == {
            "caller": _digest("alice"),
            "deleted": [f"ratelimit:{{images:{_digest('alice')}}}:per-key:tat"],
        }
        assert (await backend.decide([take("alice")])).admitted  # forgiven: a full burst again
        assert not (await backend.decide([take("bob")])).admitted  # bob is not
        everywhere = ratelimit("reset", "alice", "--json", redis_url=redis_url).json()
        assert len(everywhere["deleted"]) == 2  # images (taken again above) and chat
        nothing = ratelimit("reset", "carol", redis_url=redis_url)
        assert nothing.code == 0
        assert "nothing stored for that caller" in nothing.out
        assert ratelimit("reset", "alice", "--limit", "per-key", redis_url=redis_url).code == 2
    finally:
        await backend.aclose()


# -- connection and usage ---------------------------------------------------------------------


def test_unreachable_redis_exits_3() -> None:
    """A Redis that refuses connections is exit code 3, with the reason on stderr."""
    r = ratelimit("--redis", "redis://127.0.0.1:1/0", "override", "list")
    assert r.code == 3
    assert "cannot reach Redis" in r.err


def test_no_redis_configured_is_a_usage_error() -> None:
    """Without --redis, $RATELIMIT_REDIS_URL or a redis config, the command says what to give."""
    r = ratelimit("override", "list")
    assert r.code == 2
    assert "give --redis URL, set RATELIMIT_REDIS_URL" in r.err


@pytest.mark.redis
def test_options_go_before_or_after_the_command_and_prefix_separates_apps(redis_url: str) -> None:
    """--redis/--prefix/--json work in either place; another prefix is another store."""
    r = ratelimit("--prefix", "other", "override", "set", "images", "--factor", "2",
                  "--until-cleared", "--redis", redis_url)  # fmt: skip
    assert r.code == 0, r.err
    assert ratelimit("override", "list", "--json", redis_url=redis_url).json()["overrides"] == []
    mine = ratelimit("--json", "override", "list", "--prefix", "other", redis_url=redis_url).json()
    assert [o["slot"] for o in mine["overrides"]] == ["images/*"]


def test_console_script_is_declared() -> None:
    """pyproject declares the `ratelimit` console script at the same entry point."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["scripts"] == {"ratelimit": "ratelimit.cli:main"}


# -- pieces, in process -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("6h", 21600), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("2d", 172800), ("300ms", 0.3),
     ("12.5", 12.5), ("1.5h", 5400)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    """--for takes 6h, 90m, 1h30m, 45s, 2d, 300ms or plain seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


def test_time_left_reads_briefly() -> None:
    """Times left read at a glance, rounded up; None is "until cleared"."""
    assert [human_seconds(s) for s in (None, 0.2, 59, 61, 3600, 5430, 90000)] == [
        "until cleared", "1s", "59s", "1m01s", "1h00m", "1h30m", "1d1h",
    ]  # fmt: skip


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colours_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Colour codes appear on a TTY, not in a pipe, not with NO_COLOR, never with --json."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert Out(_Terminal(), as_json=False).paint("x", "red") == "\x1b[31mx\x1b[0m"
    assert Out(io.StringIO(), as_json=False).paint("x", "red") == "x"
    assert Out(_Terminal(), as_json=True).paint("x", "red") == "x"
    monkeypatch.setenv("NO_COLOR", "1")
    assert Out(_Terminal(), as_json=False).paint("x", "red") == "x"


# -- imports from the current directory, wording --------------------------------------------

#: A stand-in for the installed `ratelimit` console script (`from ratelimit.cli import main`).
#: Python puts the script's own folder first on sys.path, not the current directory. As
#: installed from a wheel, only the package itself is importable: the path entry of an
#: editable install (a checkout, with `examples/` beside `ratelimit/`) is dropped.
CONSOLE_SCRIPT = """
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if p == here or not os.path.isdir(os.path.join(p, "ratelimit"))]
from ratelimit.cli import main
sys.exit(main())
"""


def console(tmp_path: Path, *args: str, cwd: Path) -> Result:
    """Run the command as its installed console script does, from `cwd`, with no PYTHONPATH."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "ratelimit").symlink_to(ROOT / "ratelimit")  # this checkout's code
        (bin_dir / "ratelimit-script.py").write_text(CONSOLE_SCRIPT)
    environ = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RATELIMIT_REDIS_URL")
    }
    proc = subprocess.run(
        [sys.executable, str(bin_dir / "ratelimit-script.py"), *args],
        capture_output=True, text=True, env=environ, cwd=cwd, timeout=30, check=False,
    )  # fmt: skip
    return Result(proc)


def test_check_imports_callables_from_the_current_directory(tmp_path: Path) -> None:
    """`module:callable` entries are imported from where the command runs, as uvicorn
    imports an app: the installed script does not have the current directory on its path."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "tiers.py").write_text("def paid(scope):\n    return 'paid'\n")
    (project / "ratelimit.toml").write_text(
        '[[rules]]\npath = "/v1/images"\nname = "images"\n\n[[rules.limits]]\n'
        'type = "token_bucket"\nrate = "5/minute"\nkey = "tiers:paid"\n'
    )
    r = console(tmp_path, "check", "ratelimit.toml", cwd=project)
    assert r.code == 0, r.err
    assert "<function paid at" in r.out


def test_check_reads_the_repos_own_example_from_the_repo_root(tmp_path: Path) -> None:
    """`ratelimit check examples/imagegen/ratelimit.toml` from the repository root works
    without PYTHONPATH: its keys live in `examples.imagegen.keys`."""
    r = console(tmp_path, "check", "examples/imagegen/ratelimit.toml", cwd=ROOT)
    assert r.code == 0, r.err
    assert "ok, 1 rule, backend memory" in r.out
    assert "8 slots q16 2s" in r.out


@pytest.mark.parametrize(
    ("count", "noun", "text"),
    [(0, "rule", "0 rules"), (1, "rule", "1 rule"), (1, "slot", "1 slot"), (8, "slot", "8 slots"),
     (1, "running worker", "1 running worker"), (2, "worker", "2 workers")],
)  # fmt: skip
def test_counts_agree_with_their_nouns(count: int, noun: str, text: str) -> None:
    """Every count the command prints agrees with its noun (`1 slot`, never `1 slots`)."""
    assert plural(count, noun) == text


def test_a_one_slot_limit_reads_1_slot(tmp_path: Path) -> None:
    """`check` of a rule with one concurrency slot prints `1 rule` and `1 slot`."""
    path = tmp_path / "one.toml"
    path.write_text('[[rules]]\npath = "/x"\n\n[[rules.limits]]\ntype = "concurrency"\nlimit = 1\n')
    r = ratelimit("check", str(path))
    assert r.code == 0, r.err
    assert "ok, 1 rule, backend memory" in r.out
    assert " 1 slot " in r.out + " "
    assert "slots" not in r.out


@pytest.mark.redis
def test_status_names_the_overrides_version(redis_url: str, config: str) -> None:
    """The status line says what its version is: that of the overrides, or that none were
    ever set (never a bare `version -`)."""
    before = ratelimit("status", "--config", config, redis_url=redis_url)
    assert before.code == 0, before.err
    assert "overrides: none set yet" in before.out.splitlines()[0]
    assert "version -" not in before.out
    ratelimit("override", "set", "images", "--factor", "0.5", "--for", "1h", redis_url=redis_url)
    after = ratelimit("status", "--config", config, redis_url=redis_url)
    assert "overrides version 1 " in after.out.splitlines()[0]


def test_version_prints_the_installed_distribution() -> None:
    """`ratelimit --version` prints the version of the installed `surgelimit`."""
    from importlib.metadata import version

    r = ratelimit("--version")
    assert r.code == 0, r.err
    assert r.out == f"ratelimit {version('surgelimit')}\n"


@pytest.mark.redis
@pytest.mark.parametrize("option", ["--slots", "--limit"])
async def test_override_slots_are_given_with_slots_and_the_old_limit_still_works(
    redis_url: str, option: str
) -> None:
    """`override set RULE LIMIT --slots N` sets N slots; `--limit N`, its first name beside
    the positional LIMIT (a limit's name), still works but is no longer shown in the help."""
    r = ratelimit("override", "set", "images", "gpu", option, "4", "--until-cleared", "--json",
                  redis_url=redis_url)  # fmt: skip
    assert r.code == 0, r.err
    assert r.json()["override"]["slots"] == 4
    shown = ratelimit("override", "set", "--help").out
    assert "--slots N" in shown
    assert "--limit" not in shown
