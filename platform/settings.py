"""The platform's settings: from the environment (OPBOX_*), overridable by ``opbox up`` flags."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from opbox.config import opbox_home
from opbox.errors import ConfigError


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def env_json_strings(name: str, kind: type[dict] | type[list]):
    """A JSON object of strings (``kind=dict``) or list of strings (``kind=list``) from ``name``; empty when unset."""
    raw = os.environ.get(name) or ("{}" if kind is dict else "[]")
    what = "object of strings" if kind is dict else "list of strings"
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    items = value.values() if isinstance(value, dict) else value
    if not isinstance(value, kind) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{name} must be a JSON {what}, got {raw!r}")
    return value


def _insecure_registries(raw: str, registry: str) -> tuple[str, ...]:
    """OPBOX_REGISTRY_INSECURE: "1"/"true" means the host of OPBOX_REGISTRY; else a comma-separated list of hosts."""
    raw = raw.strip()
    if raw.lower() in ("", "0", "false", "no"):
        return ()
    if raw.lower() in ("1", "true", "yes"):
        return (registry.split("/", 1)[0],)
    return tuple(host.strip() for host in raw.split(",") if host.strip())


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=opbox_home)
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None  # how clients reach the gateway; default http://host:port
    backend: str = "local"
    isolation: str = "worker"  # local backend: "worker" (warm pools) or "run" (a fresh process per run)
    store_url: str | None = None  # default: a folder in home
    workspace: str | None = None  # bootstrap workspace (OPBOX_WORKSPACE)
    token: str | None = None  # bootstrap token (OPBOX_TOKEN)
    max_workers: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))
    worker_idle: float = 60.0
    pool_idle: float = 900.0
    max_upload: int = 200 * 1024**2
    max_request_body: int = 80 * 1024**2
    max_payload: int = 64 * 1024**2
    max_log_bytes: int = 8 * 1024**2
    max_open_runs: int = 100_000  # per workspace: queued + running
    cancel_grace: float = 5.0
    builder: str | None = None  # "local" (a virtualenv) or "podman" (an image); default: local for the local backend
    base_image: str | None = None  # podman builder: the image job images start from (OPBOX_BASE_IMAGE)
    registry: str = "localhost"  # podman builder: the tag prefix, e.g. registry.example.com/opbox (OPBOX_REGISTRY)
    wheelhouse: Path | None = None  # podman builder: the wheel cache; default home/wheelhouse (OPBOX_WHEELHOUSE)
    registry_auth_file: Path | None = None  # docker config.json with registry credentials (OPBOX_REGISTRY_AUTH_FILE)
    registry_insecure: tuple[str, ...] = ()  # registry hosts reached over plain HTTP (OPBOX_REGISTRY_INSECURE)
    s3_endpoint_url: str | None = None  # S3-compatible server, when the store URL names none (OPBOX_S3_ENDPOINT_URL)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        base = cls(
            home=opbox_home(),
            host=env.get("OPBOX_HOST", "127.0.0.1"),
            port=env_int("OPBOX_PORT", 8000),
            public_url=env.get("OPBOX_PUBLIC_URL") or None,
            backend=env.get("OPBOX_BACKEND", "local"),
            isolation=env.get("OPBOX_ISOLATION", "worker"),
            store_url=env.get("OPBOX_STORE_URL") or None,
            workspace=env.get("OPBOX_WORKSPACE") or None,
            token=env.get("OPBOX_TOKEN") or None,
            max_workers=env_int("OPBOX_MAX_WORKERS", max(2, os.cpu_count() or 2)),
            worker_idle=env_float("OPBOX_WORKER_IDLE", 60.0),
            pool_idle=env_float("OPBOX_POOL_IDLE", 900.0),
            max_upload=env_int("OPBOX_MAX_UPLOAD", 200 * 1024**2),
            max_log_bytes=env_int("OPBOX_MAX_LOG_BYTES", 8 * 1024**2),
            max_open_runs=env_int("OPBOX_MAX_OPEN_RUNS", 100_000),
            max_payload=env_int("OPBOX_MAX_PAYLOAD", 64 * 1024**2),
            max_request_body=env_int("OPBOX_MAX_REQUEST_BODY", 80 * 1024**2),
            builder=env.get("OPBOX_BUILDER") or None,
            base_image=env.get("OPBOX_BASE_IMAGE") or None,
            registry=env.get("OPBOX_REGISTRY") or "localhost",
            wheelhouse=Path(env["OPBOX_WHEELHOUSE"]) if env.get("OPBOX_WHEELHOUSE") else None,
            registry_auth_file=Path(env["OPBOX_REGISTRY_AUTH_FILE"]) if env.get("OPBOX_REGISTRY_AUTH_FILE") else None,
            registry_insecure=_insecure_registries(env.get("OPBOX_REGISTRY_INSECURE", ""),
                                                   env.get("OPBOX_REGISTRY") or "localhost"),
            s3_endpoint_url=env.get("OPBOX_S3_ENDPOINT_URL") or None,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")
