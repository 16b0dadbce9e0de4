"""A Redis backend's connection set-up: its settings checked, its client and transport built.

Which transport carries script calls (see `transport`): our own pipelined
connections for `redis://` and `unix://` URLs, one per node on a cluster; a
redis-py client for TLS and for a client passed in by the user.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..._errors import ConfigError
from .cluster import ClusterTransport
from .scripts import ScriptSet
from .transport import ClientTransport, PipelinedTransport, Transport

#: Default seconds from writing a call to its reply. Measured on a 2-core host with
#: Redis and 10 worker processes x 32 concurrent decisions (5x oversubscribed), the
#: slowest healthy reply took 24 ms (p99.9 24 ms; 4 processes: 5 ms): a timeout near
#: that would turn load into failures (fail-open admissions) exactly when limits
#: matter. The clock starts when the bytes are written and replies are read before
#: the deadline is checked, so this process's own stalls never count; but a Redis
#: starved of CPU by other work on a small host answered later than 0.1 s now and
#: then (benchmarks beside test suites on 2 cores), each such reply a failed-open
#: decision. A dead Redis does not wait for it: a refused connection fails at once
#: and the breaker stops calling; only a hung one costs this, once per call the
#: breaker lets through.
DEFAULT_TIMEOUT = 0.5
#: Default seconds to open a connection (loopback or LAN: well under 1 ms). At the
#: deadline the kernel is asked whether the socket connected, so a busy loop does not
#: fail a connection that succeeded.
DEFAULT_CONNECT_TIMEOUT = 0.1
#: The least connect timeout given to redis-py's own connections (TLS, cluster
#: discovery). redis-py waits for a connection with `asyncio.wait_for`, so
#: a burst of first calls on a busy loop could fail connections that succeeded at
#: 0.1 s (seen: 20 concurrent first window hits on a cluster). Only these paths pay it,
#: and the breaker stops a dead Redis from costing it more than a few times.
CLIENT_CONNECT_TIMEOUT_FLOOR = 1.0
#: Connections per node and process of the redis-py cluster client, which carries
#: script calls over TLS: it fails a call (it does not wait)
#: when every connection to the node is busy. Other script calls are pipelined.
CLUSTER_MAX_CONNECTIONS = 1000


class Connection(NamedTuple):
    """What `connect` builds: the redis-py client and the transport of script calls."""

    client: Redis | RedisCluster
    transport: Transport
    #: Whether the client was made here (and is closed with the backend).
    owns_client: bool


def connect(
    url: str,
    *,
    client: Redis | RedisCluster | None,
    cluster: bool,
    timeout: float,
    connect_timeout: float,
    scripts: ScriptSet,
) -> Connection:
    """The client and transport for `url` (or the `client` passed in); nothing connects yet."""
    client_connect_timeout = max(connect_timeout, CLIENT_CONNECT_TIMEOUT_FLOOR)
    if client is not None:
        return Connection(client, ClientTransport(client), False)
    if cluster:
        options = cluster_options(url, timeout, client_connect_timeout)
        routed = _RoutedCluster(**options)
        if options["ssl"]:
            return Connection(routed, ClientTransport(routed), True)
        transport: Transport = ClusterTransport(
            routed,
            timeout=timeout,
            connect_timeout=connect_timeout,
            username=options.get("username"),
            password=options.get("password"),
            scripts=scripts.all(),
        )
        return Connection(routed, transport, True)
    try:
        made = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=client_connect_timeout,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as exc:
        raise ConfigError("url", f"a redis://, rediss:// or unix:// URL ({exc})", url) from None
    if PipelinedTransport.supports(url):
        transport = PipelinedTransport(
            url, timeout=timeout, connect_timeout=connect_timeout, scripts=scripts.all()
        )
        return Connection(made, transport, True)
    return Connection(made, ClientTransport(made), True)


def cluster_options(url: str, timeout: float, connect_timeout: float) -> dict[str, Any]:
    """`RedisCluster` arguments for a cluster URL: its nodes, credentials and our timeouts."""
    expected = "redis://[user:password@]host:port[,host:port...] naming Redis Cluster nodes"
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError("url", expected, url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes: list[ClusterNode] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = port, "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("url", expected, url)
        nodes.append(ClusterNode(host, int(port)))
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError("url", "database 0 (a Redis Cluster has only database 0)", url)
    options: dict[str, Any] = {
        "startup_nodes": nodes,
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout,
        # No retries: a failure is reported at once, and the breaker decides.
        "retry": Retry(NoBackoff(), 0),
        "max_connections": CLUSTER_MAX_CONNECTIONS,
        "ssl": parts.scheme == "rediss",
    }
    if userinfo:
        user, colon, password = userinfo.partition(":")
        if colon:
            options["username"] = unquote(user) or None
            options["password"] = unquote(password)
        else:
            options["password"] = unquote(user)
    return options


def seconds(field: str, value: object) -> float:
    """`value` as seconds, if it is a finite number > 0; else ConfigError naming `field`."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(field, "a number of seconds > 0", value)
    return float(value)


class _RoutedCluster(RedisCluster):
    """A `RedisCluster` that finishes discovery before routing any command.

    redis-py (8.1) routes a command issued before discovery completes as if
    it had no key: to a random node. Concurrent first commands (the first
    requests of a surge, on `Window` limits) then meet MOVED replies, and
    every few MOVED the client closes all its connections, failing calls in
    flight. Waiting for discovery first routes every command by its slot.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.initialize()  # at once when already initialized
        return await super().execute_command(*args, **kwargs)
