"""A run's trace context in the runtime: ``TRACEPARENT`` in its environment while it runs (so a job it calls
joins its trace), and, when an OTLP endpoint is configured and ``opbox[otel]`` installed, a span for the
function's execution, a child of the run's span. Without an endpoint nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

from opbox import otel, tracecontext

_tracer = None  # None: not looked for yet; False: no exporting in this process


def _get_tracer():
    global _tracer
    if _tracer is None:
        _tracer = False
        if otel.configured():
            try:
                _tracer = otel.tracer("opbox-runtime", "opbox.runtime")
            except ImportError as exc:
                print(f"opbox: OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed ({exc}): "
                      "no spans; pip install 'opbox[otel]'", file=sys.stderr)
    return _tracer


def _untraced(outcome: str) -> None:
    pass


@contextlib.contextmanager
def run_context(traceparent: str | None, entry: str, run_id: str) -> Iterator[Callable[[str], None]]:
    """Around one run's call of the user's function (a warm worker sets it per run); gives a function to
    call with the run's outcome (succeeded, failed...), which the span records. The run's id is in
    ``OPBOX_RUN_ID`` while it runs: the SDK sends it with the runs its code starts (their parent)."""
    os.environ[tracecontext.RUN_ENV] = run_id
    try:
        with _traced(traceparent, entry, run_id) as ended:
            yield ended
    finally:
        os.environ.pop(tracecontext.RUN_ENV, None)


@contextlib.contextmanager
def _traced(traceparent: str | None, entry: str, run_id: str) -> Iterator[Callable[[str], None]]:
    if traceparent:
        os.environ[tracecontext.ENV] = traceparent
    else:
        os.environ.pop(tracecontext.ENV, None)
    tracer = _get_tracer() if traceparent else False
    if not tracer:
        yield _untraced
        return
    from opentelemetry.trace import Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({tracecontext.HEADER: traceparent})
    with tracer.start_as_current_span(f"execute {entry}", context=parent,
                                      attributes={"opbox.run_id": run_id, "code.function": entry}) as span:
        def ended(outcome: str) -> None:
            span.set_attribute("opbox.outcome", outcome)
            span.set_status(Status(StatusCode.OK if outcome == "succeeded" else StatusCode.ERROR))

        yield ended
