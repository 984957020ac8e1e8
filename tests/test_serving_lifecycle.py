"""Service lifecycle on real processes: readiness, scale to zero and back, a killed replica, rolling
redeploys under load, replicas, a platform restart, and an existing ASGI app served."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time

import httpx
import pytest

from opbox import ServiceFailed, serve_asgi

CODE = '''
import os
import time

from opbox import operator


@operator()
class Slowstart:
    def __init__(self, delay: float):
        self.delay = delay

    def __remote_init__(self):
        time.sleep(self.delay)  # e.g. loading a model
        self.started = time.time()

    def started_at(self) -> float:
        return self.started


@operator()
class Flaky:
    def __init__(self, fail: bool):
        self.fail = fail

    def __remote_init__(self):
        if self.fail:
            raise RuntimeError("cannot load the weights")

    def whoami(self) -> str:
        return "flaky-ok"


@operator()
class Tagged:
    def __init__(self, tag: str, pause: float = 0.0):
        self.tag, self.pause = tag, pause

    def whoami(self, i: int = 0) -> dict:
        time.sleep(self.pause)
        return {"tag": self.tag, "i": i, "pid": os.getpid()}
'''

ASGI_APP = '''
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from contextlib import asynccontextmanager


@asynccontextmanager
async def lifespan(app):
    yield {"greeting": "hello"}


async def hello(request):
    return JSONResponse({"msg": request.state.greeting, "prefix": request.headers.get("x-forwarded-prefix"),
                         "q": request.query_params.get("q")})


async def echo(request):
    return PlainTextResponse((await request.body()).decode()[::-1])


async def item(request):
    return JSONResponse({"id": int(request.path_params["id"])})


async def count(request):
    async def lines():
        for i in range(int(request.query_params["n"])):
            yield f"{i}\\n"
    return StreamingResponse(lines(), media_type="text/plain")


app = Starlette(routes=[Route("/hello", hello), Route("/echo", echo, methods=["POST"]),
                        Route("/items/{id}", item), Route("/count", count)], lifespan=lifespan)
'''


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lifecycle_proj")
    (folder / "lifemod.py").write_text(CODE)
    sys.path.insert(0, str(folder))
    module = importlib.import_module("lifemod")
    yield module
    sys.path.remove(str(folder))
    sys.modules.pop("lifemod", None)


def serve_url(plat, name, method):
    return f"{plat.url}/{plat.workspace}/serve/{name}/{method}"


def wait_for(predicate, timeout=30.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False


def test_requests_are_held_until_ready(mod, client, plat):
    started = time.time()
    svc = mod.Slowstart.deploy(2.0, client=client, quiet=True, wait=0)  # returns before the replica is ready
    assert svc.info()["status"] == "deploying"
    with plat.http() as http:
        resp = http.post(serve_url(plat, "Slowstart", "started_at"), timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json() >= started + 2.0  # answered by an instance whose __remote_init__ had finished
    assert svc.info()["status"] == "ready"


def test_scale_to_zero_and_back(mod, client, plat):
    svc = mod.Tagged.deploy("z", name="sleepy", scale_to_zero=1.0, client=client, quiet=True)
    pid = svc.whoami()["pid"]
    info = wait_for(lambda: (i := svc.info())["status"] == "scaled_to_zero" and not i["instances"] and i, timeout=20)
    assert info["ready_replicas"] == 0
    wait_for(lambda: not alive(pid), timeout=10)
    started = time.monotonic()
    with plat.http() as http:  # a plain HTTP call wakes it; the gateway holds it meanwhile
        resp = http.post(serve_url(plat, "sleepy", "whoami"), json={"i": 7})
    assert resp.status_code == 200 and resp.json()["tag"] == "z" and resp.json()["pid"] != pid
    assert time.monotonic() - started < 10
    assert svc.info()["status"] == "ready"
    svc.delete()


def test_a_killed_replica_is_restarted(mod, client, plat):
    svc = mod.Tagged.deploy("k", name="killme", client=client, quiet=True)
    pid = svc.whoami()["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), timeout=10)
    # new calls succeed: held while the replica restarts, then answered by the new one
    for i in range(5):
        out = svc.whoami(i)
        assert out["i"] == i and out["pid"] != pid
    info = svc.info()
    assert info["status"] == "ready" and len(info["instances"]) == 1 and info["instances"][0]["pid"] != pid
    svc.delete()


def test_redeploy_under_a_stream_of_requests_drops_nothing(mod, client, plat):
    svc = mod.Tagged.deploy("v1", 0.05, name="rolling", replicas=2, client=client, quiet=True)
    v1_pids = {i["pid"] for i in svc.info()["instances"]}
    assert len(v1_pids) == 2
    stop = threading.Event()
    results, failures = [], []

    def hammer():
        with httpx.Client(headers={"Authorization": f"Bearer {plat.token}"}, timeout=60) as http:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    resp = http.post(serve_url(plat, "rolling", "whoami"), json={"i": i})
                    if resp.status_code == 200:
                        results.append(resp.json()["tag"])
                    else:
                        failures.append((resp.status_code, resp.text[:300]))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) > 20, timeout=30)
        mod.Tagged.deploy("v2", 0.05, name="rolling", replicas=2, client=client, quiet=True)
        mark = len(results)
        wait_for(lambda: len(results) > mark + 40, timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    assert "v1" in results and results[-1] == "v2"
    assert set(results[mark + 12:]) == {"v2"}, "after the switch, calls reach the new version only"
    info = svc.info()
    assert info["version"] == 2 and {i["version"] for i in info["instances"]} == {2}
    wait_for(lambda: not any(alive(p) for p in v1_pids), timeout=30)  # the old replicas drained and left
    svc.delete()


def test_a_failed_rollout_keeps_the_old_version_serving(mod, client):
    svc = mod.Flaky.deploy(False, name="guarded", client=client, quiet=True)
    assert svc.whoami() == "flaky-ok"
    with pytest.raises(ServiceFailed, match="cannot load the weights"):
        mod.Flaky.deploy(True, name="guarded", client=client, quiet=True)
    assert svc.whoami() == "flaky-ok"
    info = svc.info()
    assert info["status"] == "ready" and info["version"] == 1 and "rolling to version 2 failed" in info["error"]["message"]
    mod.Flaky.deploy(False, name="guarded", client=client, quiet=True)  # a later good version rolls in
    assert svc.info()["version"] == 3 and svc.whoami() == "flaky-ok"
    svc.delete()


def test_replicas_share_the_calls(mod, client):
    svc = mod.Tagged.deploy("r", 0.2, name="wide", replicas=2, client=client, quiet=True)
    pids = {out["pid"] for out in svc.whoami.map(range(8), concurrency=8)}
    assert len(pids) == 2
    svc.delete()


def test_asgi_app_is_served(tmp_path, client, plat):
    folder = tmp_path / "asgi_proj"
    folder.mkdir()
    (folder / "webapp.py").write_text(ASGI_APP)
    svc = serve_asgi("webapp:app", name="api", folder=folder, client=client, quiet=True)
    assert svc.info()["kind"] == "asgi" and svc.info()["status"] == "ready"
    with plat.http() as http:
        base = f"{plat.url}/{plat.workspace}/serve/api"
        resp = http.get(base + "/hello", params={"q": "x"})
        assert resp.status_code == 200
        assert resp.json() == {"msg": "hello", "prefix": f"/{plat.workspace}/serve/api", "q": "x"}
        assert http.post(base + "/echo", content=b"abc").text == "cba"
        assert http.get(base + "/items/42").json() == {"id": 42}
        assert http.get(base + "/missing").status_code == 404
        big = b"ab" * 1_500_000  # 3 MB each way: streamed through the proxy, not buffered
        resp = http.post(base + "/echo", content=big)
        assert resp.status_code == 200 and resp.content == big[::-1]
        resp = http.get(base + "/count", params={"n": 20000})  # a chunked answer
        assert resp.text.splitlines() == [str(i) for i in range(20000)]
        assert httpx.get(base + "/hello").status_code == 401  # the gateway's auth stands in front
    svc.delete()


def test_services_come_back_after_a_platform_restart(mod, tmp_path):
    from platform_fixture import running_platform

    with running_platform(tmp_path / "home") as first:
        c = first.client()
        mod.Tagged.deploy("persisted", name="keeper", client=c, quiet=True)
        home = first.home
    (home / "gateway.log").rename(home / "gateway.first.log")  # the fixture reads the address from this log
    with running_platform(home) as second:
        with second.http() as http:
            resp = http.post(serve_url(second, "keeper", "whoami"), json={})
            assert resp.status_code == 200 and resp.json()["tag"] == "persisted"
