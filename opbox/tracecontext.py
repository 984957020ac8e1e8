"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ``traceparent`` a run carries.

Shared by the SDK (which sends the caller's), the platform (which checks it, or starts a trace, and
gives each run a span of its own) and the runtime (which puts the run's in its environment). Standard
library only: OpenTelemetry is asked for the active span only when the caller's process has imported
it already, so nothing of OTel is imported here.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
from typing import NamedTuple

HEADER = "traceparent"
ENV = "TRACEPARENT"
RUN_HEADER = "X-Opbox-Caller-Run"  # the id of the run whose code sends a request (the runtime puts it in RUN_ENV)
RUN_ENV = "OPBOX_RUN_ID"
_FORMAT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


class TraceParent(NamedTuple):
    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero: the parent's span
    flags: str  # 2 hex digits; 01 = sampled

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self, span_id: str | None = None) -> TraceParent:
        """The same trace, with ``span_id`` (a new one by default) as the parent of what comes next."""
        return TraceParent(self.trace_id, span_id or new_span_id(), self.flags)


def parse(value: str | None) -> TraceParent | None:
    """A valid ``traceparent`` header's parts, or None (absent or invalid: the receiver starts a new trace).

    Per the spec: version ``ff`` is invalid; version 00 is exactly 55 characters; a later version may
    carry more fields after a ``-``, which are ignored; the trace id and the parent id are never all zeros.
    """
    if not value or len(value) > 512:
        return None
    value = value.strip()
    found = _FORMAT.match(value)
    if found is None:
        return None
    version, trace_id, span_id, flags = found.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return TraceParent(trace_id, span_id, flags)


def new_trace_id() -> str:
    return secrets.token_hex(16)


def new_span_id() -> str:
    return secrets.token_hex(8)


def trace_id_of(name: str) -> str:
    """A trace id made from a name (a map's id: its items share a trace when the caller sent none)."""
    return hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


def start(value: str | None) -> tuple[TraceParent, str | None]:
    """A run's own trace parent (the caller's trace, or a new sampled one, with a new span: the run's), and the
    caller's span id (None when the trace starts here)."""
    caller = parse(value) if value else None
    if caller is None:
        ids = os.urandom(24).hex()  # one call for both ids: this runs for every run
        return TraceParent(ids[:32], ids[32:], "01"), None
    return caller.child(), caller.span_id


def from_caller() -> str | None:
    """The ``traceparent`` to send with a new run: the active OpenTelemetry span's, when the process uses
    OpenTelemetry (it has imported it); else ``$TRACEPARENT`` (set in a run: a run that calls another job
    carries its trace on); else None (the gateway starts a trace)."""
    otel = sys.modules.get("opentelemetry.trace")
    if otel is not None:
        context = otel.get_current_span().get_span_context()
        if context.is_valid:
            return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    return os.environ.get(ENV) or None


def caller_headers(headers: dict | None = None) -> dict:
    """``headers`` with the caller's ``traceparent`` added, when it has one, and, from inside a run, that run's
    id: a warm worker running a group of runs names the one in hand, which the gateway may not know yet (its
    result before is still on the way) and which a new run must name as its parent."""
    traceparent, run_id = from_caller(), os.environ.get(RUN_ENV)
    headers = headers or {}
    if traceparent is None and run_id is None:
        return headers
    headers = dict(headers)
    if traceparent is not None:
        headers[HEADER] = traceparent
    if run_id is not None:
        headers[RUN_HEADER] = run_id
    return headers
