"""OpenTelemetry for the gateway and the runtime, with the ``otel`` extra (opentelemetry-sdk and its
OTLP/HTTP exporter): spans batched (``BatchSpanProcessor``) to ``OTEL_EXPORTER_OTLP_ENDPOINT``.

Imported only when that variable (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, so a process
without it, or without the extra, imports nothing of OpenTelemetry. The exporter reads the standard
``OTEL_EXPORTER_OTLP_*`` variables itself (headers, timeout...); ``OTEL_SERVICE_NAME`` names the service.
"""

from __future__ import annotations

import os

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def configured() -> bool:
    """Whether an OTLP endpoint is set (then spans are exported, if the extra is installed)."""
    return any(os.environ.get(name) for name in ENDPOINT_VARS)


def processor(service: str):
    """``(BatchSpanProcessor, Resource)`` exporting to the configured endpoint; ImportError without the extra."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service})
    return BatchSpanProcessor(OTLPSpanExporter()), resource


def tracer(service: str, name: str):
    """A tracer whose spans are batched to the configured endpoint (flushed at the process's exit)."""
    from opentelemetry.sdk.trace import TracerProvider

    batch, resource = processor(service)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(batch)
    return provider.get_tracer(name)
