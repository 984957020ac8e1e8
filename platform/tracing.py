"""A span per run, exported when a run ends (``OTEL_EXPORTER_OTLP_ENDPOINT`` set, ``opbox[otel]`` installed).

The span is the run itself: its trace id and span id are the run's ``traceparent``'s, its parent the
caller's span, from its creation to its end, with its workspace, job, trigger and status. It is made
from the ended record and handed to OpenTelemetry's ``BatchSpanProcessor``, which exports spans in
batches from its own thread: nothing is added to a run's requests or to the records.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from opbox import otel, tracecontext

if TYPE_CHECKING:
    from .records.base import RunRecord

log = logging.getLogger("opbox.tracing")

RunSpans = Callable[["RunRecord", str], None]  # (the ended run, its job's name)


def run_spans() -> RunSpans | None:
    """The exporter of runs' spans, or None when no OTLP endpoint is configured (or the extra is missing)."""
    if not otel.configured():
        return None
    try:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        batch, resource = otel.processor("opbox-gateway")
    except ImportError as exc:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s): no spans are "
                    "exported; pip install 'opbox[otel]'", exc)
        return None
    scope = InstrumentationScope("opbox.platform")

    def export(run: RunRecord, job: str) -> None:
        try:
            _export(run, job)
        except Exception:  # a span is never worth a run's end
            log.exception("could not export the span of run %s", run.id)

    def _export(run: RunRecord, job: str) -> None:
        trace = tracecontext.parse(run.traceparent)
        if trace is None or run.finished_at is None:
            return
        flags = TraceFlags(int(trace.flags, 16) & 1)
        context = SpanContext(int(trace.trace_id, 16), int(trace.span_id, 16), is_remote=False, trace_flags=flags)
        parent = (SpanContext(int(trace.trace_id, 16), int(run.parent_span_id, 16), is_remote=True, trace_flags=flags)
                  if run.parent_span_id else None)
        failed = run.status != "succeeded"
        batch.on_end(ReadableSpan(
            f"run {job}", context=context, parent=parent, resource=resource, kind=SpanKind.SERVER,
            attributes={"opbox.workspace": run.workspace, "opbox.job": job, "opbox.job_id": run.job_id,
                        "opbox.version": run.version, "opbox.run_id": run.id, "opbox.trigger": run.trigger,
                        "opbox.status": run.status, "opbox.attempt": run.attempt,
                        **({"opbox.batch_id": run.batch_id} if run.batch_id else {})},
            status=Status(StatusCode.ERROR, run.exit_reason or run.status) if failed else Status(StatusCode.OK),
            start_time=int(run.created_at * 1e9), end_time=int(run.finished_at * 1e9), instrumentation_scope=scope))

    export.shutdown = batch.shutdown  # flush what is batched (the platform's close)
    return export
