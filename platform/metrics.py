"""The platform's Prometheus metrics, in one registry per platform (``GET /metrics``, or their own port).

Counters and histograms are updated where the events already happen (a run made or ended, a service
call answered, a build done, a gateway request served), with bounded labels only: workspace, job or
service name, trigger, outcome, route template; never a run id or a raw path. What is a level rather
than an event (pool sizes, worker starts, service replicas, open runs) is read when scraped, from the
parts that keep it (``gauges``), so the hot path pays nothing for it.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: sub-millisecond calls to hour-long runs
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, float("inf"))


class Metrics:
    """Each metric is called with its label values: ``metrics.runs_created(ws, job, trigger).inc()``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        counter, histogram = self._family(Counter), self._family(Histogram)
        self.runs_created = counter("opbox_runs_created", "Runs made", "workspace job trigger")
        self.runs_finished = counter("opbox_runs_finished", "Runs ended, by outcome (succeeded, failed, cancelled, "
                                     "timed_out)", "workspace job trigger outcome")
        self.queue_wait = histogram("opbox_run_queue_wait_seconds", "From a run's creation to its start (observed "
                                    "when it ends)", "workspace job", RUN_BUCKETS)
        self.run_duration = histogram("opbox_run_duration_seconds", "From a run's start to its end",
                                      "workspace job outcome", RUN_BUCKETS)
        self.service_calls = counter("opbox_service_calls", "Calls to services, by the answer's status class (2xx, "
                                     "4xx, 5xx)", "workspace service code")
        self.service_rejected = counter("opbox_service_calls_rejected", "Service calls answered 429 (replicas' "
                                        "concurrency and queues full, or a token's rate limit)", "workspace service")
        self.service_latency = histogram("opbox_service_call_seconds", "Service calls, from the request to the "
                                         "answer's headers", "workspace service", REQUEST_BUCKETS)
        self.builds = histogram("opbox_build_seconds", "Builds of job versions, by outcome (ready, failed)",
                                "workspace outcome", RUN_BUCKETS)
        self.build_failures = counter("opbox_build_failures", "Builds that failed", "workspace")
        self.storage_errors = counter("opbox_storage_errors", "Errors of the state file (state) and the object "
                                      "store (store), by kind (error, full)", "component kind")
        self.large_payloads = counter("opbox_large_payload_bytes", "Bytes of payloads kept in the object store, by "
                                      "how they got there: url (the SDK or runtime uploaded them with a signed "
                                      "URL; they never passed through the gateway) or gateway (streamed through "
                                      "it and spooled)", "via")
        self.requests = histogram("opbox_http_request_seconds", "Gateway requests by route template, until the "
                                  "answer is sent", "method route", REQUEST_BUCKETS)

    def _family(self, kind):
        def make(name: str, doc: str, labels: str, buckets: tuple | None = None) -> Labelled:
            extra = {"buckets": buckets} if buckets else {}
            return Labelled(kind(name, doc, labels.split(), registry=self.registry, **extra))
        return make

    def gauges(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Families built when scraped (levels kept elsewhere: pools, replicas, open runs)."""
        self.registry.register(_Collector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Labelled:
    """A metric's children by label values, kept: prometheus-client's ``labels()`` checks its arguments and
    takes a lock on every call; a dict lookup is all the hot path pays here."""

    __slots__ = ("metric", "children")

    def __init__(self, metric):
        self.metric = metric
        self.children: dict[tuple, object] = {}

    def __call__(self, *values: str):
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class _Collector:
    def __init__(self, collect: Callable[[], Iterable[Metric]]):
        self.collect = collect


def status_class(status: int) -> str:
    return f"{status // 100}xx"
