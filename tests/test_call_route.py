"""The call route's two ways in answer alike: ``POST /{ws}/job/{job}/runs`` is taken before the middleware
(``GatewayApp``, the hot path) and, behind a root path (a gateway mounted under a prefix), routed by
starlette to ``routes_jobs.call``; both end in ``call_asgi``. The same bad requests get the same
answers from both, and both are counted in the request metrics under the route's template."""

from __future__ import annotations

import httpx
import pytest

from opbox import serialization
from opbox.platform.core import Platform
from opbox.platform.gateway.app import CALL_ROUTE, CALLER_ROUTES, NEXT_ROUTE, create_app
from opbox.platform.gateway.routes_internal import next_target
from opbox.platform.gateway.routes_jobs import call, call_target
from opbox.platform.settings import Settings

from servers import serve_app

ENVELOPE = serialization.CONTENT_TYPE


@pytest.fixture
def gateways(tmp_path):
    """Two gateways on platforms of their own: one as `opbox up` serves it, one under the root path /gw (as
    behind a proxy that strips it: requests come without it, uvicorn puts it in the scope)."""
    out = []
    with serve_app(create_app(plain := Platform(Settings(home=tmp_path / "a"))), lifespan="on") as url, \
            serve_app(create_app(mounted := Platform(Settings(home=tmp_path / "b"))), lifespan="on",
                      root_path="/gw") as mounted_url:
        for platform, base in ((plain, url), (mounted, mounted_url)):
            token = platform.bootstrap()["token"]
            out.append((platform, httpx.Client(base_url=base, timeout=30), token))
        yield out
        for _, http, _ in out:
            http.close()


BAD = [  # (what, path in the workspace or another, query, headers beside the envelope type, body)
    ("no token", "/default/job/j/runs", "wait=1", {}, b"x"),
    ("not a bearer token", "/default/job/j/runs", "wait=1", {"Authorization": "Basic abc"}, b"x"),
    ("an unknown token", "/default/job/j/runs", "wait=1", {"Authorization": "Bearer nope"}, b"x"),
    ("another workspace", "/elsewhere/job/j/runs", "wait=1", None, b"x"),
    ("an unknown job", "/default/job/nope/runs", "wait=1", None, b"x"),
    ("a wait that is no number", "/default/job/j/runs", "wait=soon", None, b"x"),
    ("a negative wait", "/default/job/j/runs", "wait=-1", None, b"x"),
    ("a wait past its bound", "/default/job/j/runs", "wait=301", None, b"x"),
    ("a wait that is not a number at all", "/default/job/j/runs", "wait=nan", None, b"x"),
    ("an escaped wait", "/default/job/j/runs", "wait=%31%30x", None, b"x"),
    ("a version of 0", "/default/job/j/runs", "version=0", None, b"x"),
    ("a version that is no integer", "/default/job/j/runs", "version=1.5", None, b"x"),
]


@pytest.mark.parametrize("what,path,query,headers,body", BAD, ids=[b[0] for b in BAD])
def test_the_hot_path_and_the_router_answer_bad_calls_alike(gateways, what, path, query, headers, body):
    answers = []
    for _, http, token in gateways:
        sent = {"Content-Type": ENVELOPE, **({"Authorization": f"Bearer {token}"} if headers is None else headers)}
        resp = http.post(f"{path}?{query}", headers=sent, content=body)
        answers.append((resp.status_code, resp.headers["content-type"], resp.json()))
    assert answers[0] == answers[1]
    status, ctype, error = answers[0]
    assert 400 <= status < 500 and ctype == "application/json" and error["error"] and error["message"]


def test_a_bad_wait_is_refused_before_any_run_is_made(gateways):
    platform, http, token = gateways[0]
    resp = http.post("/default/job/j/runs?wait=abc", headers={"Authorization": f"Bearer {token}"}, content=b"x")
    assert resp.status_code == 422 and resp.json()["message"] == "query parameter 'wait' must be a float, got 'abc'"
    assert platform.runs.open_runs.get("default", 0) == 0


def test_both_ways_in_are_counted_under_the_route_template(gateways):
    """The hot path counts as RequestMetrics does for routed requests; behind the root path the router took
    the request (its template carries the root path, as RequestMetrics names a mounted route)."""
    for (platform, http, token), template in zip(gateways, (CALL_ROUTE.path, "/gw" + CALL_ROUTE.path)):
        for _ in range(3):
            http.post("/default/job/nope/runs", headers={"Authorization": f"Bearer {token}"}, content=b"x")
        counted = {s.labels["route"]: s.value for m in platform.metrics.requests.metric.collect() for s in m.samples
                   if s.name.endswith("_count") and s.labels["method"] == "POST" and s.value}
        assert counted == {template: 3}


def test_the_route_stays_for_the_schema_and_callers_may_use_it():
    assert CALL_ROUTE.endpoint is call and "POST" in CALL_ROUTE.methods
    assert call in CALLER_ROUTES  # a run's own token may call: the hot path checks the token only
    assert call_target("/ws/job/j/runs") == ("ws", "j")
    for path in ("/_ui/job/j/runs", "/ws/job//runs", "/ws/job/j/runs/x", "/ws/jobs/j/runs", "//job/j/runs"):
        assert call_target(path) is None, path


def test_a_workers_next_is_taken_first_and_counted_under_its_template(gateways):
    """A worker's next skips the middleware and router too (GatewayApp): same answers (an unknown worker is
    told to exit, a missing token 401), counted under the route's template; behind the root path the router
    takes it."""
    for (platform, http, token), template in zip(gateways, (NEXT_ROUTE.path, "/gw" + NEXT_ROUTE.path)):
        unknown = http.post("/_internal/pools/nope/next?wait=0", headers={"Authorization": "Bearer x"})
        assert unknown.status_code == 204 and unknown.headers["x-opbox-action"] == "exit"
        missing = http.post("/_internal/pools/nope/next?wait=0")
        assert missing.status_code == 401 and missing.json()["error"]
        assert http.get("/_internal/pools/nope/next").status_code == 405
        counted = {s.labels["route"]: s.value for m in platform.metrics.requests.metric.collect() for s in m.samples
                   if s.name.endswith("_count") and s.labels["method"] == "POST" and s.value}
        assert counted == {template: 2}
    assert next_target("/_internal/pools/p1/next") == "p1"
    for path in ("/_internal/pools//next", "/_internal/pools/p/next/x", "/x/pools/p/next", "/_internal/pool/p/next"):
        assert next_target(path) is None, path
