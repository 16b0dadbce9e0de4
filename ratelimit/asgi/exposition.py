"""`metrics_app`: the Prometheus exposition of the `Metrics` series, to mount at `/metrics`.

`metrics_app()` serves the global registry, where every `Limiter` counts by
default: mounting it is the only line metrics need.

Multi-process mode (`PROMETHEUS_MULTIPROC_DIR` set before prometheus_client
is imported): counters and histograms are summed over every process that ever
wrote them; `in_flight` sums live processes only (a dead worker's slots come
back when its leases expire, and gunicorn's `child_exit` should call
`prometheus_client.multiprocess.mark_process_dead`); the limit gauges take the
value set most recently by a live process, so a limit changed by one worker
shows at once, where `max` would keep showing the old value after a lowering
and `all` would give one series per pid.

Input prometheus_client's own app would answer with a 500 (a query or header
that is not UTF-8, an `Accept` version it cannot compare) gets a 400 instead.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from prometheus_client.asgi import make_asgi_app
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from .._errors import ConfigError
from .._types import ASGIApp, Receive, Scope, Send
from ..core.metrics import given_registry
from .admin import BadRequest, query_params, send_bad_request

__all__ = ["metrics_app"]


def metrics_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app serving the metrics in Prometheus text format; mount it at `/metrics`.

    With `PROMETHEUS_MULTIPROC_DIR` set it serves the merge of every process's
    files in that directory (whichever worker answers the scrape), and
    `registry` is not read: its metrics live in those files.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        if not os.path.isdir(path):
            raise ConfigError("PROMETHEUS_MULTIPROC_DIR", "an existing directory", path)
        registry = CollectorRegistry()
        # prometheus_client leaves this constructor unannotated.
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    else:
        registry = given_registry(registry)
    exposition: ASGIApp = make_asgi_app(registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # prometheus_client's app asserts on anything else
        try:
            _check_scrape(scope)
        except BadRequest as exc:
            await send_bad_request(send, str(exc))
            return
        await exposition(scope, receive, send)

    return app


#: Nothing to expose: for trying an `Accept` header's format and version on.
_EMPTY = CollectorRegistry()


def _check_scrape(scope: Scope) -> None:
    """Raise `BadRequest` for input prometheus_client's app would answer with a 500.

    It decodes the query and headers as UTF-8 and compares the `version` of
    an `Accept` header as numbers; here they are read the same way first, and
    the chosen format is tried on an empty registry.
    """
    query_params(scope, ())
    accept = []
    for name, value in scope.get("headers", ()):
        lowered = bytes(name).lower()
        if lowered in (b"accept", b"accept-encoding"):
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"{lowered.decode()}: not valid UTF-8") from None
            if lowered == b"accept":
                accept.append(text)
    try:
        encoder, _ = choose_encoder(",".join(accept))
        encoder(_EMPTY)
    except Exception:
        raise BadRequest("accept: a format or version the exposition cannot write") from None
