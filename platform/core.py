"""The composition root: builds the platform's parts from Settings and wires them together."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from opbox.builder.local import LocalBuilder
from opbox.config import credentials_path
from opbox.errors import ConfigError

from .control.auth import Auth, hash_token
from .control.deploys import Deploys
from .ids import check_workspace
from .control.runs import Limits, Runs
from .control.services import Services
from .proxy.proxy import Proxy
from .settings import Settings
from .state import State

log = logging.getLogger("opbox.platform")


def _secret(home: Path) -> bytes:
    path = home / "secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def make_store(settings: Settings, secret: bytes):
    from .store import LocalStore, open_store

    if settings.store_url:
        extra = {}
        if settings.s3_endpoint_url and "endpoint=" not in settings.store_url:
            extra["endpoint_url"] = settings.s3_endpoint_url
        return open_store(settings.store_url, secret=secret, base_url=settings.url, **extra)
    return LocalStore(settings.home / "store", secret=secret, base_url=settings.url)


def make_backend(settings: Settings, auth: Auth):
    if settings.backend == "local":
        from .backends.local import LocalBackend

        return LocalBackend(
            gateway_url=settings.url, home=settings.home, max_workers=settings.max_workers,
            worker_idle=settings.worker_idle, pool_idle=settings.pool_idle, isolation=settings.isolation,
            token_for=auth.internal_token,
        )
    if settings.backend == "container":
        from .backends.container import ContainerBackend

        return ContainerBackend(
            gateway_url=settings.url, home=settings.home, max_workers=settings.max_workers,
            worker_idle=settings.worker_idle, pool_idle=settings.pool_idle, token_for=auth.internal_token,
        )
    if settings.backend == "kubernetes":
        from .backends.kubernetes.backend import KubernetesBackend, KubernetesSettings

        return KubernetesBackend(KubernetesSettings.from_env(), gateway_url=settings.url, token_for=auth.internal_token,
                                 cancel_grace=settings.cancel_grace)
    raise ConfigError(f"unknown backend {settings.backend!r}; this build knows: local, container, kubernetes")


def make_builder(settings: Settings, store=None):
    """``local`` (a virtualenv per requirements) for the local backend, ``podman`` (an image on this
    machine) for the others, ``kaniko`` (an image built in the cluster, pushed to the registry)."""
    kind = settings.builder or ("local" if settings.backend == "local" else "podman")
    if kind == "local":
        if settings.backend != "local":
            raise ConfigError(f"the {settings.backend} backend runs images: use the podman builder, not {kind!r}")
        return LocalBuilder(settings.home)
    if kind not in ("podman", "kaniko"):
        raise ConfigError(f"unknown builder {kind!r}; this build knows: local, podman, kaniko")
    from opbox.builder.container import ContainerBuilder
    from opbox.builder.image import DEFAULT_BASE_IMAGE

    if kind == "podman":
        return ContainerBuilder(settings.home, base_image=settings.base_image or DEFAULT_BASE_IMAGE,
                                registry_prefix=settings.registry, wheelhouse_dir=settings.wheelhouse)
    if settings.backend != "kubernetes":
        raise ConfigError("the kaniko builder runs in the cluster: use it with OPBOX_BACKEND=kubernetes")
    if settings.registry.split("/", 1)[0] == "localhost":
        raise ConfigError("the kaniko builder pushes images: set OPBOX_REGISTRY to a registry the cluster pulls from, "
                          "e.g. registry.example.com/opbox")
    from opbox.builder.registry import RegistryClient

    from .backends.kubernetes.config import KubernetesSettings
    from .backends.kubernetes.kaniko import DEFAULT_BASE_IMAGE as KANIKO_BASE_IMAGE
    from .backends.kubernetes.kaniko import KanikoBuilder, KanikoSettings

    registry = RegistryClient(insecure_hosts=settings.registry_insecure, auth_file=settings.registry_auth_file)
    kaniko = KanikoBuilder(KanikoSettings.from_env(), store=store, registry=registry,
                           kube_settings=KubernetesSettings.from_env(), insecure_registries=settings.registry_insecure)
    return ContainerBuilder(settings.home, base_image=settings.base_image or KANIKO_BASE_IMAGE,
                            registry_prefix=settings.registry, wheelhouse_dir=settings.wheelhouse,
                            image_builder=kaniko, name="kaniko")


class Platform:
    def __init__(self, settings: Settings):
        self.settings = settings
        home = settings.home
        home.mkdir(parents=True, exist_ok=True)
        self.secret = _secret(home)
        self.state = State(home / "state.db")
        self.auth = Auth(self.state, self.secret)
        self.store = make_store(settings, self.secret)
        self.backend = make_backend(settings, self.auth)
        self.runs = Runs(self.state, self.backend, Limits(
            max_payload=settings.max_payload, max_log_bytes=settings.max_log_bytes, cancel_grace=settings.cancel_grace,
            max_open_runs=settings.max_open_runs))
        self.deploys = Deploys(self.state, self.store, make_builder(settings, self.store), self.runs,
                                     settings.max_upload)
        self.services = Services(self.state, self.backend, self.deploys, settings.max_payload,
                                       base_url=lambda: self.settings.url)
        self.proxy = Proxy(self.services)  # service calls: replica choice, in-flight counts, connections

    def bootstrap(self) -> dict | None:
        """First start: make a workspace and an admin token. Uses OPBOX_WORKSPACE / OPBOX_TOKEN when set.

        Returns the credentials when they were created now (the token is shown only then).
        """
        workspace = check_workspace(self.settings.workspace or "default")
        token = self.settings.token
        if token and self.state.token_by_hash(hash_token(token)):
            self._save_credentials(workspace, token)
            return None
        if token is None and self.state.one("SELECT 1 FROM tokens WHERE workspace = ?", workspace):
            return None
        _, token = self.auth.create_token(workspace, name="bootstrap", role="admin", token=token)
        return self._save_credentials(workspace, token)

    def _save_credentials(self, workspace: str, token: str) -> dict:
        creds = {"url": self.settings.url, "workspace": workspace, "token": token}
        path = credentials_path(self.settings.home)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
        return creds

    def set_url(self, url: str) -> None:
        """The gateway's real address, once bound (port 0 picks one)."""
        self.settings = type(self.settings)(**{**self.settings.__dict__, "public_url": self.settings.public_url or url})
        if hasattr(self.store, "base_url"):
            self.store.base_url = self.settings.url
        if hasattr(self.backend, "set_gateway_url"):
            self.backend.set_gateway_url(url)
        creds = credentials_path(self.settings.home)
        if creds.exists():
            data = json.loads(creds.read_text())
            data["url"] = self.settings.url
            self._save_credentials(data["workspace"], data["token"])

    async def start(self) -> None:
        await self.backend.start(self.runs)
        await self.services.start()  # redeploys the services recorded before a restart
        requeued = self.runs.recover()
        if requeued:
            log.info("requeued %d runs after restart", requeued)

    def begin_shutdown(self) -> None:
        """Called from the signal handler: let parked workers go before the server drains requests."""
        pools = getattr(self.backend, "pools", None)
        if pools is not None:
            pools.release_parked()

    async def close(self) -> None:
        await self.proxy.close()
        await self.backend.close()
        self.state.close()
