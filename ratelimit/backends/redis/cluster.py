"""Script calls on a Redis Cluster: one pipelined connection per node, calls sent by slot."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from redis import exceptions as rx
from redis.asyncio import RedisCluster

from .lane import Done, retrieve
from .scripts import Script
from .transport import AwaitedOnly, PipelinedTransport

#: Redirects one call may follow (a slot moves at most once or twice during a resharding).
_MAX_REDIRECTS = 5


class ClusterTransport(AwaitedOnly):
    """Script calls on a Redis Cluster, pipelined on one connection per node.

    `client` is used for topology only: `initialize()` discovers the nodes
    and slots, `get_node_from_key` maps a call's first key to its node (every
    key of a call shares one slot), and `nodes_manager.initialize()` re-reads
    the map after a MOVED redirect or a failure to reach a node (a failover
    may have moved its slots). MOVED and ASK redirects are followed at once;
    CLUSTERDOWN is reported as `ClusterDownError` (the slot has no serving
    node: the store is unreachable for it). Releases are posted to their node;
    nothing is `send`-ed ahead, since a packed call names no node.
    """

    def __init__(
        self,
        client: RedisCluster,
        *,
        timeout: float,
        connect_timeout: float,
        username: str | None = None,
        password: str | None = None,
        scripts: Sequence[Script] = (),
    ) -> None:
        self.client = client
        self._scripts = tuple(scripts)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        auth = ""
        if password is not None:
            auth = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
        self._auth = auth
        self._nodes: dict[tuple[str, int], PipelinedTransport] = {}
        self._ready = False
        self._discovered = False
        self._refreshing: asyncio.Task[None] | None = None

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        packed: bytes | None = None,
    ) -> Any:
        """EVALSHA on the node serving `keys` (reloaded there on NOSCRIPT), following redirects."""
        if not self._ready:
            await self._refresh()
        node = self.client.get_node_from_key(keys[0])
        assert node is not None
        address = (node.host, int(node.port))
        asking = False
        for _ in range(_MAX_REDIRECTS):
            try:
                node_call = self._node(address).evalsha
                return await node_call(script, keys, args, packed, asking=asking)
            except rx.ResponseError as exc:
                kind, _, rest = str(exc).partition(" ")
                if kind == "CLUSTERDOWN":
                    raise rx.ClusterDownError(str(exc)) from None
                if kind not in ("MOVED", "ASK"):
                    raise
                _, _, target = rest.partition(" ")
                host, _, port = target.rpartition(":")
                address = (host or node.host, int(port))
                asking = kind == "ASK"
                if kind == "MOVED":  # the slot lives elsewhere now: re-read the map
                    self._ready = False
            except (rx.ConnectionError, rx.TimeoutError):
                self._ready = False  # a failover may have moved this node's slots
                raise
        raise rx.ClusterError(f"too many redirects for a call on {keys[0]!r}")

    def post(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        done: Done,
        packed: bytes | None = None,
    ) -> bool:
        """EVALSHA on the node serving `keys`, answered to `done` (see `Transport.post`).

        Only to a node already connected, with the slot map read: otherwise
        False. A MOVED or ASK reply goes to `done` as an error (retry through
        `evalsha`, which follows redirects).
        """
        if not self._ready:
            return False
        node = self.client.get_node_from_key(keys[0])
        if node is None:
            return False
        transport = self._nodes.get((node.host, int(node.port)))
        return transport is not None and transport.post(script, keys, args, done, packed)

    async def aclose(self) -> None:
        """Close every node's connection (the topology client is closed by its owner)."""
        refreshing, self._refreshing = self._refreshing, None
        if refreshing is not None and not refreshing.done():
            refreshing.cancel()
        nodes, self._nodes = self._nodes, {}
        for transport in nodes.values():
            await transport.aclose()

    async def any_node_url(self) -> str:
        """A `redis://` URL of one master (with credentials), for connections that need
        no particular slot: a subscription (PUBLISH reaches every node of a cluster)."""
        await self._refresh()
        nodes = self.client.get_primaries() or self.client.get_nodes()
        node = random.choice(nodes)
        host = f"[{node.host}]" if ":" in node.host else node.host
        return f"redis://{self._auth}{host}:{node.port}/0"

    def _node(self, address: tuple[str, int]) -> PipelinedTransport:
        transport = self._nodes.get(address)
        if transport is None:
            host, port = address
            host = f"[{host}]" if ":" in host else host
            transport = self._nodes[address] = PipelinedTransport(
                f"redis://{self._auth}{host}:{port}/0",
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
                scripts=self._scripts,
            )
        return transport

    async def _refresh(self) -> None:
        """(Re)read the slot map, once however many callers are waiting for it."""
        loop = asyncio.get_running_loop()
        task = self._refreshing
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._refreshing = loop.create_task(self._read_map())
            task.add_done_callback(retrieve)
        await asyncio.shield(task)

    async def _read_map(self) -> None:
        client = self.client
        # Discovery first (connects the client); later, a refresh of the slot map.
        reading = client.nodes_manager.initialize() if self._discovered else client.initialize()
        try:
            await asyncio.wait_for(reading, self.connect_timeout + self.timeout)
        except rx.RedisClusterException as exc:  # "cannot be connected": no node answered
            raise rx.ConnectionError(f"Redis Cluster unreachable: {exc}") from exc
        self._discovered = True
        self._ready = True
