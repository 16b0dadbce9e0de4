"""Key functions: who a limit counts against.

A key is any callable `(scope) -> str | None`, sync or async. `None` exempts
the request from that limit. The text a key returns is never stored as is:
the engine hashes it, so hostile values cannot reach another caller's state.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from .._errors import ConfigError
from .._types import Scope
from .body import body_of

__all__ = ["GLOBAL", "body_field", "client_ip", "header"]


def digest(text: str) -> str:
    """The stored form of a caller key: fixed size, no raw request bytes."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class _Global:
    """The one shared key: every request counts against the same state."""

    __slots__ = ()
    #: Marks a key as shared capacity: refusals on it are 503, not 429.
    shared = True

    def __call__(self, scope: Scope) -> str:
        return "*"

    def __repr__(self) -> str:
        return "keys.GLOBAL"


GLOBAL = _Global()
"""Every request shares one key: for fleet-wide capacity such as a GPU pool (refusals are 503)."""


class header:
    """Key by the first value of request header `name`; missing header gives `default`.

    `default=None` (the default) exempts requests without the header from this
    limit: pair it with an IP-keyed limit, or set a default to put them all in
    one shared bucket.
    """

    __slots__ = ("_raw", "default", "name")
    shared = False

    def __init__(self, name: str, *, default: str | None = None) -> None:
        if not isinstance(name, str) or not name or not name.isascii() or ":" in name:
            raise ConfigError("name", "an HTTP header name", name)
        self.name = name.lower()
        self._raw = self.name.encode("latin-1")
        if default is not None and not isinstance(default, str):
            raise ConfigError("default", "a string, or None to exempt requests without it", default)
        self.default = default

    def __call__(self, scope: Scope) -> str | None:
        raw = self._raw
        for k, v in scope["headers"]:
            if k == raw:
                return bytes(v).decode("latin-1")
        return self.default

    def __repr__(self) -> str:
        return f"keys.header({self.name!r})"


class body_field:
    """Key by top-level field `name` of the JSON request body (e.g. `"model"`, for
    per-model limits); a missing or null field gives `default` (None: exempt).

    The body is read by the middleware for rules with such a key (see
    `Rule(body_limit=)`); a field that is not a string or an integer makes the
    request unratable (400), never free.
    """

    __slots__ = ("default", "name")
    shared = False
    #: Tells the rule to have the body read before its keys are asked.
    reads_body = True

    def __init__(self, name: str, *, default: str | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError("name", "the name of a field of the JSON body", name)
        self.name = name
        if default is not None and not isinstance(default, str):
            raise ConfigError("default", "a string, or None to exempt requests without it", default)
        self.default = default

    def __call__(self, scope: Scope) -> str | None:
        value = body_of(scope).get(self.name)
        if value is None:
            return self.default
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"body field {self.name!r} is {type(value).__name__}, not a string")

    def __repr__(self) -> str:
        return f"keys.body_field({self.name!r})"


class client_ip:
    """Key by the client's IP address.

    Forwarding headers are believed only when the socket peer is one of
    `trusted_proxies` (addresses or networks); the client is then the
    right-most address in `X-Forwarded-For` (or `Forwarded: for=`) that is not
    itself a trusted proxy. IPv6 clients are keyed by their /`ipv6_prefix`
    network (64 by default), since one host usually owns a whole /64.
    """

    __slots__ = ("_forwarded", "_trusted", "ipv6_prefix")
    shared = False

    def __init__(
        self,
        *,
        trusted_proxies: Iterable[str] = (),
        ipv6_prefix: int = 64,
        header: str = "x-forwarded-for",
    ) -> None:
        if isinstance(trusted_proxies, str):
            raise ConfigError("trusted_proxies", "a list of addresses or networks", trusted_proxies)
        nets = []
        for i, item in enumerate(trusted_proxies):
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except (ValueError, TypeError):
                raise ConfigError(
                    f"trusted_proxies[{i}]", "an IP address or network like 10.0.0.0/8", item
                ) from None
        self._trusted = tuple(nets)
        if (
            not isinstance(ipv6_prefix, int)
            or isinstance(ipv6_prefix, bool)
            or not (1 <= ipv6_prefix <= 128)
        ):
            raise ConfigError("ipv6_prefix", "an integer from 1 to 128", ipv6_prefix)
        self.ipv6_prefix = ipv6_prefix
        if not isinstance(header, str) or header.lower() not in ("x-forwarded-for", "forwarded"):
            raise ConfigError("header", '"x-forwarded-for" or "forwarded"', header)
        self._forwarded = header.lower().encode("latin-1")

    def __call__(self, scope: Scope) -> str | None:
        client = scope.get("client")
        peer = client[0] if client else None
        if not peer:
            return "unknown"
        if self._trusted:
            peer = self._through_proxies(peer, scope)
        if ":" not in peer:
            return peer  # IPv4 fast path: nothing to normalise
        return self._normalise(peer)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def _through_proxies(self, peer: str, scope: Scope) -> str:
        if not self._is_trusted(peer):
            return peer
        hops = _forwarded_for(scope["headers"], self._forwarded)
        address = peer
        for hop in reversed(hops):
            if not self._is_trusted(address):
                break
            try:
                address = str(ipaddress.ip_address(hop))
            except ValueError:
                break  # garbage left of our proxies: the last trusted hop is all we know
        return address

    def _normalise(self, address: str) -> str:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address  # not an address (e.g. a unix socket name): key by the text
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            net = ipaddress.IPv6Network((ip, self.ipv6_prefix), strict=False)
            return str(net)
        return str(ip)

    def __repr__(self) -> str:
        return "keys.client_ip()"


def _forwarded_for(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """All hop addresses of the forwarding header, left to right, every occurrence joined."""
    hops: list[str] = []
    for k, v in headers:
        if k != name:
            continue
        text = v.decode("latin-1")
        if name == b"x-forwarded-for":
            hops.extend(part.strip() for part in text.split(","))
        else:
            for element in text.split(","):
                for pair in element.split(";"):
                    key, _, value = pair.strip().partition("=")
                    if key.strip().lower() == "for":
                        hops.append(_strip_forwarded_node(value.strip()))
    return hops


def _strip_forwarded_node(node: str) -> str:
    """`"[2001:db8::1]:4711"` -> `2001:db8::1`; `192.0.2.1:80` -> `192.0.2.1`."""
    node = node.strip('"')
    if node.startswith("["):
        return node[1 : node.find("]")] if "]" in node else node
    if node.count(":") == 1:
        return node.split(":", 1)[0]
    return node
