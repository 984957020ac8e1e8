"""GET /metrics: Prometheus text, read with prometheus_client's own parser; the token, the own port."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import user_module
from platform_fixture import running_platform

METRICS_TOKEN = "metrics-secret-for-tests"
CODE = """
from opbox import operator

@operator()
def inc(x):
    return x + 1

@operator()
def fail(x):
    raise RuntimeError("no")

@operator()
class Echo:
    def twice(self, x: int) -> int:
        return 2 * x
"""


@pytest.fixture(scope="module")
def mplat(tmp_path_factory):
    env = {"OPBOX_METRICS_TOKEN": METRICS_TOKEN, "OPBOX_METRICS_PORT": "0"}
    with running_platform(tmp_path_factory.mktemp("mhome"), extra_env=env) as running:
        yield running


@pytest.fixture(scope="module")
def activity(mplat, tmp_path_factory):
    client = mplat.client()
    with user_module(tmp_path_factory.mktemp("mproj"), "metricsmod", CODE) as mod:
        inc, fail = mod.inc.deploy(client=client, quiet=True), mod.fail.deploy(client=client, quiet=True)
        assert [inc(i) for i in range(3)] == [1, 2, 3]
        with pytest.raises(Exception):
            fail(1)
        assert inc.map([1, 2], progress=False) == [2, 3]
        mod.Echo.deploy(client=client, quiet=True)
        with httpx.Client(base_url=mplat.url, headers={"Authorization": f"Bearer {mplat.token}"}, timeout=60) as http:
            assert http.post("/default/serve/Echo/twice", json={"x": 2}).json() == 4
            assert http.post("/default/serve/Echo/twice", json={"y": 2}).status_code == 422
            assert http.post("/default/serve/Echo/nope", json={}).status_code == 404
        run = inc.submit(5)
        assert run.result(timeout=30) == 6
        with mplat.http() as http:
            assert http.get(f"/default/runs/{run.id}").status_code == 200
    client.close()


def scrape(url: str, token: str | None = METRICS_TOKEN) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = httpx.get(url, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return sum(v for l, v in samples.get(name, []) if all(l.get(k) == want for k, want in labels.items()))


def test_the_token_guards_metrics(mplat):
    assert httpx.get(mplat.url + "/metrics").status_code == 401
    assert httpx.get(mplat.url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    workspace_token = httpx.get(mplat.url + "/metrics", headers={"Authorization": f"Bearer {mplat.token}"})
    assert workspace_token.status_code == 403 and "metrics token" in workspace_token.json()["message"]


def test_runs_pools_builds_and_routes(mplat, activity):
    s = scrape(mplat.url + "/metrics")
    assert value(s, "opbox_runs_created_total", workspace="default", job="inc", trigger="call") == 4
    assert value(s, "opbox_runs_created_total", job="inc", trigger="map") == 2
    assert value(s, "opbox_runs_finished_total", job="inc", outcome="succeeded") == 6
    assert value(s, "opbox_runs_finished_total", job="fail", trigger="call", outcome="failed") == 1
    assert value(s, "opbox_run_duration_seconds_count", job="inc", outcome="succeeded") == 6
    assert value(s, "opbox_run_queue_wait_seconds_count", job="fail") == 1
    assert value(s, "opbox_run_queue_wait_seconds_bucket", job="inc", le="+Inf") == 6
    assert value(s, "opbox_worker_starts_total", job="inc") >= 1
    assert value(s, "opbox_pool_workers", job="inc") >= 1
    assert value(s, "opbox_build_seconds_count", workspace="default", outcome="ready") == 3
    assert value(s, "opbox_http_request_seconds_count", method="POST", route="/{workspace}/job/{job}/runs") >= 5
    assert value(s, "opbox_http_request_seconds_count", method="GET", route="/{workspace}/runs/{run}") >= 1
    assert value(s, "opbox_service_calls_total", workspace="default", service="Echo", code="2xx") == 1
    assert value(s, "opbox_service_calls_total", service="Echo", code="4xx") == 2
    assert value(s, "opbox_service_call_seconds_count", service="Echo") == 3
    assert value(s, "opbox_service_replicas", service="Echo") == 1
    labels = {v for rows in s.values() for l, _ in rows for v in l.values()}
    assert not [v for v in labels if re.match(r"r-[0-9a-f]{11}", v) or v.startswith("/default/")]  # bounded labels


def test_own_port_needs_no_token(mplat, activity):
    url = re.search(r"opbox metrics on (http://\S+)", mplat.log()).group(1)
    s = scrape(url, token=None)
    assert value(s, "opbox_runs_created_total", job="inc") == 6


def test_off_unless_configured(plat):
    resp = httpx.get(plat.url + "/metrics", headers={"Authorization": f"Bearer {plat.token}"})
    assert resp.status_code == 403 and "none is set: set OPBOX_METRICS_TOKEN" in resp.json()["message"]
    assert httpx.get(plat.url + "/metrics", headers={"Authorization": "Bearer guess"}).status_code == 401


def test_the_grafana_dashboard_charts_metrics_the_gateway_exports(mplat, activity):
    """Every metric the shipped dashboard queries is one a real gateway exports (by its exposed name)."""
    import json
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "manifests" / "monitoring" / "grafana-dashboard.json")
                           .read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(opbox_[a-z_]+)", e)}
    text = httpx.get(mplat.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30).text
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {family.name + suffix for family in text_string_to_metric_families(text)  # declared, samples or not
                for suffix in suffixes.get(family.type, ("",))}
    assert len(used) >= 12 and used <= exported, used - exported
