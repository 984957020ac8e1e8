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
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.runs_created = Counter("opbox_runs_created", "Runs made", ["workspace", "job", "trigger"], registry=r)
        self.runs_finished = Counter("opbox_runs_finished", "Runs ended, by outcome (succeeded, failed, "
                                     "cancelled, timed_out)", ["workspace", "job", "trigger", "outcome"], registry=r)
        self.queue_wait = Histogram("opbox_run_queue_wait_seconds", "From a run's creation to its start (observed "
                                    "when it ends)", ["workspace", "job"], buckets=RUN_BUCKETS, registry=r)
        self.run_duration = Histogram("opbox_run_duration_seconds", "From a run's start to its end",
                                      ["workspace", "job", "outcome"], buckets=RUN_BUCKETS, registry=r)
        self.service_calls = Counter("opbox_service_calls", "Calls to services, by answer status class (2xx, "
                                     "4xx, 5xx)", ["workspace", "service", "code"], registry=r)
        self.service_rejected = Counter("opbox_service_calls_rejected", "Service calls answered 429 (replicas' "
                                        "concurrency and queues full, or a token's rate limit)",
                                        ["workspace", "service"], registry=r)
        self.service_latency = Histogram("opbox_service_call_seconds", "Service calls, request to answer headers",
                                         ["workspace", "service"], buckets=REQUEST_BUCKETS, registry=r)
        self.builds = Histogram("opbox_build_seconds", "Builds of job versions, by outcome (ready, failed)",
                                ["workspace", "outcome"], buckets=RUN_BUCKETS, registry=r)
        self.build_failures = Counter("opbox_build_failures", "Builds that failed", ["workspace"], registry=r)
        self.storage_errors = Counter("opbox_storage_errors", "Errors of the state file (state) and the object "
                                      "store (store), by kind (error, full)", ["component", "kind"], registry=r)
        self.requests = Histogram("opbox_http_request_seconds", "Gateway requests by route template, to the "
                                  "answer's first byte", ["method", "route"], buckets=REQUEST_BUCKETS, registry=r)

    def gauges(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Families built when scraped (levels kept elsewhere: pools, replicas, open runs)."""
        self.registry.register(_Collector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, collect: Callable[[], Iterable[Metric]]):
        self.collect = collect


def status_class(status: int) -> str:
    return f"{status // 100}xx"
