"""In-cluster image builds with rootless BuildKit (OPBOX_BUILDER=buildkit) end to end: the build pod holds
a presigned URL of its context and a push token scoped to one repository, nothing else.

    the platform   ``opbox up`` with the kubernetes backend, the buildkit builder, its store on a real
                   S3 server (SeaweedFS), OPBOX_REGISTRY on a real registry (Debian's docker-registry)
                   with **token** authentication (a token server issuing JWTs for the scopes asked)
    the cluster    the fake API server; its node runs the build pod by doing what ``buildctl build``
                   does with the pod's inputs (fetch the context from the URL without credentials,
                   build, push with the bearer token of the mounted config.json: the registry checks
                   the token's scope) and pulls the pushed image for the run's pod

No ``opbox-s3`` or ``opbox-registry`` Secret exists in the cluster: the build needs neither.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from fake_kube import FakeKube
from opbox.builder.image import DEFAULT_BASE_IMAGE
from platform_fixture import running_platform
from podman_env import e2e_code, podman, remove_images, wheelhouse  # noqa: F401 (fixtures)
from registry_server import require_registry, run_registry
from s3server import seaweedfs_with_bucket

pytestmark = pytest.mark.image_builds  # minutes of builds: not in `make test`'s PostgreSQL pass (conftest)
WORKSPACE = "buildkit-e2e"
NAMESPACE = f"opbox-{WORKSPACE}"
BUILDS = "opbox-builds"
BUCKET = "buildkit"

CODE = """
from opbox import operator

@operator()
def double(x):
    return 2 * x
"""


def _api(kube: FakeKube, method: str, path: str, body: dict | None = None) -> dict:
    resp = httpx.request(method, kube.url + path, json=body, timeout=10)
    assert resp.status_code < 300 or resp.status_code == 409, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def registry(podman):
    require_registry()
    with run_registry(auth="token") as reg:
        yield reg


@pytest.fixture(scope="module")
def s3():
    with seaweedfs_with_bucket(BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def kube(podman, registry, tmp_path_factory):
    with FakeKube(tmp_path_factory.mktemp("kube")) as fake:
        fake.node.registries.add(registry.host)
        for namespace in (BUILDS, NAMESPACE):
            _api(fake, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": namespace}})
        auth = base64.b64encode(registry.creds.encode()).decode()
        config = json.dumps({"auths": {registry.host: {"auth": auth}}})
        _api(fake, "POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": "registry-pull"}, "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()}})
        yield fake
        assert fake.state()["rejected"] == [], "the platform sent objects that fail validation"


@pytest.fixture(scope="module")
def plat(kube, registry, s3, wheelhouse, podman, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {
        "OPBOX_BACKEND": "kubernetes", "OPBOX_BUILDER": "buildkit", "KUBECONFIG": str(kube.kubeconfig),
        "OPBOX_WHEELHOUSE": str(wheelhouse), "OPBOX_WORKSPACE": WORKSPACE,
        "OPBOX_STORE_URL": f"s3://{BUCKET}/platform?path_style=1&region={s3.region}",
        "OPBOX_S3_ENDPOINT_URL": s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "OPBOX_REGISTRY": f"{registry.host}/opbox", "OPBOX_REGISTRY_INSECURE": "1",
        "OPBOX_REGISTRY_AUTH_FILE": str(registry.write_auth_file(home.parent / "registry-auth.json")),
        "OPBOX_BASE_IMAGE": DEFAULT_BASE_IMAGE, "OPBOX_K8S_IMAGE_PULL_SECRETS": "registry-pull",
        "OPBOX_BUILD_NAMESPACE": BUILDS, "OPBOX_K8S_WATCH_TIMEOUT": "20",
    }
    with running_platform(home, extra_env=env, timeout=60) as running:
        yield running
    remove_images(podman, WORKSPACE)


def added(kube: FakeKube, resource: str, namespace: str) -> list[dict]:
    return [obj for _, res, kind, obj in list(kube.store.history)
            if res == resource and kind == "ADDED" and obj["metadata"].get("namespace") == namespace]


def test_the_build_pod_gets_a_signed_context_url_and_a_push_token_for_one_repository(plat, kube, registry, s3,
                                                                                        client, tmp_path_factory):
    mod = e2e_code(tmp_path_factory.mktemp("buildkit_proj"), "buildkitmod", CODE)
    fn = mod.double.deploy(client=client, quiet=True)
    assert fn(21) == 42, "the run pulled the image BuildKit pushed"

    (job,) = added(kube, "jobs", BUILDS)
    text = json.dumps(job)
    # the access key's id is in the signed URL (X-Amz-Credential), as in every presigned URL; never the key
    assert s3.secret_key not in text and "AWS_" not in text
    assert registry.password not in text
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("docker.io/moby/buildkit:") and container["image"].endswith("-rootless")
    assert "envFrom" not in container and container["env"] == [{"name": "DOCKER_CONFIG", "value": "/home/user/.docker"}]
    security = container["securityContext"]
    assert (security["runAsUser"], security["runAsNonRoot"], security["seccompProfile"]["type"]) == (1000, True, "Unconfined")
    context = next(a for a in container["args"] if a.startswith("context="))
    assert context.startswith(f"context={s3.endpoint_url}/{BUCKET}/platform/builds/") and "X-Amz-Signature=" in context
    secrets_used = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
    assert secrets_used == [f"{job['metadata']['name']}-push"], "one Secret: the build's own"

    (push,) = [s for s in added(kube, "secrets", BUILDS) if s["metadata"]["name"] == secrets_used[0]]
    assert kube.store.get("secrets", BUILDS, secrets_used[0]) is None, "deleted when the build ended"
    config = json.loads(base64.b64decode(push["data"][".dockerconfigjson"]))
    (entry,) = config["auths"].values()
    assert list(entry) == ["registrytoken"], "a token, never the platform's password"
    repo = f"opbox/opbox-{WORKSPACE}-double"
    asked = [r for r in registry.token_requests if any(s.endswith(",push") for s in r["scopes"])]
    assert asked and asked[0]["scopes"] == [f"repository:{repo}:pull,push", "repository:opbox/opbox-cache:pull,push"]

    # the registry holds the token to its scope: another repository is refused
    bearer = {"Authorization": f"Bearer {entry['registrytoken']}"}
    assert httpx.post(f"{registry.url}/v2/{repo}/blobs/uploads/", headers=bearer).status_code == 202
    assert httpx.post(f"{registry.url}/v2/opbox/someone-else/blobs/uploads/", headers=bearer).status_code == 401
    log = client.http.get(client.path(f"/job/{fn.job_id}/build-log")).text
    assert f"push credential: a token for pull,push of {repo}, opbox/opbox-cache only, valid 300 s" in log
