"""gunicorn settings for an ASGI app that serves ratelimit's metrics from several workers.

Run (PROMETHEUS_MULTIPROC_DIR set by the shell, before Python starts, so the
master and every worker see it; needs `pip install gunicorn uvicorn-worker`):

    PROMETHEUS_MULTIPROC_DIR=/run/myapp/metrics \\
        gunicorn -c examples/gunicorn.conf.py 'myapp:create_app()'

The app mounts `metrics_app()` at /metrics (its middleware counts by default);
whichever worker answers a scrape serves the sum over all of them.
Command-line options override what is set here.
"""

# gunicorn reads these two names as its server hooks: `on_starting` empties the
# metrics directory before the first worker forks; `child_exit` calls
# prometheus_client's mark_process_dead for every worker that ends (crash,
# kill -9, max_requests), so its in-flight slots stop being counted.
from ratelimit.gunicorn import child_exit, on_starting  # noqa: F401 - read by name

# uvicorn's own `uvicorn.workers` module is deprecated in favour of this package.
worker_class = "uvicorn_worker.UvicornWorker"
workers = 2
bind = "127.0.0.1:8000"
# Recycling workers is safe for the metrics: child_exit keeps the gauges right.
max_requests = 10_000
max_requests_jitter = 1_000
