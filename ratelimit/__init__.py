"""ratelimit: rate limiting and admission control for ASGI applications and plain code.

Per-caller quotas (token buckets, windows), fleet-wide concurrency caps with
leases that cannot leak, honest 429/503 refusals with `Retry-After` and the
`RateLimit` header fields, on an in-process or Redis backend.
"""

from ._errors import BackendError as BackendError
from ._errors import BackendUnavailable as BackendUnavailable
from ._errors import CallableError as CallableError
from ._errors import ConfigError as ConfigError
from ._errors import LeaseError as LeaseError
from ._errors import RateLimitError as RateLimitError
from .asgi.exposition import metrics_app as metrics_app
from .asgi.middleware import RateLimitMiddleware as RateLimitMiddleware
from .asgi.top import top_app as top_app
from .backends.base import Backend as Backend
from .backends.memory import MemoryBackend as MemoryBackend
from .backends.redis import RedisBackend as RedisBackend
from .core.decision import Decision as Decision
from .core.decision import RateLimited as RateLimited
from .core.limiter import Limiter as Limiter
from .core.metrics import Metrics as Metrics
from .core.observer import Observer as Observer
from .core.plan import LimitState as LimitState
from .core.statistics import LimitStatistics as LimitStatistics
from .policy import keys as keys
from .policy.limits import Concurrency as Concurrency
from .policy.limits import TokenBucket as TokenBucket
from .policy.limits import Window as Window
from .policy.overrides import Override as Override
from .policy.quotas import Quota as Quota
from .policy.rules import Rule as Rule
from .policy.top import TopCallers as TopCallers

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "CallableError",
    "Concurrency",
    "ConfigError",
    "Decision",
    "LeaseError",
    "LimitState",
    "LimitStatistics",
    "Limiter",
    "MemoryBackend",
    "Metrics",
    "Observer",
    "Override",
    "Quota",
    "RateLimitError",
    "RateLimitMiddleware",
    "RateLimited",
    "RedisBackend",
    "Rule",
    "TokenBucket",
    "TopCallers",
    "Window",
    "keys",
    "metrics_app",
    "top_app",
]
