"""``GET /metrics``: the endpoint's queue in Prometheus's text format, made by the ``prometheus-client`` library.

Each :class:`~.app.ServeApp` has its own registry (never the library's global one, which ComfyUI or another pack in
the same process may fill): what is scraped is this endpoint's alone.

- ``sdxlcn_serve_queue_depth`` requests waiting; ``sdxlcn_serve_running`` requests running (both read from the store
  at each scrape, so they are right after a restart);
- ``sdxlcn_serve_requests_queued_total``, ``sdxlcn_serve_requests_completed_total`` (with a result) and
  ``sdxlcn_serve_requests_failed_total{error_type}`` (fal's error types: ``validation_error``, ``runner_error``,
  ``request_cancelled``, ``request_timeout``, ...), counted since the process started;
- ``sdxlcn_serve_queue_wait_seconds`` (submit to start) and ``sdxlcn_serve_generation_seconds`` (start to result)
  histograms.
"""

from __future__ import annotations

PREFIX = "sdxlcn_serve"
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
GENERATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    """The endpoint's metrics; :meth:`observe` takes a request's state change (``event``, the :class:`~.store.Job`
    after it)."""

    def __init__(self, store):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting in the queue", registry=r)
        depth.set_function(lambda: store.waiting())
        running = Gauge(f"{PREFIX}_running", "Requests running now", registry=r)
        running.set_function(lambda: len(store.jobs("IN_PROGRESS")))
        self.queued = Counter(f"{PREFIX}_requests_queued", "Requests accepted into the queue", registry=r)
        self.completed = Counter(f"{PREFIX}_requests_completed", "Requests that ended with a result", registry=r)
        self.failed = Counter(f"{PREFIX}_requests_failed", "Requests that ended with an error, by fal's error type",
                              ["error_type"], registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time from submit to start",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.generation = Histogram(f"{PREFIX}_generation_seconds", "Time from start to result",
                                    buckets=GENERATION_BUCKETS, registry=r)

    def observe(self, event: str, job) -> None:
        if event == "queued":
            self.queued.inc()
        elif event == "started" and job.started is not None:
            self.queue_wait.observe(max(0.0, job.started - job.created))
        elif event == "completed":
            self.completed.inc()
            if job.started is not None and job.finished is not None:
                self.generation.observe(max(0.0, job.finished - job.started))
        elif event == "failed":
            self.failed.labels(error_type=job.error_type or "error").inc()

    def render(self) -> tuple[bytes, str]:
        """(the text exposition, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
