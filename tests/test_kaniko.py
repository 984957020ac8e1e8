"""In-cluster image builds (OPBOX_BUILDER=kaniko) end to end, with nothing faked but the cluster.

    the platform   ``opbox up`` with the kubernetes backend, the kaniko builder, its store on a
                   real S3 server (SeaweedFS) and OPBOX_REGISTRY on a real registry (Debian's
                   docker-registry, with htpasswd auth)
    the cluster    the fake API server (tests/fake_kube): every object validated; its node runs
                   the kaniko Job's pod by doing what the executor does (fetch the context from
                   S3 with the pod's env and Secret, build it, push to the registry with the
                   mounted dockerconfigjson) and pulls the pushed image for the run's pod

So a deploy goes: context tar.gz -> S3 -> kaniko Job -> registry -> run pod pulls -> result.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time

import httpx
import pytest

from fake_kube import FakeKube
from opbox import BuildError
from opbox.builder.image import DEFAULT_BASE_IMAGE
from opbox.builder.registry import RegistryClient
from platform_fixture import running_platform
from podman_env import e2e_code, podman, wheelhouse  # noqa: F401 (fixtures)
from registry_server import require_registry, run_registry
from s3server import seaweedfs_with_bucket

pytestmark = pytest.mark.image_builds  # minutes of builds: not in `make test`'s PostgreSQL pass (conftest)
WORKSPACE = "kaniko-e2e"
NAMESPACE = f"opbox-{WORKSPACE}"
SYSTEM = "opbox-system"
BUCKET = "kaniko"

CODE = """
from opbox import operator

@operator()
def double(x):
    print(f"doubling {x}")
    return 2 * x

@operator()
def shout(word):
    return word.upper() + "!"
"""


def _api(kube: FakeKube, method: str, path: str, body: dict | None = None) -> dict:
    resp = httpx.request(method, kube.url + path, json=body, timeout=10)
    assert resp.status_code < 300 or resp.status_code == 409, resp.text
    return resp.json()


def _dockerconfig(host: str, user: str, password: str) -> str:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}})


def _s3_secret(s3, secret_key: str | None = None) -> dict:
    return _secret(SYSTEM, "opbox-s3", {"AWS_ACCESS_KEY_ID": s3.access_key,
                                        "AWS_SECRET_ACCESS_KEY": secret_key or s3.secret_key})


def _secret(namespace: str, name: str, data: dict, kind: str = "Opaque") -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": kind, "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


@pytest.fixture(scope="module")
def registry(podman):
    require_registry()
    with run_registry(auth="htpasswd") as reg:
        yield reg


@pytest.fixture(scope="module")
def s3():
    with seaweedfs_with_bucket(BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def base_image(podman, registry, tmp_path_factory):
    """The base image, in the registry only: kaniko (here: the node) pulls it from there."""
    ref = f"{registry.host}/opbox-base:bookworm-py3"
    auth = registry.write_auth_file(tmp_path_factory.mktemp("auth") / "config.json")
    for cmd in (["tag", DEFAULT_BASE_IMAGE, ref], ["push", "--quiet", "--tls-verify=false", "--authfile", str(auth), ref],
                ["untag", ref, ref]):
        done = subprocess.run([podman, *cmd], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
    return ref


@pytest.fixture(scope="module")
def kube(podman, registry, s3, tmp_path_factory):
    with FakeKube(tmp_path_factory.mktemp("kube")) as fake:
        fake.node.registries.add(registry.host)
        config = _dockerconfig(registry.host, registry.username, registry.password)
        for namespace in (SYSTEM, NAMESPACE):
            _api(fake, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": namespace}})
        # what the operator's guide has them create: the S3 keys and the registry credentials
        _api(fake, "POST", f"/api/v1/namespaces/{SYSTEM}/secrets", _s3_secret(s3))
        _api(fake, "POST", f"/api/v1/namespaces/{SYSTEM}/secrets", _secret(
            SYSTEM, "opbox-registry", {".dockerconfigjson": config}, "kubernetes.io/dockerconfigjson"))
        _api(fake, "POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", _secret(
            NAMESPACE, "registry-pull", {".dockerconfigjson": config}, "kubernetes.io/dockerconfigjson"))
        yield fake
        assert fake.state()["rejected"] == [], "the platform sent objects that fail validation"


@pytest.fixture(scope="module")
def plat(kube, registry, s3, base_image, wheelhouse, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {
        "OPBOX_BACKEND": "kubernetes", "OPBOX_BUILDER": "kaniko", "KUBECONFIG": str(kube.kubeconfig),
        "OPBOX_WHEELHOUSE": str(wheelhouse), "OPBOX_WORKSPACE": WORKSPACE,
        "OPBOX_STORE_URL": f"s3://{BUCKET}/platform?path_style=1&region={s3.region}",
        "OPBOX_S3_ENDPOINT_URL": s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "OPBOX_REGISTRY": f"{registry.host}/opbox", "OPBOX_REGISTRY_INSECURE": "1",
        "OPBOX_REGISTRY_AUTH_FILE": str(registry.write_auth_file(home.parent / "registry-auth.json")),
        "OPBOX_BASE_IMAGE": base_image, "OPBOX_K8S_IMAGE_PULL_SECRETS": "registry-pull",
        "OPBOX_SYSTEM_NAMESPACE": SYSTEM, "OPBOX_K8S_WATCH_TIMEOUT": "20",
    }
    with running_platform(home, extra_env=env, timeout=60) as running:
        yield running


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    return e2e_code(tmp_path_factory.mktemp("kaniko_proj"), "kanikomod", CODE)


def build_jobs(kube: FakeKube) -> list[dict]:
    """Every build Job ever created (from the fake's event history: finished ones are deleted)."""
    return [obj for _, resource, kind, obj in list(kube.store.history)
            if resource == "jobs" and kind == "ADDED" and obj["metadata"]["namespace"] == SYSTEM]


def build_log(client, job: str) -> str:
    resp = client.http.get(client.path(f"/job/{job}/build-log"))
    assert resp.status_code == 200, resp.text
    return resp.text


def test_deploy_builds_with_kaniko_pushes_and_the_run_pulls_the_image(plat, kube, registry, s3, mod, client):
    before = len(build_jobs(kube))
    remote = mod.double.deploy(client=client, quiet=True)
    assert remote(21) == 42

    (job,) = build_jobs(kube)[before:]
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = dict(arg.split("=", 1) for arg in container["args"])
    image = args["--destination"]
    assert image.startswith(f"{registry.host}/opbox/opbox-{WORKSPACE}-double:")
    assert args["--context"].startswith(f"s3://{BUCKET}/platform/builds/opbox-build-")
    assert args["--cache"] == "true" and args["--cache-repo"] == f"{registry.host}/opbox/opbox-cache"
    assert args["--insecure-registry"] == registry.host
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["S3_ENDPOINT"] == s3.endpoint_url and env["S3_FORCE_PATH_STYLE"] == "true"
    assert container["envFrom"] == [{"secretRef": {"name": "opbox-s3"}}]
    assert job["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == "opbox-registry"

    log = build_log(client, "double")
    assert f"kaniko Job {SYSTEM}/{job['metadata']['name']} building {image}" in log
    assert "Retrieving the build context from s3://" in log, "kaniko's own output streams into the build log"
    assert f"Pushed {image}" in log

    with RegistryClient(insecure_hosts=[registry.host],
                        auth_file=plat.env["OPBOX_REGISTRY_AUTH_FILE"]) as reg_client:
        assert reg_client.exists(image), "the image is in the registry"
    assert image in kube.node.pulled, "the run's pod pulled the image kaniko pushed"
    run_jobs = [o for _, res, kind, o in list(kube.store.history)
                if res == "jobs" and kind == "ADDED" and o["metadata"]["namespace"] == NAMESPACE]
    assert run_jobs[-1]["spec"]["template"]["spec"]["containers"][0]["image"] == image
    # the build's context is gone from S3 and so is the finished build Job
    from opbox.platform.store.s3 import S3Store

    store = S3Store(BUCKET, prefix="platform", endpoint_url=s3.endpoint_url, access_key=s3.access_key,
                    secret_key=s3.secret_key, region=s3.region)
    assert list(store.list("builds/")) == []
    deadline = time.monotonic() + 10
    while kube.store.get("jobs", SYSTEM, job["metadata"]["name"]) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kube.store.get("jobs", SYSTEM, job["metadata"]["name"]) is None


def test_an_image_in_the_registry_is_not_built_again(plat, kube, mod, client):
    first = mod.double.deploy(client=client, quiet=True)
    before = len(build_jobs(kube))
    again = mod.double.deploy(client=client, quiet=True)
    assert len(build_jobs(kube)) == before, "no kaniko Job for an image the registry has"
    assert "is in the registry: nothing to build" in build_log(client, "double") or \
        "exists: nothing to build" in build_log(client, "double")
    assert again(5) == 10 and first(1) == 2


def test_a_failing_build_raises_build_error_with_kanikos_log(plat, kube, s3, mod, client):
    _api(kube, "PUT", f"/api/v1/namespaces/{SYSTEM}/secrets/opbox-s3", _s3_secret(s3, "wrong"))
    try:
        with pytest.raises(BuildError) as info:
            mod.shout.deploy(client=client, quiet=True)
    finally:
        _api(kube, "PUT", f"/api/v1/namespaces/{SYSTEM}/secrets/opbox-s3", _s3_secret(s3))
    message = str(info.value)
    assert "in the cluster failed: kaniko exited with code 1" in message, message
    assert "error resolving the build context" in (info.value.log or ""), info.value.log
    failed = build_jobs(kube)[-1]["metadata"]["name"]
    assert kube.store.get("jobs", SYSTEM, failed) is not None, "a failed build Job stays, to be looked at"
    # with the credentials right again the same code builds
    assert mod.shout.deploy(client=client, quiet=True)("hi") == "HI!"


def test_a_build_pod_that_cannot_start_fails_fast_with_the_reason(plat, kube, s3, mod, client, tmp_path):
    _api(kube, "DELETE", f"/api/v1/namespaces/{SYSTEM}/secrets/opbox-s3")
    fresh = e2e_code(tmp_path, "kanikomod_nosecret", CODE.replace("!", "?"))
    started = time.monotonic()
    try:
        with pytest.raises(BuildError) as info:
            fresh.shout.deploy(client=client, quiet=True)
    finally:
        _api(kube, "POST", f"/api/v1/namespaces/{SYSTEM}/secrets", _s3_secret(s3))
    assert time.monotonic() - started < 60
    assert "cannot start: CreateContainerConfigError" in str(info.value) and "opbox-s3" in str(info.value)


SERVICE_CODE = """
from opbox import operator

@operator()
class Greeter:
    def __init__(self, greeting: str):
        self.greeting = greeting

    def greet(self, name: str) -> str:
        return f"{self.greeting}, {name}"
"""


def test_a_class_built_by_kaniko_serves_from_the_pulled_image(plat, kube, registry, client, tmp_path):
    mod = e2e_code(tmp_path, "kanikosvc", SERVICE_CODE)
    greeter = mod.Greeter.deploy("hello", client=client, quiet=True)
    assert greeter.greet(name="kaniko") == "hello, kaniko"
    name = greeter.info()["knative_service"].split("/")[1]
    image = kube.store.get("services", NAMESPACE, name)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith(f"{registry.host}/opbox/opbox-{WORKSPACE}-greeter:")
    assert image in kube.node.pulled, "the replica pulled the image kaniko pushed"
    assert f"Pushed {image}" in build_log(client, "Greeter")


def test_the_build_context_streams_to_s3_never_to_a_temporary_file(s3, tmp_path, monkeypatch):
    import os
    import tempfile

    from opbox.builder.image import write_context_archive
    from opbox.platform.backends.kubernetes.kaniko import upload_context
    from opbox.platform.store.s3 import S3Store

    store = S3Store(BUCKET, prefix="streamed/", endpoint_url=s3.endpoint_url, access_key=s3.access_key,
                    secret_key=s3.secret_key, region=s3.region, multipart_threshold=5 * 1024 * 1024)
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM scratch\n")
    (context / "big.whl").write_bytes(os.urandom(12 * 1024 * 1024))  # incompressible, as wheels are
    expected = tmp_path / "expected.tar.gz"
    size = write_context_archive(context, expected)

    def no_temporary_files(*args, **kwargs):
        raise AssertionError("the build context went through a temporary file")

    for name in ("TemporaryDirectory", "NamedTemporaryFile", "TemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_temporary_files)
    assert upload_context(store, context, "builds/ctx.tar.gz") == size
    monkeypatch.undo()
    assert store.get("builds/ctx.tar.gz") == expected.read_bytes(), "the same reproducible archive"
    head = store._client.head_object(Bucket=BUCKET, Key="streamed/builds/ctx.tar.gz")
    assert int(head["ETag"].strip('"').rpartition("-")[2]) >= 2, "a multipart upload"
