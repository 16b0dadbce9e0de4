"""What every benchmark script needs: venvs for the code under test, free
ports, machine facts, and a shared `RESULTS.md` where each script owns a section.

Standard library only: the scripts may run from any Python 3.10+.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQUIREMENTS = HERE / "requirements.txt"
RESULTS = HERE / "RESULTS.md"
OUT = HERE / "out"

HOST = "127.0.0.1"

#: Peers that install a top-level `ratelimit` module: each gets a venv of its own.
ISOLATED = ("asgi-ratelimit",)

#: A measurement during which other processes used more than this share of a core
#: is disturbed: it is measured once more after waiting for the machine to calm down.
DISTURBED = 0.25

T = TypeVar("T")

#: Wall-clock time (`time.time()`) after which a disturbed measurement is no longer
#: repeated: the suite sets it so a busy machine cannot stretch a run past its budget.
retry_until: float | None = None


def may_retry() -> bool:
    """Whether there is still time to measure a disturbed measurement again."""
    return retry_until is None or time.time() < retry_until


_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path = REQUIREMENTS) -> list[str]:
    """Requirement specifiers from `path`, without comments and blank lines."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def requirement_name(line: str) -> str:
    """The canonical distribution name of a requirement line."""
    m = _NAME.match(line)
    if not m:
        raise ValueError(f"cannot read a package name from requirement {line!r}")
    return _canonical(m.group(1))


@dataclass(frozen=True)
class Venv:
    """A benchmark virtual environment: `name` under benchmarks/, what goes in it."""

    name: str
    requirements: tuple[str, ...]
    #: Install this repository (editable) too: the working tree is what gets measured.
    with_project: bool = False

    @property
    def path(self) -> Path:
        return HERE / f".venv-{self.name}"

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def standard_venvs() -> dict[str, Venv]:
    """`bench` (this library and the peers that coexist with it) and one per isolated peer."""
    lines = requirement_lines()
    isolated = {_canonical(n) for n in ISOLATED}
    shared = tuple(ln for ln in lines if requirement_name(ln) not in isolated)
    venvs = {"bench": Venv("bench", shared, with_project=True)}
    for line in lines:
        name = requirement_name(line)
        if name in isolated:
            venvs[name] = Venv(name, (*shared, line))
    return venvs


def _stamp(venv: Venv) -> str:
    digest = hashlib.sha256("\n".join(venv.requirements).encode())
    digest.update(sys.version.encode())
    if venv.with_project:
        digest.update((REPO / "pyproject.toml").read_bytes())
    return digest.hexdigest()


def ensure_venv(venv: Venv, *, fresh: bool = False, log: bool = True) -> Path:
    """Create or update `venv` when its requirements changed; return its python.

    A stamp of the requirements (and of pyproject.toml for the project venv)
    makes later runs skip pip entirely.
    """
    stamp_file = venv.path / ".bench-stamp"
    stamp = _stamp(venv)
    current = stamp_file.read_text() if stamp_file.exists() else None
    if not fresh and venv.python.exists() and current == stamp:
        return venv.python
    if log:
        print(f"setting up {venv.path.relative_to(REPO)} (pip install) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv.path)], check=True)
    pip = [str(venv.python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    args = list(venv.requirements)
    if venv.with_project:
        args += ["-e", str(REPO)]
    # Captured: the pip configuration of some machines is chatty; shown only on failure.
    result = subprocess.run([*pip, *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"pip install into {venv.path} failed")
    stamp_file.write_text(stamp)
    return venv.python


def python_can_import(python: Path, modules: Iterable[str]) -> bool:
    """Whether `python` imports every module in `modules`."""
    code = "".join(f"import {m}\n" for m in modules)
    result = subprocess.run([str(python), "-c", code], capture_output=True, cwd=HERE)
    return result.returncode == 0


def versions(python: Path, distributions: Sequence[str]) -> dict[str, str]:
    """Installed versions of `distributions` where `python` runs (absent ones left out)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [str(python), "-c", code, *distributions],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE,
    )
    data: dict[str, str] = json.loads(result.stdout)
    return data


def ensure_tool(name: str, apt_package: str | None = None) -> str:
    """Path of command `name`, installing its Debian package when missing and root."""
    found = shutil.which(name)
    if found:
        return found
    package = apt_package or name
    if os.geteuid() != 0:
        raise SystemExit(f"{name} is missing: run `sudo apt-get install -y {package}`")
    print(f"installing {package} with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(install, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"apt-get installed {package} but {name} is still not on PATH")
    return found


def pin(cpu: int) -> tuple[str, ...]:
    """A `taskset -c CPU` prefix, or nothing when taskset is missing or there is one core."""
    taskset = shutil.which("taskset")
    if taskset is None or (os.cpu_count() or 1) < 2:
        return ()
    return (taskset, "-c", str(cpu))


def child_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH and VIRTUAL_ENV (a venv's python decides its path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_version(redis_server: str) -> str:
    """The version `redis-server --version` reports, e.g. "7.0.15"."""
    probe = subprocess.run([redis_server, "--version"], capture_output=True, text=True)
    return next((w.removeprefix("v=") for w in probe.stdout.split() if w.startswith("v=")), "?")


@contextmanager
def redis_server(
    executable: str, *, port: int | None = None, prefix: Sequence[str] = ()
) -> Iterator[tuple[int, int]]:
    """A redis-server of our own on a free loopback port: yields (port, pid); stopped by PID.

    No persistence (`--save "" --appendonly no`); `prefix` goes before the
    command (a `taskset` pin).
    """
    port = port or free_port()
    cmd = [
        *prefix, executable, "--port", str(port), "--bind", HOST,
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
    ]  # fmt: skip
    OUT.mkdir(exist_ok=True)
    log_path = OUT / f"redis-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_redis(proc, port, log_path)
        yield port, proc.pid
    finally:
        stop_process(proc)


def _wait_for_redis(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Wait until the server answers PING (a raw socket: this process has no Redis client)."""
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{log_path.read_text()[-2000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server not answering on {port}")
        time.sleep(0.05)


def interleaved(
    names: Sequence[str],
    rounds: int,
    measure: Callable[[str, int], T],
    others: Callable[[T], float],
    describe: Callable[[T], str],
    log: Callable[[str], None] = print,
    label: str = "",
    retry: bool = True,
) -> dict[str, list[T]]:
    """Measure every name once per round, each round starting one name later (A B C, B C A).

    A measurement during which other processes used over `DISTURBED` of a
    core (`others(result)`) is taken once more if `retry`; the second one stands.
    """
    samples: dict[str, list[T]] = {n: [] for n in names}
    for rnd in range(rounds):
        shift = rnd % len(names) if names else 0
        for name in [*names[shift:], *names[:shift]]:
            for attempt in range(2):
                result = measure(name, rnd)
                busy = others(result)
                flag = f"  (disturbed: others used {busy:.2f} core)" if busy > DISTURBED else ""
                log(f"{label}round {rnd + 1}/{rounds}  {name:<24} {describe(result)}{flag}")
                if busy <= DISTURBED or attempt or not retry or not may_retry():
                    break
            samples[name].append(result)
    return samples


def pick(
    parser: argparse.ArgumentParser, text: str, names: Iterable[str], what: str
) -> tuple[str, ...]:
    """The comma-separated `text` as names, each one of `names`, or a usage error."""
    known = list(names)
    chosen = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in chosen if n not in known]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {known}")
    return chosen


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_busy_seconds() -> float:
    """CPU seconds spent busy on all cores since boot (from /proc/stat; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by process `pid` (0 if unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def wait_for_quiet(max_wait: float, threshold: float = 0.15, window: float = 0.3) -> float:
    """Wait (up to `max_wait` s) until other work uses under `threshold` of a core.

    The benchmarks share a 2-core machine with whatever else runs (test suites,
    builds); a run started while that work is busy measures it, not us.
    Returns the busy fraction last seen.
    """
    deadline = time.monotonic() + max_wait
    while True:
        before = cpu_busy_seconds()
        time.sleep(window)
        busy = (cpu_busy_seconds() - before) / window
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def code_revision(*paths: str) -> str:
    """The repository's commit, noting uncommitted changes under `paths` (the code measured)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    where = ", ".join(f"{p}/" for p in paths) or "the tree"
    return f"commit {head}" + (f" with uncommitted changes in {where}" if dirty else "")


def cpu_model() -> str:
    """The CPU model name, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines() -> list[str]:
    """Markdown bullet lines describing this machine."""
    return [
        f"- Machine: {os.cpu_count()} cores ({cpu_model()}), "
        f"{platform.system()} {platform.release()}",
        f"- Python: {platform.python_implementation()} {platform.python_version()}",
    ]


_HEADER = """# Benchmark results

Each section below is written by the script it names, between its markers;
run the script again rather than editing the numbers by hand.
"""


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace section `name` of `path` (between its start/end markers), keeping the rest."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else _HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
