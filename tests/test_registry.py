"""builder/registry.py against a real registry (Debian's docker-registry) that podman pushes a
small image to: open, with htpasswd (Basic) auth and with bearer tokens from a token server."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
import uuid

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conftest import require
from opbox.builder.registry import RegistryClient, parse_reference
from opbox.errors import BuildError, ConfigError, RegistryError, ValidationError
from registry_server import Registry, require_registry, run_registry
from servers import serve_app


# --- references ----------------------------------------------------------------------------

@pytest.mark.parametrize("ref, expected", [
    ("127.0.0.1:5000/opbox-ws-job:abc123def456", ("127.0.0.1:5000", "opbox-ws-job", "abc123def456")),
    ("registry.example.com/team/opbox-x:tag", ("registry.example.com", "team/opbox-x", "tag")),
    ("localhost/x:tag", ("localhost", "x", "tag")),
    ("localhost:5000/a/b/c", ("localhost:5000", "a/b/c", "latest")),
    ("Registry.Example/x:1", ("Registry.Example", "x", "1")),
    ("[::1]:5000/x:y", ("[::1]:5000", "x", "y")),
    ("busybox", ("docker.io", "library/busybox", "latest")),
    ("team/app:v1.2_3", ("docker.io", "team/app", "v1.2_3")),
    ("docker.io/busybox:1", ("docker.io", "library/busybox", "1")),
    ("ghcr.io/o/r:t@sha256:" + "a" * 64, ("ghcr.io", "o/r", "sha256:" + "a" * 64)),
    ("my__name-x/sub.y:T", ("docker.io", "my__name-x/sub.y", "T")),
])  # fmt: skip
def test_parse_reference(ref, expected):
    assert parse_reference(ref) == expected


@pytest.mark.parametrize("ref", [
    "", " x:y", "x:y\n", "Upper/Case:x", "host.com/Upper:x", "host.com/x:", "host.com/:t", "host.com//x",
    "x:-t", "my__name.x/sub:t", "x:" + "t" * 129, "x@sha256:abc", "host_bad.com/x:y", "-x.com/y", "x/" + "a" * 260,
    "host.com/x:t:u", "a/b:c/d",
])  # fmt: skip
def test_parse_reference_rejects(ref):
    with pytest.raises(ValidationError, match="bad image reference"):
        parse_reference(ref)


def test_auth_file_entries(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},  # hub:secret
        "reg.example.com/team": {"username": "team-user", "password": "p1"},
        "https://reg.example.com": {"username": "host-user", "password": "p2"},
    }}))  # fmt: skip
    client = RegistryClient(auth_file=path)
    assert client.credentials("docker.io") == ("hub", "secret")
    assert client.credentials("reg.example.com") == ("host-user", "p2")  # the plain host key wins
    assert client.credentials("other.example.com") is None
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="auth file"):
        client.credentials("docker.io")


def test_unreachable_registry_is_an_error():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{sock.getsockname()[1]}"
    with RegistryClient(insecure_hosts={host}, timeout=5) as client:
        with pytest.raises(RegistryError, match=f"registry {host} is unreachable") as err:
            client.exists(f"{host}/x:y")
    assert isinstance(err.value, BuildError) and err.value.details["registry"] == host


# --- a real registry, a real push ----------------------------------------------------------

@pytest.fixture(scope="module")
def registry_exe() -> str:
    return require_registry()


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory):
    """A one-file image in local podman storage (imported from a tar: no base image needed)."""
    podman = shutil.which("podman")
    require(podman is not None and _run(podman, "info").returncode == 0, "podman does not work here")
    tar = tmp_path_factory.mktemp("tiny") / "rootfs.tar"
    with tarfile.open(tar, "w") as archive:
        data = f"opbox registry test {uuid.uuid4()}\n".encode()  # a fresh digest each session
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    name = f"localhost/opbox-test-tiny:{uuid.uuid4().hex[:12]}"
    done = _run(podman, "import", "-q", str(tar), name)
    assert done.returncode == 0, done.stderr
    yield podman, name
    _run(podman, "rmi", "--force", name)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def push(tiny_image, registry: Registry, repo_tag: str, tmp_path, creds: bool = False) -> tuple[str, str]:
    """Push the tiny image as ``<registry>/<repo_tag>``; the local tag is removed again. The ref and its digest."""
    podman, source = tiny_image
    ref = f"{registry.host}/{repo_tag}"
    digest_file = tmp_path / "digest"
    try:
        assert _run(podman, "tag", source, ref).returncode == 0
        args = ["--creds", registry.creds] if creds else []
        done = _run(podman, "push", "-q", "--tls-verify=false", *args, "--digestfile", str(digest_file), ref)
        assert done.returncode == 0, done.stderr
    finally:
        _run(podman, "rmi", ref)  # only the tag: the image itself stays under its source name
    return ref, digest_file.read_text().strip()


def test_open_registry(registry_exe, tiny_image, tmp_path):
    with run_registry(exe=registry_exe) as reg:
        ref, digest = push(tiny_image, reg, "opbox-test/base:t1", tmp_path)
        with RegistryClient(insecure_hosts={reg.host}) as client:
            assert client.exists(ref) is True
            assert client.exists(f"{reg.host}/opbox-test/base:t2") is False
            assert client.exists(f"{reg.host}/opbox-test/never-pushed:t1") is False
            assert client.exists(f"{reg.host}/opbox-test/base@{digest}") is True
        with RegistryClient() as tls:  # not declared insecure: https against a plain-http registry
            with pytest.raises(RegistryError, match=f"registry {reg.host} is unreachable at https://"):
                tls.exists(ref)


def test_htpasswd_registry(registry_exe, tiny_image, tmp_path):
    with run_registry(auth=True, exe=registry_exe) as reg:
        ref, _ = push(tiny_image, reg, "opbox-test/base:t1", tmp_path, creds=True)

        with RegistryClient(insecure_hosts={reg.host}) as anonymous:
            with pytest.raises(RegistryError, match=f"registry {reg.host} needs credentials") as err:
                anonymous.exists(ref)
        assert err.value.details == {"registry": reg.host, "status": 401}

        wrong = reg.write_auth_file(tmp_path / "wrong.json", password="not-it")
        with RegistryClient(insecure_hosts={reg.host}, auth_file=wrong) as client:
            with pytest.raises(RegistryError, match="rejected the credentials"):
                client.exists(ref)

        good = reg.write_auth_file(tmp_path / "auth.json")
        with RegistryClient(insecure_hosts={reg.host}, auth_file=good) as client:
            assert client.exists(ref) is True
            assert client.exists(f"{reg.host}/opbox-test/base:t2") is False


def test_token_registry(registry_exe, tiny_image, tmp_path):
    with run_registry(auth="token", exe=registry_exe) as reg:
        ref, _ = push(tiny_image, reg, "opbox-test/base:t1", tmp_path, creds=True)

        with RegistryClient(insecure_hosts={reg.host}) as anonymous:  # an anonymous token grants nothing
            with pytest.raises(RegistryError, match=f"registry {reg.host} needs credentials"):
                anonymous.exists(ref)

        reg.token_requests.clear()
        with RegistryClient(insecure_hosts={reg.host}, auth_file=reg.write_auth_file(tmp_path / "a.json")) as client:
            assert client.exists(ref) is True
            assert client.exists(ref) is True
            assert client.exists(f"{reg.host}/opbox-test/base:t2") is False  # same repository, same token
            assert client.exists(f"{reg.host}/opbox-test/other:t1") is False  # another scope, another token
        assert [r["scopes"] for r in reg.token_requests] == [["repository:opbox-test/base:pull"],
                                                              ["repository:opbox-test/other:pull"]]
        assert all(r["service"] == "opbox-test-registry" and r["authorization"].startswith("Basic ")
                   for r in reg.token_requests)


# --- bearer details against a small HTTP server ------------------------------------------

def test_bearer_access_token_expiry_and_unsupported_schemes(tmp_path):
    issued: list[dict] = []

    async def token(request):
        issued.append(dict(request.query_params))
        if request.headers.get("authorization") is not None:
            return Response(status_code=401)
        return JSONResponse({"access_token": f"tok{len(issued)}", "expires_in": 6})  # cached for 1s

    async def manifest(request):
        repo = request.path_params["repo"]
        if repo == "weird":
            return Response(status_code=401, headers={"WWW-Authenticate": 'Negotiate abc'})
        if repo == "teapot":
            return Response(status_code=418)
        if request.headers.get("authorization") != f"Bearer tok{len(issued)}":
            realm = f"{request.base_url}token"
            return Response(status_code=401, headers={
                "WWW-Authenticate": f'Bearer realm="{realm}",service="fake",scope="repository:{repo}:pull"'})
        assert "application/vnd.oci.image.index.v1+json" in request.headers["accept"]
        return Response(status_code=200 if request.path_params["tag"] == "t1" else 404)

    app = Starlette(routes=[Route("/token", token), Route("/v2/{repo:path}/manifests/{tag}", manifest, methods=["HEAD"])])
    with serve_app(app) as url:
        host = url.removeprefix("http://")
        with RegistryClient(insecure_hosts={host}) as client:
            assert client.exists(f"{host}/a/b:t1") is True
            assert client.exists(f"{host}/a/b:t2") is False
            assert issued == [{"service": "fake", "scope": "repository:a/b:pull"}]
            time.sleep(1.1)  # the token expired: a new one
            assert client.exists(f"{host}/a/b:t1") is True
            assert len(issued) == 2
            with pytest.raises(RegistryError, match="unsupported authentication"):
                client.exists(f"{host}/weird:t1")
            with pytest.raises(RegistryError, match=r"unexpected answer for teapot:t1 \(HTTP 418\)"):
                client.exists(f"{host}/teapot:t1")
        auth_file = tmp_path / "auth.json"
        auth_file.write_text(json.dumps({"auths": {host: {"username": "u", "password": "p"}}}))
        with RegistryClient(insecure_hosts={host}, auth_file=auth_file) as client:  # the token server says no
            with pytest.raises(RegistryError, match="rejected the credentials"):
                client.exists(f"{host}/a/b:t1")
