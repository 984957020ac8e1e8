"""Classes as HTTP endpoints: deploy, curl JSON calls, SDK calls, errors, OpenAPI, 429, map, CLI, delete."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import require
from opbox import Operator, RemoteService, ServiceFailed
from opbox.outcome import RemoteTraceback

CODE = '''
import asyncio
import time
from dataclasses import dataclass

from opbox import operator


@dataclass
class Point:
    x: int
    y: int


class ModelError(Exception):
    pass


@operator()
class Model:
    """A toy model: scales sums."""

    def __init__(self, scale: int, offset: float = 0.0, *, tag: str = "v1"):
        self.scale, self.offset, self.tag = scale, offset, tag
        self.loaded = False

    def __remote_init__(self):
        self.loaded = True

    def predict(self, x: list[float], bias: float = 0.0) -> float:
        """Scaled sum of x."""
        return sum(x) * self.scale + self.offset + bias

    async def apredict(self, x: int) -> int:
        await asyncio.sleep(0)
        return x * self.scale

    def point(self, x: int) -> Point:
        return Point(x, x * self.scale)

    def rich(self, data: dict) -> dict:
        return {"keys": sorted(data), "blob": bytes(range(5)), "nested": {"set": {1, 2}}, "loaded": self.loaded}

    def check(self, x: int) -> int:
        if x < 0:
            raise ModelError(f"negative input {x}")
        return x

    def fail(self):
        raise ValueError("bad value 42")

    def slow(self, seconds: float = 1.0) -> float:
        time.sleep(seconds)
        return seconds

    def whoami(self) -> str:
        return self.tag

    def _hidden(self):
        return "no"
'''


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving_proj")
    (folder / "servemod.py").write_text(CODE)
    sys.path.insert(0, str(folder))
    module = importlib.import_module("servemod")
    yield module
    sys.path.remove(str(folder))
    sys.modules.pop("servemod", None)


@pytest.fixture(scope="module")
def model(mod, client):
    return mod.Model.deploy(3, offset=0.5, client=client, quiet=True)


def url(plat, *parts):
    return f"{plat.url}/{plat.workspace}/" + "/".join(parts)


def test_the_class_is_unchanged_locally(mod):
    local = mod.Model(2)
    assert local.predict([1, 2]) == 6 and local.loaded is False  # __remote_init__ runs only remotely
    assert isinstance(mod.Model, type) and callable(mod.Model.deploy)


def test_deploy_answers_a_ready_service(model, client):
    info = model.info()
    assert info["status"] == "ready" and info["kind"] == "class" and info["ready_replicas"] == 1
    assert info["url"].endswith(f"/{client.workspace}/serve/Model")


def test_curl_json_call(model, plat):
    require(shutil.which("curl") is not None, "curl is not installed")
    out = subprocess.run(["curl", "-sS", "-X", "POST", "-H", f"Authorization: Bearer {plat.token}",
                          url(plat, "serve", "Model", "predict"), "-d", '{"x": [1, 2, 3]}'],
                         capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(out.stdout) == 18.5


def test_a_proxied_answer_has_each_header_once(model, plat):
    """The replica's date and server headers are not passed on beside the gateway's own; its length is re-stated."""
    with plat.http() as http:
        answer = http.post(url(plat, "serve", "Model", "predict"), json={"x": [1, 2, 3]})
    assert answer.status_code == 200 and answer.json() == 18.5
    names = [name.lower() for name, _ in answer.headers.raw]
    assert names.count(b"date") == 1 and names.count(b"content-length") == 1 and names.count(b"server") <= 1
    assert answer.headers["content-type"] == "application/json"


def test_json_calls_args_kwargs_arrays_and_results(model, plat):
    with plat.http() as http:
        call = lambda m, body: http.post(url(plat, "serve", "Model", m), json=body)  # noqa: E731
        assert call("predict", {"args": [[1, 1]], "kwargs": {"bias": 1}}).json() == 7.5
        assert call("predict", [[2], 0.5]).json() == 7.0
        assert call("apredict", {"x": 4}).json() == 12
        assert call("point", {"x": 2}).json() == {"x": 2, "y": 6}
        rich = call("rich", {"data": {"b": 1, "a": 2}}).json()
        assert rich == {"keys": ["a", "b"], "blob": "AAECAwQ=", "nested": {"set": [1, 2]}, "loaded": True}


def test_bad_arguments_are_422_naming_the_signature(model, plat):
    with plat.http() as http:
        resp = http.post(url(plat, "serve", "Model", "predict"), json={"y": 1})
        assert resp.status_code == 422
        body = resp.json()
        assert body["error"] == "validation_error"
        assert "predict(x: list[float], bias: float = 0.0) -> float" in body["message"]
        assert http.post(url(plat, "serve", "Model", "predict"), content=b"{not json").status_code == 422
        assert http.post(url(plat, "serve", "Model", "predict"), json=3).status_code == 422


def test_json_nested_too_deep_is_a_400_on_a_kept_connection(model, plat):
    deep = "[" * 100_000 + "]" * 100_000
    with plat.http() as http:
        answer = http.post(url(plat, "serve", "Model", "predict"), content=deep)
        assert answer.status_code == 400 and "nested too deeply" in answer.json()["message"]
        assert http.post(url(plat, "serve", "Model", "predict"), json={"x": [1]}).status_code == 200


def test_unknown_method_and_service_are_404(model, plat):
    with plat.http() as http:
        resp = http.post(url(plat, "serve", "Model", "nope"), json={})
        assert resp.status_code == 404 and "predict" in resp.json()["details"]["methods"]
        assert http.post(url(plat, "serve", "Model", "_hidden"), json={}).status_code == 404
        assert http.post(url(plat, "serve", "Model", "deploy"), json={}).status_code == 404
        assert http.post(url(plat, "serve", "NoSuchService", "predict"), json={}).status_code == 404
        assert http.get(url(plat, "services", "NoSuchService")).status_code == 404


def test_exception_is_a_json_error(model, plat):
    with plat.http() as http:
        resp = http.post(url(plat, "serve", "Model", "fail"))
        assert resp.status_code == 500
        body = resp.json()  # the platform's one error shape
        assert body["error"] == "remote_error" and body["message"] == "bad value 42"
        error = body["details"]
        assert error["type"] == "builtins.ValueError"
        assert 'raise ValueError("bad value 42")' in error["traceback"]
        assert "opbox/runtime" not in error["traceback"]


def test_auth_is_required(model, plat):
    resp = httpx.post(url(plat, "serve", "Model", "predict"), json={"x": [1]})
    assert resp.status_code == 401
    resp = httpx.post(url(plat, "serve", "Model", "predict"), json={"x": [1]},
                      headers={"Authorization": "Bearer obx_wrong"})
    assert resp.status_code == 401


def test_sdk_calls_with_python_objects(model, mod):
    assert model.predict([1, 2, 3]) == 18.5
    assert model.predict([1], bias=1.0) == 4.5
    point = model.point(5)
    assert type(point).__name__ == "Point" and (point.x, point.y) == (5, 15)
    rich = model.rich({"z": 1})
    assert rich["blob"] == bytes(range(5)) and rich["nested"]["set"] == {1, 2}  # not JSON: pickled both ways
    assert model.apredict(2) == 6
    big = list(range(1_000_000))  # several MB pickled: the request streams through the gateway
    assert model.predict(big) == sum(big) * 3 + 0.5
    assert model.rich({str(i): i for i in range(300_000)})["keys"][:2] == ["0", "1"]  # a large answer


def test_sdk_reraises_remote_exceptions(model):
    with pytest.raises(ValueError, match="bad value 42") as info:
        model.fail()
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "servemod.py" in info.value.__cause__.text
    with pytest.raises(Exception) as custom:
        model.check(-1)
    assert type(custom.value).__name__ == "ModelError" and "negative input -1" in str(custom.value)
    with pytest.raises(TypeError, match="signature: predict"):
        model.predict()


def test_from_serving_gives_the_same_handle(model, client):
    again = Operator.from_serving("Model", client=client)
    assert isinstance(again, RemoteService)
    assert again.predict([1]) == 3.5
    with pytest.raises(AttributeError):
        again._private  # noqa: B018


def test_service_openapi_is_typed(model, plat):
    with plat.http() as http:
        doc = http.get(url(plat, "serve", "Model", "openapi.json")).json()
    prefix = f"/{plat.workspace}/serve/Model"
    assert set(doc["paths"]) == {f"{prefix}/{m}" for m in
                                 ("predict", "apredict", "point", "rich", "check", "fail", "slow", "whoami")}
    predict = doc["paths"][f"{prefix}/predict"]["post"]
    schema = predict["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["x"] == {"type": "array", "items": {"type": "number"}}
    assert schema["properties"]["bias"] == {"type": "number", "default": 0.0}
    assert schema["required"] == ["x"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {"type": "number"}
    assert predict["summary"] == "Scaled sum of x."
    point = doc["paths"][f"{prefix}/point"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert point["properties"] == {"x": {"type": "integer"}, "y": {"type": "integer"}}


def test_gateway_openapi_lists_the_service_routes(plat):
    paths = httpx.get(plat.url + "/openapi.json").json()["paths"]
    for path in ("/{workspace}/services", "/{workspace}/services/{name}", "/{workspace}/services/{name}/logs",
                 "/{workspace}/serve/{name}/openapi.json", "/{workspace}/serve/{name}/{path}"):
        assert path in paths, path


def test_map_over_a_method(model):
    assert model.predict.map([[i] for i in range(50)], concurrency=8) == [i * 3 + 0.5 for i in range(50)]
    assert model.apredict.map(iter(range(10))) == [i * 3 for i in range(10)]
    assert model.predict.starmap([([1], 1.0), ([2], 2.0)]) == [4.5, 8.5]
    assert model.predict.map([[1]], kwargs={"bias": 10}) == [13.5]
    out = model.check.map([1, -2, 3], return_exceptions=True)
    assert out[0] == 1 and out[2] == 3 and type(out[1]).__name__ == "ModelError"
    with pytest.raises(Exception, match="negative input -2"):
        model.check.map([1, -2, 3])


def test_429_beyond_concurrency_and_queue(mod, client, plat):
    tight = mod.Model.deploy(1, name="tight", concurrency=1, queue=1, client=client, quiet=True)
    statuses, retry_after = [], []

    def hit():
        with httpx.Client(headers={"Authorization": f"Bearer {plat.token}"}, timeout=60) as http:
            resp = http.post(url(plat, "serve", "tight", "slow"), json={"seconds": 1.5})
            statuses.append(resp.status_code)
            retry_after.append(resp.headers.get("retry-after"))

    threads = [threading.Thread(target=hit) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 200, 429, 429, 429], statuses
    assert all(r == "1" for s, r in zip(statuses, retry_after) if s == 429)
    # the SDK waits 429s out (Retry-After) instead of failing
    assert tight.slow.map([0.3] * 4, concurrency=4) == [0.3] * 4
    tight.delete()


def test_services_list_logs_and_cli(model, plat, client):
    names = [s["name"] for s in client.get("/services").json()["services"]]
    assert "Model" in names
    model.predict([1])
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "services", "--json"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["Model"]["status"] == "ready" and rows["Model"]["version"] >= 1
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "services"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert "Model" in out.stdout and "ready" in out.stdout
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "logs", "--service", "Model"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "servemod:Model ready" in out.stdout


def test_failing_init_is_reported(tmp_path, client, user_code):
    mod = user_code('''
        from opbox import operator

        @operator()
        class Broken:
            def __remote_init__(self):
                raise RuntimeError("weights missing at /models/x")

            def predict(self):
                return 1
    ''')
    with pytest.raises(ServiceFailed, match="weights missing"):
        mod.Broken.deploy(client=client, quiet=True)
    info = client.get("/services/Broken").json()
    assert info["status"] == "failed" and "weights missing" in info["error"]["message"]
    with httpx.Client(headers={"Authorization": f"Bearer {client.config.token}"}) as http:
        resp = http.post(f"{client.config.url}/{client.workspace}/serve/Broken/predict", json={})
        assert resp.status_code == 503 and "weights missing" in resp.json()["message"]
    client.request("DELETE", "/services/Broken")


def test_functions_are_not_served(client, user_code):
    mod = user_code('''
        from opbox import operator

        @operator()
        def plain(x):
            return x
    ''')
    remote = mod.plain.deploy(client=client, quiet=True)
    with pytest.raises(Exception, match="only classes"):
        client.request("PUT", "/services/plain", json={"job": remote.job_id})


def test_delete(mod, client, plat):
    gone = mod.Model.deploy(2, name="gone", client=client, quiet=True)
    assert gone.predict([1]) == 2
    pid = gone.info()["instances"][0]["pid"]
    gone.delete()
    with plat.http() as http:
        assert http.get(url(plat, "services", "gone")).status_code == 404
        assert http.post(url(plat, "serve", "gone", "predict"), json={"x": [1]}).status_code == 404
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") \
            and "zombie" not in open(f"/proc/{pid}/status").read().lower():
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_replicas_answer_only_the_gateway(model, plat, client):
    """Replicas listen on loopback, which every local process shares: a call that does not come through
    the gateway's proxy (which adds the replica's token) is refused; the API never shows the token."""
    info = client.get("/services/Model").json()
    (replica,) = [i for i in info["instances"] if i["state"] == "ready"]
    assert "@" not in replica["url"]
    direct = httpx.post(replica["url"] + "/call/predict", json={"x": [1]})
    assert direct.status_code == 401 and "through the gateway" in direct.json()["message"]
    forged = httpx.post(replica["url"] + "/call/predict", json={"x": [1]}, headers={"x-opbox-replica-token": "guess"})
    assert forged.status_code == 401
    assert httpx.get(replica["url"] + "/healthz").status_code == 200  # health checks need no token
    with plat.http() as http:
        assert http.post(url(plat, "serve", "Model", "predict"), json={"x": [1]},
                         headers={"x-opbox-replica-token": "guess"}).status_code == 200  # the caller's header is dropped
