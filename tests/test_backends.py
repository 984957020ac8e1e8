"""The backend port: declared abilities and their 501, the registries, the runtime's environment,
the typed artifact and settings written once. A backend without ``Serving`` runs behind a real
gateway; the rest are unit checks of the seams the end-to-end tests go through."""

from __future__ import annotations

import hashlib

import dataclasses
import importlib
import inspect

import httpx
import pytest

from opbox.builder.base import Artifact, BuildSpec
from opbox.errors import ConfigError, NotSupported, from_response
from opbox.resource import Resource
from opbox.platform.backends import registry
from opbox.platform.backends.base import (CANNOT, RunTicket, ServiceInfo, Serving, VersionInfo, WorkerPools, require,
                                          supports)
from opbox.platform.backends.runtime_env import runtime_env
from opbox.platform.control.runs import Limits
from opbox.platform.settings import Settings

from servers import serve_app


class TinyBackend:
    """Runs nothing and declares no ability: what a minimal new backend starts as."""

    name = "tiny"
    abilities = frozenset()

    async def start(self, events) -> None: ...

    async def close(self) -> None: ...

    async def prepare(self, version: VersionInfo) -> None: ...

    def submit(self, ticket: RunTicket, version: VersionInfo) -> None: ...

    async def cancel(self, run_id: str, grace: float) -> None: ...

    def describe(self, workspace: str) -> dict:
        return {"backend": self.name}


def create_tiny(settings, token_for, gateway_url) -> TinyBackend:
    return TinyBackend()


@pytest.fixture
def tiny_gateway(tmp_path, monkeypatch):
    from opbox.platform.core import Platform
    from opbox.platform.gateway.app import create_app

    monkeypatch.setitem(registry.BACKENDS, "tiny", registry.BackendKind("tiny", "nowhere", "podman",
                                                                        f"{__name__}:create_tiny"))
    platform = Platform(Settings(home=tmp_path / "home", backend="tiny"))
    creds = platform.bootstrap()
    with serve_app(create_app(platform), lifespan="on") as url:
        yield platform, httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {creds['token']}"})


def test_a_backend_without_an_ability_answers_501_with_what_it_cannot_do(tiny_gateway):
    platform, http = tiny_gateway
    ws = platform.settings.workspace or "default"
    put = http.put(f"/{ws}/services/model", json={"job": "model"})
    assert put.status_code == 501, put.text
    assert put.json() == {"error": "not_supported", "message": "the tiny backend cannot serve classes"}
    assert http.get(f"/{ws}/services").json() == {"services": []} and http.get(f"/{ws}/status").status_code == 200
    poll = http.post("/_internal/pools/j1.v1/next", headers={
        "Authorization": f"Bearer {platform.auth.internal_token('pool:j1.v1')}", "X-Opbox-Worker": "w1"})
    assert poll.status_code == 501 and poll.json()["message"] == "the tiny backend cannot keep warm worker pools"


def test_not_supported_survives_the_wire():
    error = from_response(501, NotSupported("the tiny backend cannot serve classes").to_dict())
    assert type(error) is NotSupported and error.status == 501 and str(error).endswith("cannot serve classes")
    assert type(from_response(501, {"error": "from_a_newer_server"})) is NotSupported


def test_require_returns_the_ability_or_says_which_backend_lacks_it():
    tiny = TinyBackend()
    assert not supports(tiny, WorkerPools)
    with pytest.raises(NotSupported, match="^the tiny backend cannot keep warm worker pools$"):
        require(tiny, WorkerPools)


@pytest.mark.parametrize("name", registry.backend_names())
def test_every_backend_implements_what_it_declares(name):
    module, _, factory = registry.BACKENDS[name].factory.partition(":")
    module = importlib.import_module(module, registry.__package__)
    backend_class = inspect.signature(getattr(module, factory)).return_annotation
    cls = getattr(module, backend_class) if isinstance(backend_class, str) else backend_class
    assert cls.name == name and cls.abilities <= set(CANNOT)
    for ability in cls.abilities:
        for method in (m for m in vars(ability) if not m.startswith("_")):
            assert callable(getattr(cls, method, None)), f"{cls.__name__} declares {ability.__name__} without {method}"
    assert Serving in cls.abilities and WorkerPools in cls.abilities  # kubernetes: map items go to worker pods


def test_builders_are_refused_where_they_do_not_fit(tmp_path):
    settings = Settings(home=tmp_path, backend="container", builder="local")
    with pytest.raises(ConfigError, match="^the container backend runs images: use the podman builder, not 'local'$"):
        registry.make_builder(settings, None, None)
    with pytest.raises(ConfigError, match="unknown builder 'buildah'; this build knows: local, podman, buildkit, kaniko"):
        registry.make_builder(dataclasses.replace(settings, builder="buildah"), None, None)
    with pytest.raises(ConfigError, match="unknown backend 'slurm'; this build knows: local, container, kubernetes"):
        registry.make_backend(dataclasses.replace(settings, backend="slurm"), str, "http://gw")
    assert registry.make_builder(dataclasses.replace(settings, builder=None), None, None).name == "podman"


def _version(**artifact) -> VersionInfo:
    return VersionInfo(workspace="ws", job_id="j1", job_name="model", version=3, kind="class", entry="main:Model",
                       resource=Resource(env={"HF_HOME": "/cache"}), artifact=Artifact(**artifact))


def test_runtime_env_is_the_contract_of_every_spawn_site():
    local = _version(code_dir="/code/abc", python="/envs/x/bin/python")
    base = {"PYTHONUNBUFFERED": "1", "OPBOX_ENTRY": "main:Model", "OPBOX_CODE_DIR": "/code/abc"}
    assert runtime_env(local, gateway_url="http://gw", worker=("j1.v3", "w1", "tok")) == {
        **base, "OPBOX_GATEWAY_URL": "http://gw", "OPBOX_POOL": "j1.v3", "OPBOX_WORKER_ID": "w1",
        "OPBOX_WORKER_TOKEN": "tok"}
    assert runtime_env(local, gateway_url="http://gw", run=("r1", "tok")) == {
        **base, "OPBOX_GATEWAY_URL": "http://gw", "OPBOX_RUN_ID": "r1", "OPBOX_RUN_TOKEN": "tok"}
    service = ServiceInfo(workspace="ws", name="model", version=local, init=b"\x01", concurrency=4, queue=8)
    assert runtime_env(local, serve=service, replica="r1-v3", init_file="/init") == {
        **base, "OPBOX_INIT_FILE": "/init", "OPBOX_CONCURRENCY": "4", "OPBOX_QUEUE": "8", "OPBOX_SERVICE": "model",
        "OPBOX_REPLICA": "r1-v3"}
    image = _version(code_dir="/code/abc", image="localhost/opbox-model:abc")
    assert runtime_env(image, in_image=True, serve=service, init_url="http://gw/init") == {
        **base, "OPBOX_CODE_DIR": "/app", "OPBOX_CONCURRENCY": "4", "OPBOX_QUEUE": "8",
        "OPBOX_INIT_URL": "http://gw/init", "OPBOX_INIT_SHA256": hashlib.sha256(b"\x01").hexdigest()}
    assert "HF_HOME" not in runtime_env(local), "Resource.env is merged by each backend, under the runtime's"


def test_local_processes_get_an_allow_listed_environment(monkeypatch):
    from opbox.platform.backends.local.process import process_env

    for name, value in (("OPBOX_TOKEN", "admin-token"), ("OPBOX_SECRET", "s"), ("AWS_SECRET_ACCESS_KEY", "k"),
                        ("SOME_HOST_VAR", "x"), ("PATH", "/usr/bin:/bin"), ("LANG", "C.UTF-8"), ("HOME", "/root")):
        monkeypatch.setenv(name, value)
    version = _version(code_dir="/c")
    env = process_env(version, runtime_env(version))
    assert env["PATH"] == "/usr/bin:/bin" and env["LANG"] == "C.UTF-8" and env["HOME"] == "/root"
    assert env["HF_HOME"] == "/cache" and env["OPBOX_CODE_DIR"] == "/c"  # Resource.env, then the runtime's
    for name in ("OPBOX_TOKEN", "OPBOX_SECRET", "AWS_SECRET_ACCESS_KEY", "SOME_HOST_VAR"):
        assert name not in env, name
    sealed = process_env(version, runtime_env(version), sealed=True)
    assert sealed["HOME"] == sealed["TMPDIR"] == "/tmp" and sealed["OPBOX_CODE_DIR"] == "/app"


def test_artifacts_keep_their_stored_form():
    stored = {"code_dir": "/code/abc", "python": "/envs/x/bin/python", "env": "/envs/x", "unknown_later": 1}
    artifact = Artifact.from_dict(stored)
    assert artifact.venv == "/envs/x" and artifact.code_dir_in_image == "/app"
    assert artifact.to_dict() == {k: v for k, v in stored.items() if k != "unknown_later"}
    assert Artifact.from_dict(None) == Artifact() and Artifact().to_dict() == {}
    assert BuildSpec("ws", "model", 1, "a" * 64, "3.11").python == "3.11"


def test_settings_defaults_are_written_once(monkeypatch):
    for name in [f.metadata["env"] for f in dataclasses.fields(Settings) if f.metadata.get("env")]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OPBOX_REGISTRY_INSECURE", raising=False)
    assert Settings.from_env() == Settings()
    monkeypatch.setenv("OPBOX_MAX_PAYLOAD", "1024")
    monkeypatch.setenv("OPBOX_REGISTRY", "registry.example.com/opbox")
    monkeypatch.setenv("OPBOX_REGISTRY_INSECURE", "1")
    settings = Settings.from_env(port=9000, backend=None)
    assert (settings.max_payload, settings.port, settings.backend) == (1024, 9000, "local")
    assert settings.registry_insecure == ("registry.example.com",)
    monkeypatch.setenv("OPBOX_WORKER_IDLE", "soon")
    with pytest.raises(ConfigError, match="OPBOX_WORKER_IDLE must be a number, got 'soon'"):
        Settings.from_env()
    limits, settings = Limits(), Settings()
    assert (limits.max_payload, limits.max_log_bytes, limits.max_open_runs, limits.cancel_grace) == (
        settings.max_payload, settings.max_log_bytes, settings.max_open_runs, settings.cancel_grace)
