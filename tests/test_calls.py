"""Remote calls: values, exceptions with remote tracebacks, serialization checks, logs."""

from __future__ import annotations

import threading
import time

import pytest

from opbox import RemoteError, SerializationError, serialization
from opbox.outcome import RemoteTraceback
from conftest import user_module
from platform_fixture import running_platform

CODE = """
import time
from dataclasses import dataclass

from opbox import operator


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.lock = __import__("threading").Lock()

    def __reduce__(self):
        raise TypeError("no pickling")


class QuotaError(Exception):
    pass


@dataclass
class Point:
    x: int
    y: int


@operator()
def add(a, b=10):
    return a + b


@operator()
def make_point(x):
    return Point(x, x * 2)


@operator()
def fail(kind):
    if kind == "quota":
        raise QuotaError("out of quota for model-x")
    if kind == "value":
        raise ValueError("bad value 42")
    if kind == "nul":
        raise ValueError("a NUL \\x00 inside")
    raise Unpicklable("cannot travel", 2)


@operator()
def chatty(n, pause=0.0):
    import os, sys
    for i in range(n):
        print(f"line {i}", flush=True)
        time.sleep(pause)
    os.write(2, b"raw stderr from the fd\\n")
    return n


@operator()
def numpy_like(data):
    return {"n": len(data), "sum": sum(data), "blob": bytes(d % 256 for d in data)}
"""


@pytest.fixture(scope="module")
def plat(tmp_path_factory, state_env):
    """This module runs on SQLite and on PostgreSQL (conftest.state_env)."""
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=state_env) as running:
        yield running


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("calls_proj"), "callsmod", CODE) as mod:
        yield mod, {name: getattr(mod, name).deploy(client=client, quiet=True)
                    for name in ("add", "make_point", "fail", "chatty", "numpy_like")}


def test_args_kwargs_defaults_and_values(fns):
    _, f = fns
    assert f["add"](1) == 11
    assert f["add"](1, b=2) == 3
    assert f["add"](a="x", b="y") == "xy"
    big = list(range(100_000))
    assert f["numpy_like"](big) == {"n": 100_000, "sum": sum(big), "blob": bytes(i % 256 for i in big)}


def test_user_classes_come_back(fns):
    mod, f = fns
    point = f["make_point"](3)
    assert (point.x, point.y) == (3, 6)
    assert type(point).__name__ == "Point"


def test_remote_exception_is_reraised_as_its_type_with_remote_traceback(fns):
    mod, f = fns
    with pytest.raises(ValueError, match="bad value 42") as info:
        f["fail"]("value")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert 'raise ValueError("bad value 42")' in cause.text and "callsmod.py" in cause.text
    assert "opbox/runtime" not in cause.text, "the runtime's own frames are cut from the user's traceback"
    with pytest.raises(Exception) as custom:
        f["fail"]("quota")
    assert type(custom.value).__name__ == "QuotaError" and "model-x" in str(custom.value)
    assert info.value.run_id.startswith("r-")


def test_an_error_message_with_a_nul_character_ends_its_run_and_queries_with_one_are_answered(fns, plat):
    """PostgreSQL's text cannot hold NUL: the run still ends failed, its reason with U+FFFD there."""
    _, f = fns
    with pytest.raises(ValueError, match="a NUL \x00 inside"):  # the envelope keeps the message as it was
        f["fail"]("nul")
    with plat.http() as http:
        (run,) = http.get(f"/{plat.workspace}/job/fail/runs", params={"limit": 1}).json()["runs"]
        assert run["status"] == "failed" and run["exit_reason"] in ("builtins.ValueError: a NUL \x00 inside",
                                                                     "builtins.ValueError: a NUL \ufffd inside"), run
        answer = http.get(f"/{plat.workspace}/job/fail/runs", params={"status": "fail\x00ed"})
        assert answer.status_code == 200 and answer.json()["runs"] == [], answer.text
        answer = http.get(f"/{plat.workspace}/job/fail/runs", params={"before": "r-\x00"})  # a page, whichever
        assert answer.status_code == 200, answer.text
        assert http.get(f"/{plat.workspace}/runs/r-%00").status_code == 404


def test_unpicklable_exception_becomes_remote_error(fns):
    _, f = fns
    with pytest.raises(RemoteError) as info:
        f["fail"]("other")
    assert info.value.type_name.endswith("Unpicklable")
    assert "cannot travel" in str(info.value) and "Remote traceback" in str(info.value)


def test_python_version_mismatch_is_a_clear_error(fns, client):
    _, f = fns
    payload = serialization.dump_args((1,), {})
    header, body = serialization.unpack(payload)
    forged = serialization.pack({**header, "python": "3.99"}, bytes(body))
    resp = client.post(f"/job/{f['add'].job_id}/runs", content=forged, params={"wait": 30},
                       headers={"Content-Type": serialization.CONTENT_TYPE})
    from opbox.outcome import decode

    with pytest.raises(SerializationError, match=r"Python version mismatch.*3\.99"):
        decode(resp.headers["x-opbox-status"], resp.content, resp.headers["x-opbox-run-id"])


def test_gateway_refuses_non_envelopes(fns, client):
    _, f = fns
    with pytest.raises(SerializationError, match="not an opbox envelope"):
        client.post(f"/job/{f['add'].job_id}/runs", content=b"garbage bytes here",
                    headers={"Content-Type": serialization.CONTENT_TYPE})


def test_output_is_the_runs_log(fns, client):
    _, f = fns
    handle = f["chatty"].submit(3)
    assert handle.result(timeout=30) == 3
    text = "".join(handle.logs())
    assert "line 0\nline 1\nline 2\n" in text and "raw stderr from the fd" in text
    # the next run's log is its own
    other = f["chatty"].submit(1)
    other.result(timeout=30)
    assert "".join(other.logs()).count("line") == 1


def test_logs_stream_while_the_run_goes_on(fns, client):
    _, f = fns
    handle = f["chatty"].submit(4, pause=0.6)
    seen = []
    first_at = None
    for chunk in handle.logs(follow=True):
        if first_at is None and "line 0" in chunk:
            first_at = time.monotonic()
            assert handle.status()["status"] == "running", "the first line arrived before the run ended"
        seen.append(chunk)
    assert "line 3" in "".join(seen)
    assert handle.status()["status"] == "succeeded"


def test_json_result_and_error_for_http_clients(fns, plat):
    _, f = fns
    with plat.http() as http:
        run = http.post(f"/{plat.workspace}/job/add/trigger", json={"args": [2], "kwargs": {"b": 5}}).json()
        result = http.get(run["links"]["result"], params={"wait": 30}).json()
        assert result == {"run_id": run["run_id"], "status": "succeeded", "exit_reason": None, "result": 7,
                          "result_is_json": True}
        run = http.post(f"/{plat.workspace}/job/fail/trigger", json={"args": ["value"]}).json()
        result = http.get(run["links"]["result"], params={"wait": 30}).json()
        assert result["status"] == "failed"
        assert result["error"]["type"] == "builtins.ValueError" and result["error"]["message"] == "bad value 42"
        assert "Traceback" in result["error"]["traceback"]
        run = http.post(f"/{plat.workspace}/job/make_point/trigger", json={"args": [1]}).json()
        result = http.get(run["links"]["result"], params={"wait": 30}).json()
        assert result["status"] == "succeeded" and result["result_is_json"] is False and result["result"] is None


def test_concurrent_callers(fns):
    _, f = fns
    results, errors = {}, []

    def call(i):
        try:
            results[i] = f["add"](i, b=i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {i: 2 * i for i in range(40)}


def test_the_hot_routes_answer_as_the_router_would(fns, plat, client):
    """A call and a worker's next are routed by splitting the path (gateway/app.py GatewayApp): the same
    answers as the routes' patterns give, and nothing else taken for them."""
    import httpx

    _, f = fns
    base = plat.url
    token = {"Authorization": client.http.headers["authorization"]}
    envelope = {"Content-Type": serialization.CONTENT_TYPE, **token}
    ok = httpx.post(f"{base}/{client.workspace}/job/{f['add'].job_id}/runs", params={"wait": 30}, headers=envelope,
                    content=serialization.dump_args((2, 3), {}))
    assert ok.status_code == 200 and ok.headers["x-opbox-status"] == "succeeded"
    other = httpx.post(f"{base}/not-mine/job/{f['add'].job_id}/runs", headers=envelope, content=b"x")
    assert other.status_code == 404 and "error" in other.json()  # another workspace is not seen
    # the dashboard's and internal paths are not calls
    assert httpx.post(f"{base}/_ui/job/x/runs", headers=token).status_code in (404, 405)
    lease = httpx.post(f"{base}/_internal/pools/nope/next", headers=token)
    assert lease.status_code == 204  # worker_next's answer for a pool that does not exist: stop
    assert httpx.get(f"{base}/_internal/pools/nope/next", headers=token).status_code == 405
    assert httpx.get(f"{base}/{client.workspace}/job/{f['add'].job_id}/runs", headers=token).status_code == 200
