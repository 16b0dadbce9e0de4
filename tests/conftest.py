"""Shared fixtures. Server fixtures (real redis-server, cluster) live in _servers.py."""

from __future__ import annotations

from _servers import *  # noqa: F403 - fixtures are discovered by name
