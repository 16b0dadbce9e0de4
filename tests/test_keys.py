"""Key functions: who a limit counts against, and that hostile input cannot pick it."""

from __future__ import annotations

from typing import Any

import pytest

from ratelimit import ConfigError, keys


def scope(
    client: str | None = "203.0.113.7", headers: list[tuple[str, str]] = ()
) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "type": "http",
        "client": (client, 1234) if client else None,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }


def test_global_is_one_shared_key() -> None:
    """GLOBAL gives every request the same key and marks it shared."""
    assert keys.GLOBAL(scope("1.1.1.1")) == keys.GLOBAL(scope("2.2.2.2"))
    assert keys.GLOBAL.shared


def test_header_key_uses_the_first_value_and_exempts_when_missing() -> None:
    """header(name) reads the first value (as Starlette does); missing means exempt."""
    key = keys.header("X-API-Key")
    a = key(scope(headers=[("x-api-key", "a"), ("x-api-key", "b")]))
    assert a == key(scope(headers=[("x-api-key", "a")]))
    assert a != key(scope(headers=[("x-api-key", "b")]))
    assert key(scope()) is None
    assert keys.header("x-api-key", default="anonymous")(scope()) == "anonymous"


@pytest.mark.parametrize("bad", ["", "x-api:key", "ключ", 42])
def test_header_name_is_validated(bad: object) -> None:
    """A bad header name fails at construction naming the field."""
    with pytest.raises(ConfigError, match=r"^name: expected an HTTP header name"):
        keys.header(bad)  # type: ignore[arg-type]


def test_client_ip_ignores_forwarding_headers_from_untrusted_peers() -> None:
    """Without trusted proxies, X-Forwarded-For is attacker text and is ignored."""
    key = keys.client_ip()
    spoofed = scope("203.0.113.7", [("x-forwarded-for", "198.51.100.1")])
    assert key(spoofed) == key(scope("203.0.113.7"))


def test_client_ip_walks_forwarded_for_right_to_left_through_trusted_proxies() -> None:
    """The client is the right-most address that is not one of our proxies."""
    key = keys.client_ip(trusted_proxies=["10.0.0.0/8"])
    s = scope("10.0.0.2", [("x-forwarded-for", "6.6.6.6, 198.51.100.9, 10.0.0.5")])
    assert key(s) == key(scope("198.51.100.9"))


def test_client_ip_joins_repeated_forwarded_for_headers() -> None:
    """Two X-Forwarded-For lines count as one list, in order."""
    key = keys.client_ip(trusted_proxies=["10.0.0.0/8"])
    s = scope("10.0.0.2", [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "198.51.100.9")])
    assert key(s) == key(scope("198.51.100.9"))


def test_client_ip_reads_the_forwarded_header_when_asked() -> None:
    """RFC 7239 `Forwarded: for=` with quoted IPv6 and ports is understood."""
    key = keys.client_ip(trusted_proxies=["10.0.0.1"], header="forwarded")
    s = scope("10.0.0.1", [("forwarded", 'for="[2001:db8:cafe::17]:4711";proto=https')])
    assert key(s) == key(scope("2001:db8:cafe::1"))


def test_garbage_in_forwarded_for_stops_at_the_last_trusted_hop() -> None:
    """A malformed hop cannot become a key of the attacker's choosing."""
    key = keys.client_ip(trusted_proxies=["10.0.0.0/8"])
    s1 = scope("10.0.0.2", [("x-forwarded-for", "anything-i-like")])
    s2 = scope("10.0.0.2", [("x-forwarded-for", "something-else")])
    assert key(s1) == key(s2) == key(scope("10.0.0.2"))


def test_ipv6_clients_are_keyed_by_their_slash_64() -> None:
    """Addresses in one /64 share a key; another /64 does not; the prefix is configurable."""
    key = keys.client_ip()
    assert key(scope("2001:db8:1:2::1")) == key(scope("2001:db8:1:2:ffff::9"))
    assert key(scope("2001:db8:1:2::1")) != key(scope("2001:db8:1:3::1"))
    k128 = keys.client_ip(ipv6_prefix=128)
    assert k128(scope("2001:db8:1:2::1")) != k128(scope("2001:db8:1:2::2"))


def test_ipv4_mapped_ipv6_is_the_ipv4_client() -> None:
    """::ffff:1.2.3.4 and 1.2.3.4 are the same caller."""
    key = keys.client_ip()
    assert key(scope("::ffff:192.0.2.1")) == key(scope("192.0.2.1"))


def test_missing_client_shares_one_unknown_key() -> None:
    """A scope without a client (e.g. a unix socket) gets one shared 'unknown' key."""
    assert keys.client_ip()(scope(None)) == keys.client_ip()(scope(None))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies"),
        ({"trusted_proxies": ["10.0.0.0/8", "nope"]}, r"trusted_proxies\[1\]"),
        ({"ipv6_prefix": 0}, "ipv6_prefix"),
        ({"header": "x-real-ip"}, "header"),
    ],
)
def test_client_ip_options_are_validated(kwargs: dict[str, Any], field: str) -> None:
    """Bad client_ip options fail at construction naming the field."""
    with pytest.raises(ConfigError, match=rf"^{field}: expected"):
        keys.client_ip(**kwargs)
