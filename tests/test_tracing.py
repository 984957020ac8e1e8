"""W3C trace context: a run carries the caller's traceparent (or a new one), in its record, its API JSON,
its dashboard page and its environment; spans go to a real OTLP/HTTP receiver when an endpoint is set."""

from __future__ import annotations

import gzip
import http.server
import os
import re
import threading
import time

import httpx
import pytest

from conftest import user_module, wait_for
from opbox import tracecontext
from platform_fixture import running_platform
from test_dashboard import login

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CALLER_TRACE, CALLER_SPAN = CALLER.split("-")[1:3]

CODE = """
import os
from opbox import operator

@operator()
def where(x):
    return {"traceparent": os.environ.get("TRACEPARENT"), "x": x}

@operator()
def boom():
    raise ValueError("no")
"""


# -- the header's rules (W3C Trace Context, level 1) -------------------------------------


@pytest.mark.parametrize("value", [
    CALLER,
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-brings",  # a later version
    " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 ",
])
def test_valid_traceparents_are_taken(value):
    parsed = tracecontext.parse(value)
    assert parsed is not None and (parsed.trace_id, parsed.span_id) == (CALLER_TRACE, CALLER_SPAN)


@pytest.mark.parametrize("value", [
    None, "", "garbage",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff is invalid
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero parent id
    "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # version 00 has no more fields
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",  # short parent id
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",  # a later version: more only after a dash
])
def test_invalid_traceparents_are_ignored(value):
    assert tracecontext.parse(value) is None
    trace, parent = tracecontext.start(value)
    assert parent is None and tracecontext.parse(str(trace)) == trace and trace.flags == "01"


def test_the_caller_is_the_environment_without_opentelemetry(monkeypatch):
    monkeypatch.setenv("TRACEPARENT", CALLER)
    monkeypatch.delitem(__import__("sys").modules, "opentelemetry.trace", raising=False)
    assert tracecontext.from_caller() == CALLER
    monkeypatch.delenv("TRACEPARENT")
    assert tracecontext.from_caller() is None


# -- end to end, with a real OTLP/HTTP receiver --------------------------------------------


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: every span it is sent, decoded from protobuf."""

    def __init__(self):
        self.spans: list = []
        received = self.spans

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    service = next((a.value.string_value for a in resource_spans.resource.attributes
                                    if a.key == "service.name"), None)
                    for scope_spans in resource_spans.scope_spans:
                        received.extend((service, span) for span in scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def find(self, **want):
        def attrs(span):
            return {a.key: (a.value.string_value or a.value.int_value) for a in span.attributes}
        return [(service, span, attrs(span)) for service, span in list(self.spans)
                if all(attrs(span).get(k) == v for k, v in want.items())]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def plat(tmp_path_factory, receiver, state_env):
    """On SQLite and on PostgreSQL (conftest.state_env): a run's trace context is kept in its record."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100", **state_env}
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=env) as running:
        yield running


@pytest.fixture(scope="module")
def deployed(plat, client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("trace_proj"), "tracemod", CODE) as mod:
        yield {"where": mod.where.deploy(client=client, quiet=True), "boom": mod.boom.deploy(client=client, quiet=True)}


@pytest.fixture(scope="module")
def where(deployed):
    return deployed["where"]


def test_a_call_joins_the_callers_trace_in_record_environment_and_spans(plat, where, receiver, monkeypatch):
    monkeypatch.setenv("TRACEPARENT", CALLER)  # as in a run that calls another job
    monkeypatch.delitem(__import__("sys").modules, "opentelemetry.trace", raising=False)
    run = where.submit(3)
    answer = run.result()
    own = tracecontext.parse(answer["traceparent"])  # the run's environment: the caller's trace, the run's span
    assert own is not None and own.trace_id == CALLER_TRACE and own.span_id != CALLER_SPAN
    record = run.status()
    assert record["traceparent"] == answer["traceparent"] and record["parent_span_id"] == CALLER_SPAN

    def both():  # the runtime's batch goes every 5 s (the exporter's default), the gateway's every 0.1 s here
        found = {service: (span, attrs) for service, span, attrs in receiver.find(**{"opbox.run_id": run.id})}
        return found if {"opbox-gateway", "opbox-runtime"} <= set(found) else None

    by_service = wait_for(both, timeout=30)
    run_span, attrs = by_service["opbox-gateway"]  # the gateway's span of the run: created -> finished
    assert run_span.trace_id.hex() == CALLER_TRACE and run_span.span_id.hex() == own.span_id
    assert run_span.parent_span_id.hex() == CALLER_SPAN
    assert attrs["opbox.workspace"] == plat.workspace and attrs["opbox.job"] == "where"
    assert attrs["opbox.status"] == "succeeded" and attrs["opbox.trigger"] == "call"
    assert run_span.end_time_unix_nano >= run_span.start_time_unix_nano > 0
    executed, _ = by_service["opbox-runtime"]  # the runtime's: the function's execution, a child of the run's
    assert executed.trace_id.hex() == CALLER_TRACE and executed.parent_span_id.hex() == own.span_id
    assert executed.name.startswith("execute ")
    assert {a.key: a.value.string_value for a in executed.attributes}["opbox.outcome"] == "succeeded"

    page = login(plat).get(f"/_ui/runs/{run.id}")
    assert page.status_code == 200
    assert re.search(r'id="traceparent"[^>]*>' + re.escape(answer["traceparent"]) + "<", page.text)


def test_without_a_caller_the_gateway_starts_a_trace_and_a_bad_header_is_ignored(plat, where, monkeypatch):
    monkeypatch.delenv("TRACEPARENT", raising=False)
    monkeypatch.delitem(__import__("sys").modules, "opentelemetry.trace", raising=False)
    first, second = where(1)["traceparent"], where(2)["traceparent"]
    assert tracecontext.parse(first) and tracecontext.parse(second)
    assert first.split("-")[1] != second.split("-")[1]  # two calls, two traces
    with plat.http() as http:
        for bad in ("00-00000000000000000000000000000000-b7ad6b7169203331-01", "nonsense", "ff-" + CALLER[3:]):
            resp = http.post(f"/{plat.workspace}/job/where/trigger", json={"args": [5]}, headers={"traceparent": bad})
            assert resp.status_code == 202, resp.text
            made = tracecontext.parse(resp.json()["traceparent"])
            assert made is not None and made.trace_id not in bad and resp.json()["parent_span_id"] is None


def test_a_maps_items_share_the_callers_trace_each_with_its_own_span(plat, where, monkeypatch):
    monkeypatch.setenv("TRACEPARENT", CALLER)
    monkeypatch.delitem(__import__("sys").modules, "opentelemetry.trace", raising=False)
    results = where.map([1, 2, 3], progress=False)
    spans = [tracecontext.parse(r["traceparent"]) for r in results]
    assert {s.trace_id for s in spans} == {CALLER_TRACE} and len({s.span_id for s in spans}) == 3


def test_a_one_shot_run_gets_its_traceparent_too(tmp_path, monkeypatch, user_code):
    monkeypatch.setenv("TRACEPARENT", CALLER)
    monkeypatch.delitem(__import__("sys").modules, "opentelemetry.trace", raising=False)
    with running_platform(tmp_path / "home", extra_env={"OPBOX_ISOLATION": "run"}) as oneshot:
        client = oneshot.client()
        mod = user_code(CODE)
        remote = mod.where.deploy(client=client, quiet=True)
        answer = remote(4)
        own = tracecontext.parse(answer["traceparent"])
        assert own is not None and own.trace_id == CALLER_TRACE and own.span_id != CALLER_SPAN
        client.close()


def test_without_an_endpoint_nothing_of_opentelemetry_is_imported():
    """The gateway's and the runtime's tracing with no OTLP endpoint: no exporter, and no OTel module loaded."""
    import subprocess
    import sys

    code = ("import sys, opbox.platform.server, opbox.runtime.worker, opbox.remote, opbox.remote_map\n"
            "from opbox.platform.tracing import run_spans\n"
            "from opbox.runtime.tracing import run_context\n"
            "from opbox import tracecontext\n"
            "assert run_spans() is None\n"
            f"with run_context({CALLER!r}, 'm:f', 'r-1'):\n"
            "    import os; assert os.environ['TRACEPARENT'] == " + repr(CALLER) + "\n"
            "assert tracecontext.from_caller() == " + repr(CALLER) + "\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_trigger_from_the_sdk_and_the_cli_carries_the_callers_trace(plat, where, monkeypatch):
    import subprocess
    import sys

    from opbox import Jobs

    monkeypatch.setenv("TRACEPARENT", CALLER)
    monkeypatch.delitem(sys.modules, "opentelemetry.trace", raising=False)
    run = Jobs("where", plat.client()).trigger(6)
    assert run.status()["parent_span_id"] == CALLER_SPAN and run.result()["traceparent"].split("-")[1] == CALLER_TRACE
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "call", "where", "7", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert CALLER_TRACE in out.stdout


def test_the_sdk_sends_the_active_opentelemetry_span_of_the_caller(plat, where, monkeypatch):
    from opentelemetry.sdk.trace import TracerProvider

    monkeypatch.setenv("TRACEPARENT", CALLER)  # the active span wins over the environment
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller") as span:
        context = span.get_span_context()
        answer = where(8)
        mapped = where.map([1, 2], progress=False)
    trace_id, span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
    for value in [answer, *mapped]:
        own = tracecontext.parse(value["traceparent"])
        assert own.trace_id == trace_id and own.span_id != span_id
    assert tracecontext.from_caller() == CALLER  # no span active any more: the environment's again


def test_a_failed_runs_spans_say_so(plat, deployed, receiver, monkeypatch):
    monkeypatch.setenv("TRACEPARENT", CALLER)
    monkeypatch.delitem(__import__("sys").modules, "opentelemetry.trace", raising=False)
    run = deployed["boom"].submit()
    with pytest.raises(ValueError):
        run.result()

    def both():
        found = {service: (span, attrs) for service, span, attrs in receiver.find(**{"opbox.run_id": run.id})}
        return found if {"opbox-gateway", "opbox-runtime"} <= set(found) else None

    spans = wait_for(both, timeout=30)
    gateway, attrs = spans["opbox-gateway"]
    assert attrs["opbox.status"] == "failed" and gateway.status.code == gateway.status.STATUS_CODE_ERROR
    executed, _ = spans["opbox-runtime"]
    assert executed.status.code == executed.status.STATUS_CODE_ERROR
    assert {a.key: a.value.string_value for a in executed.attributes}["opbox.outcome"] == "failed"
